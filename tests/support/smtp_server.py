"""A real SMTP server on 127.0.0.1 for tests (aiosmtpd), with PIPELINING, rejections, drops and outages on demand."""
from __future__ import annotations

import asyncio
import ssl
import threading
import time
import weakref
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from devtools.ports import free_port


class SmtpSink:
    """An SMTP server keeping what it accepts in `.messages`, the envelope as X-Peer/X-MailFrom/X-RcptTo, and
    when each was accepted in `.arrivals` (time.monotonic(), same order)."""

    def __init__(self, *, tls_context: ssl.SSLContext | None = None,
                 starttls_context: ssl.SSLContext | None = None, require_starttls: bool = False,
                 auth: dict[str, str] | None = None, pipelining: bool = False, on_data=None):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_context = tls_context
        self.starttls_context = starttls_context
        self.require_starttls = require_starttls
        self.users = dict(auth or {})
        # aiosmtpd reads pipelined commands anyway; it says so in EHLO only when asked (RFC 2920's keyword).
        self.pipelining = pipelining
        # on_data(session, envelope) runs in the server's thread as a message's content has arrived, before the reply.
        self.on_data = on_data
        self.connections = 0          # connections that said EHLO/HELO (a STARTTLS upgrade is not a new one)
        self.logins = 0               # successful AUTHs
        self.commands: list[str] = []  # MAIL and RCPT as they arrived, e.g. "RCPT user1@corp.example"
        self.quits: list[str] = []  # the peer (host:port, as in X-Peer) of each connection that said QUIT
        self._mail_replies: list[str] = []
        self._drops = 0
        self._hangups: list[bool] = []  # per coming message: close after the reply (True: and stop listening)
        self._messages: list[EmailMessage] = []
        self._arrivals: list[float] = []
        self._rejected: dict[str, str] = {}
        self._failures: list[str] = []
        self._greeted: weakref.WeakSet = weakref.WeakSet()
        self._changed = threading.Condition()
        self._controller: Controller | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> "SmtpSink":
        """Listen on self.port (the same port after a restart)."""
        self._controller = Controller(
            self, hostname=self.host, port=self.port,
            ssl_context=self.tls_context,                 # implicit TLS, as on port 465
            tls_context=self.starttls_context,            # STARTTLS offered, as on port 587
            require_starttls=bool(self.starttls_context and self.require_starttls),
            authenticator=self._authenticate if self.users else None,
            # aiosmtpd counts only STARTTLS as encryption, so over implicit TLS it would refuse
            # AUTH with 538 unless told not to require TLS; plain connections may log in too.
            auth_require_tls=self.starttls_context is not None,
            # Without a name aiosmtpd calls socket.getfqdn() for every connection (a DNS lookup).
            server_hostname="smtp-sink.test",
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection, as a crashed server would."""
        if self._controller is None:
            return
        # Controller.stop cancels each connection's task, and aiosmtpd closes the socket then.
        controller, self._controller = self._controller, None
        controller.stop()

    def restart(self) -> None:
        """Stop, then listen again on the same port (an outage)."""
        self.stop()
        self.start()

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- what tests ask for ------------------------------------------------------------

    @property
    def messages(self) -> list[EmailMessage]:
        with self._changed:
            return list(self._messages)

    @property
    def arrivals(self) -> list[float]:
        """time.monotonic() when each message of `.messages` was accepted."""
        with self._changed:
            return list(self._arrivals)

    def wait_for(self, count: int, timeout: float = 10) -> bool:
        """Wait until at least `count` messages have arrived (True); fail on timeout, as wait_until does."""
        with self._changed:
            if self._changed.wait_for(lambda: len(self._messages) >= count, timeout):
                return True
            raise AssertionError(f"timed out after {timeout:g} s waiting for {count} messages at the SMTP sink "
                                 f"(got {len(self._messages)})")

    def reject(self, address: str, reply: str = "550 5.1.1 no such user") -> None:
        """Answer RCPT TO:<address> with `reply` from now on."""
        with self._changed:
            self._rejected[address.lower()] = reply

    def accept(self, address: str) -> None:
        """Take RCPT TO:<address> again (undoes reject)."""
        with self._changed:
            self._rejected.pop(address.lower(), None)

    def fail_next(self, n: int, reply: str = "451 4.3.0 try again later") -> None:
        """Answer the next `n` DATA commands with `reply` (the message is not kept)."""
        with self._changed:
            self._failures = [reply] * n

    def refuse_mail(self, n: int, reply: str = "451 4.7.1 try again later") -> None:
        """Answer the next `n` MAIL FROM commands with `reply`."""
        with self._changed:
            self._mail_replies = [reply] * n

    def hang_up_after_reply(self, stop_listening: bool = False) -> None:
        """After the next message's reply, close that connection (and with stop_listening, take no new ones)."""
        with self._changed:
            self._hangups.append(stop_listening)

    def drop_after_content(self, n: int = 1) -> None:
        """For the next `n` messages: take the content, then close the connection without a reply."""
        with self._changed:
            self._drops = n

    # -- aiosmtpd hooks, run on the server's event loop thread -------------------------
    # aiosmtpd takes every handle_* attribute of the handler for a hook and every auth_* one
    # for an AUTH mechanism, so nothing else here may be named that way.

    def _greet(self, server) -> None:
        with self._changed:
            if server not in self._greeted:
                self._greeted.add(server)
                self.connections += 1

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self._greet(server)
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        self._greet(server)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.users and not session.authenticated:
            return "530 5.7.0 Authentication required"
        with self._changed:
            self.commands.append(f"MAIL {address}")
            if self._mail_replies:
                return self._mail_replies.pop()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self._changed:
            self.commands.append(f"RCPT {address}")
            reply = self._rejected.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.on_data is not None:
            self.on_data(session, envelope)
        with self._changed:
            if self._drops:
                self._drops -= 1
                server.transport.close()  # the content arrived; the reply never leaves
                return "250 2.0.0 never sent"
            if self._failures:
                return self._failures.pop()
        message = BytesParser(policy=policy.default).parsebytes(envelope.original_content)
        message["X-Peer"] = f"{session.peer[0]}:{session.peer[1]}"
        message["X-MailFrom"] = envelope.mail_from
        message["X-RcptTo"] = ", ".join(envelope.rcpt_tos)
        with self._changed:
            self._messages.append(message)
            self._arrivals.append(time.monotonic())
            self._changed.notify_all()
            hangup = self._hangups.pop(0) if self._hangups else None
        if hangup is not None:  # after the reply below has been written
            loop = asyncio.get_running_loop()
            loop.call_soon(server.transport.close)
            if hangup:
                loop.call_soon(self._controller.server.close)
        return "250 2.0.0 OK: queued"

    async def handle_QUIT(self, server, session, envelope):
        with self._changed:
            self.quits.append(f"{session.peer[0]}:{session.peer[1]}")
        return "221 Bye"

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword)
              and self.users.get(auth_data.login.decode()) == auth_data.password.decode())
        if ok:
            with self._changed:
                self.logins += 1
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


class SlowSink(SmtpSink):
    """An SMTP server that takes `data_seconds` to answer each DATA (a slow or distant relay); `in_data` is set
    once the first message's content has arrived and its answer is pending."""

    def __init__(self, data_seconds: float, **options):
        super().__init__(**options)
        self.data_seconds = data_seconds
        self.in_data = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        self.in_data.set()
        await asyncio.sleep(self.data_seconds)
        return await super().handle_DATA(server, session, envelope)
