"""SMTP sessions: connect, TLS, login, then one transaction per message, pipelined (RFC 2920) when offered.

Pipelined, the end of one message's content goes out in the same write as the next message's MAIL FROM,
RCPT TO and DATA, so each message costs one round trip. Every reply is still read in order and matched to
its command. Whatever the mode, the outcome of a message is recorded (the future `submit` returned is done)
before the content of the next message goes out on the same connection: a crash repeats at most one
message per connection.
"""
from __future__ import annotations

import smtplib
import ssl
import threading
import time
from concurrent.futures import Future
from typing import Callable

import mailer
from config import Settings

IDLE_NOOP_SECONDS = 2.0  # reused after a pause longer than this: NOOP first (the server may have dropped it)
IDLE_CLOSE_SECONDS = 30.0  # kept open between events for this long, then closed politely
THROTTLE_STRIKES = 3  # transient refusals in a row on one connection: the provider says slow down
MAX_RECONNECTS = 3  # per connection and batch: a server that drops every connection is not hammered


class Halt(Exception):
    """This batch stops here: `throttled` (3 refusals in a row), a daily quota, or no connection at all."""

    def __init__(self, reason: str, throttled: bool = False, quota: bool = False, resume_at: float | None = None):
        super().__init__(reason)
        self.reason, self.throttled, self.quota, self.resume_at = reason, throttled, quota, resume_at


class SmtpSession:
    """One SMTP connection, opened when first needed and kept between batches until idle too long."""

    def __init__(self, settings: Settings, tls_context: ssl.SSLContext | None = None):
        self.settings = settings
        self.tls_context = tls_context
        self.smtp: smtplib.SMTP | None = None
        self.pipelining = False
        self.dsn = False  # RFC 3461 offered: MAIL FROM carries RET=HDRS ENVID=<tag>, RCPT TO an ORCPT
        self.dirty = False  # a refused transaction left state on the server: RSET before the next MAIL
        self.pending = False  # commands out whose replies are unread, or inside DATA: not at a clean boundary
        self.last_used = 0.0

    # -- the connection ----------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, secure (SMTP_SECURITY) and log in (SMTP_USER); raises OSError with smtplib's detail."""
        self.smtp = connect(self.settings, self.tls_context)
        self.pipelining = self.settings.smtp_pipelining == "auto" and self.smtp.has_extn("pipelining")
        self.dsn = self.smtp.has_extn("dsn")
        self.dirty = False
        self.last_used = time.monotonic()

    def usable(self) -> bool:
        """True when open and still answering; closes it when it has been idle too long or is gone."""
        if self.smtp is None:
            return False
        idle = time.monotonic() - self.last_used
        if idle > IDLE_CLOSE_SECONDS:
            self.close()
            return False
        if idle > IDLE_NOOP_SECONDS:
            try:
                if self.smtp.noop()[0] != 250:
                    raise smtplib.SMTPServerDisconnected("NOOP refused")
            except OSError:
                self.close(polite=False)
                return False
        return True

    def close(self, polite: bool = True) -> None:
        """QUIT (when the peer can still hear it) and close."""
        smtp, self.smtp = self.smtp, None
        self.pending = False
        if smtp is not None:
            if polite:
                _quit(smtp)
            else:
                smtp.close()

    # -- a batch -------------------------------------------------------------------------------------

    def send(self, take: Callable[[bool], mailer.Outgoing | None], render: Callable[[mailer.Outgoing], bytes],
             submit: Callable[[mailer.Outgoing, mailer.SendResult], Future]) -> None:
        """Send what `take(block)` hands over until it gives None, a recorded outcome says stop, or a Halt.

        `submit(item, result)` hands an outcome to be recorded and returns a future of "go on"; while it is
        recorded this session goes on with the next message's commands, and its content waits for the
        future. Raises Halt, or what recording raised (the connection is then cut before the next message's
        final dot, so the server accepts nothing unrecorded).
        """
        previous: Future | None = None  # the latest outcome being recorded
        strikes = reconnects = 0
        item, staged = take(True), False  # staged: its commands went out with the previous end of data
        halt: Halt | None = None  # raised by the lookahead's take(): after this message is recorded
        try:
            while item is not None and not _stopped(previous):
                if self.smtp is None:
                    self._open_or_halt(item, submit)
                try:
                    message = render(item)
                except mailer.Unsendable as exc:  # a bad address or an unencodable template: this one only
                    previous = submit(item, exc.result)
                    item, staged = take(True), False
                    continue
                try:
                    result, nxt, halt = self._transact(item, message, staged, previous, take)
                except _Aborted:
                    return
                except _Dropped as drop:
                    self.close(polite=False)
                    reconnects += 1
                    if not drop.after_content and reconnects <= MAX_RECONNECTS:
                        staged = False  # it never reached the server: send it again on a new connection
                        continue
                    result, nxt = mailer.SendResult(ok=False, reason=drop.reason), drop.nxt
                previous = submit(item, result)
                self.last_used = time.monotonic()
                strikes = 0 if result.ok or result.permanent else strikes + 1
                if result.quota or result.sender_refused:
                    raise Halt(result.reason, quota=result.quota)
                if strikes >= THROTTLE_STRIKES:
                    raise Halt(f"{strikes} transient refusals in a row, the last: {result.reason}", throttled=True)
                if halt is not None:
                    raise halt
                # After a 421 or a drop the staged message never got its content: it starts over.
                staged = nxt is not None and self.smtp is not None
                item = nxt if nxt is not None else take(True)
        finally:
            # A staged message or an open DATA left behind, or an outcome that could not be recorded: never
            # reuse that connection.
            if self.pending or _unrecorded(previous):
                self.close(polite=False)
            _settle(previous)

    def _open_or_halt(self, item, submit) -> None:
        try:
            self.open()
        except OSError as exc:  # smtplib.SMTPException is an OSError too
            reason = mailer.connect_failure(self.settings, exc)
            _settle(submit(item, mailer.SendResult(ok=False, reason=reason)))
            raise Halt(reason) from None

    def _transact(self, item, message: bytes, staged: bool, previous: Future | None, take):
        """One message: its result, the next message if its commands went out with this one's end, and a
        Halt that taking the next one raised (it stops the batch once this message is recorded)."""
        try:
            refusal = self._envelope(item, staged)
        except OSError as exc:
            raise _Dropped(False, f"connection lost before the message was sent ({mailer.reply_text(exc)})")
        if refusal is not None:
            return refusal, None, None
        # The guarantee: the last outcome is recorded before this content goes out. If recording failed or
        # said stop, the connection is cut here, inside DATA and before the final dot: nothing is accepted.
        if _settle(previous) is False:
            raise _Aborted
        nxt, halt = None, None
        if self.pipelining:
            try:
                nxt = take(False)
            except Halt as exc:
                halt = exc
        try:
            self._write(_content(message) + (self._commands(nxt) if nxt is not None else b""))
            code, text = self._reply()
        except OSError as exc:
            raise _Dropped(True, f"connection lost after the message was sent ({mailer.reply_text(exc)}): "
                                 "it may have arrived", nxt) from None
        self.pending = nxt is not None
        if code == 250:
            return mailer.SENT, nxt, halt
        # A refused message ends its transaction (RFC 5321 4.1.1.4), but not every server forgets the sender:
        # RSET before the next one costs nothing and spares a "503 nested MAIL command".
        self.dirty = nxt is None
        self._closing(code)
        return mailer.refusal(code, text, self.settings), nxt, halt

    def _envelope(self, item, staged: bool) -> mailer.SendResult | None:
        """MAIL FROM, RCPT TO and DATA for `item` (already written when staged); None when the server waits
        for the content (354), else the refusal, every reply read and matched to its command."""
        if not self.pipelining:
            return self._envelope_one_by_one(item)
        self.pending = True
        if not staged:
            self._write(self._commands(item))
        if self.dirty:
            self._reply()  # RSET's
            self.dirty = False
        replies = []
        for _stage in ("MAIL", "RCPT", "DATA"):
            code, text = self._reply()
            replies.append((code, text))
            if code == 421:  # the server closes the connection: no more replies will come
                self._closing(code)
                return self._refused(replies)
        if replies[2][0] == 354:
            if all(code in (250, 251) for code, _ in replies[:2]):
                return None
            self._write(b".\r\n")  # DATA accepted although no recipient was: end it, empty and unsent
            self._reply()
        self.dirty, self.pending = True, False
        return self._refused(replies)

    def _envelope_one_by_one(self, item) -> mailer.SendResult | None:
        if self.dirty:
            self.smtp.rset()
            self.dirty = False
        replies = []
        self.pending = True
        for command in _envelope_lines(self.settings, item, self.dsn):
            self._write(command)
            code, text = self._reply()
            replies.append((code, text))
            if code not in (250, 251, 354):
                self.dirty, self.pending = True, False
                self._closing(code)
                return self._refused(replies)
        return None

    def _refused(self, replies: list[tuple[int, bytes]]) -> mailer.SendResult:
        """The refusal that counts: the first reply that was not a success, by the stage it answered."""
        for stage, (code, text) in zip(("MAIL", "RCPT", "DATA"), replies):
            if code not in (250, 251, 354):
                return mailer.refusal(code, text, self.settings, sender=stage == "MAIL")
        raise AssertionError("no refusal among the replies")

    def _commands(self, item) -> bytes:
        """The pipelined group for `item`: RSET first when a refused transaction is still open."""
        return (b"RSET\r\n" if self.dirty else b"") + b"".join(_envelope_lines(self.settings, item, self.dsn))

    def _write(self, data: bytes) -> None:
        self.smtp.send(data)

    def _reply(self) -> tuple[int, bytes]:
        code, text = self.smtp.getreply()
        if code == -1:  # smtplib's "connection closed" answer
            raise smtplib.SMTPServerDisconnected(text.decode("utf-8", "replace"))
        return code, text

    def _closing(self, code: int) -> None:
        if code == 421:  # the server is closing this connection; the next message reconnects
            self.close(polite=False)


class _Aborted(Exception):
    """The batch stops before this message's content: on_result said stop."""


class _Dropped(Exception):
    def __init__(self, after_content: bool, reason: str, nxt=None):
        super().__init__(reason)
        self.after_content, self.reason, self.nxt = after_content, reason, nxt


def _envelope_lines(settings: Settings, item, dsn: bool = False) -> list[bytes]:
    """MAIL FROM (VERP-tagged when BOUNCE_ADDRESS is set), RCPT TO and DATA; with DSN offered and a tagged
    item, only headers come back in a bounce (RET=HDRS), with our tag (ENVID) and the address we sent to."""
    sender = mailer.return_path(settings, item)
    mail = f"MAIL FROM:<{sender}>"
    rcpt = f"RCPT TO:<{item.address}>"
    if dsn and item.tag:
        mail += f" RET=HDRS ENVID={mailer.xtext(item.tag)}"
        rcpt += f" ORCPT=rfc822;{mailer.xtext(item.address)}"
    return [f"{mail}\r\n".encode("ascii"), f"{rcpt}\r\n".encode("ascii"), b"DATA\r\n"]


def _content(message: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, leading dots doubled, ended by a lone dot."""
    data = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _settle(future: Future | None):
    """Wait for a recorded outcome; what on_result returned (True when there was none); raises its error."""
    return True if future is None else future.result()


def _stopped(future: Future | None) -> bool:
    return future is not None and future.done() and future.result() is False


def _unrecorded(future: Future | None) -> bool:
    return future is not None and future.done() and future.exception() is not None


def check(settings: Settings, *, tls_context: ssl.SSLContext | None = None) -> str:
    """Connect, secure and log in as configured, send nothing, QUIT; describe it or raise MailError."""
    session = SmtpSession(settings, tls_context)
    try:
        session.open()
    except OSError as exc:  # smtplib.SMTPException is an OSError too
        raise mailer.MailError(mailer.connect_failure(settings, exc)) from None
    tls = session.smtp.sock.version() if isinstance(session.smtp.sock, ssl.SSLSocket) else "no TLS"
    pipelining = "pipelining" if session.pipelining else "no pipelining"
    session.close()
    login = f"logged in as {settings.smtp_user}" if settings.smtp_user else "no login (SMTP_USER is empty)"
    return f"SMTP {settings.smtp_host}:{settings.smtp_port} ({settings.smtp_security}): {tls}, {login}, {pipelining}"


def connect(settings: Settings, tls_context: ssl.SSLContext | None) -> smtplib.SMTP:
    """Connect, secure (SMTP_SECURITY) and log in (when SMTP_USER is set); raises OSError."""
    context = tls_context or ssl.create_default_context(cafile=settings.smtp_ca_file)
    host, port, timeout = settings.smtp_host, settings.smtp_port, settings.smtp_timeout
    if settings.smtp_security == "ssl":
        smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=timeout)
    try:
        smtp.ehlo()
        if settings.smtp_security == "starttls":
            smtp.starttls(context=context)
            smtp.ehlo()
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
    except BaseException:
        smtp.close()
        raise
    return smtp


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except OSError:  # already gone: nothing left to say goodbye to
        smtp.close()


class Pool:
    """The SMTP_CONNECTIONS sessions of one worker, kept open across events (closed after 30 s idle)."""

    def __init__(self, settings: Settings, tls_context: ssl.SSLContext | None = None):
        self.sessions = [SmtpSession(settings, tls_context) for _ in range(settings.smtp_connections)]
        self._lock = threading.Lock()

    def close_idle(self) -> None:
        """Close connections idle longer than IDLE_CLOSE_SECONDS (called from the worker's idle loop)."""
        with self._lock:
            for session in self.sessions:
                if session.smtp is not None and time.monotonic() - session.last_used > IDLE_CLOSE_SECONDS:
                    session.close()

    def close(self) -> None:
        with self._lock:
            for session in self.sessions:
                session.close()
