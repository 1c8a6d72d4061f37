"""The one place that talks SMTP: build each member's message and send it (SMTP, .eml files or stdout)."""
from __future__ import annotations

import logging
import os
import re
import smtplib
import ssl
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid, parseaddr
from pathlib import Path
from typing import Callable, Iterable

from config import Settings, mask

log = logging.getLogger("wecom_mailer.mailer")

# 7-bit clean output (RFC 2047 headers, base64 or quoted-printable UTF-8 bodies) passes every
# relay, whether or not it offers 8BITMIME or SMTPUTF8.
MAIL_POLICY = policy.SMTP.clone(cte_type="7bit")
# C0/C1 controls and Unicode line separators: anything that could end a header line.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# The one rule for a recipient address, used when an address is chosen (store/addressbook.py) and when it
# is sent to: a plain ASCII addr-spec (dot-atom@domain, RFC 5321 lengths). Nothing else: no display name,
# spaces, quotes, comments or line breaks, so it goes into RCPT TO and the To: header as is. Non-ASCII
# addresses need SMTPUTF8, which QQ Mail and most servers refuse; quoted local parts are legal but a
# typo far more often than a real mailbox.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ADDRESS = re.compile(rf"({_LOCAL})@((?:{_LABEL}\.)+{_LABEL})")
SENDER_HINT = ("check MAIL_FROM (most providers, QQ Mail too, require the SMTP_USER mailbox), "
               "SMTP_USER and SMTP_SECURITY")
LOGIN_HINT = ("check SMTP_USER/SMTP_PASSWORD (QQ Mail: use the authorisation code 授权码, "
              "not the mailbox password)")


class MailError(Exception):
    """SMTP does not work with the current settings; the message names the cause and the fix."""


@dataclass(frozen=True)
class Outgoing:
    """One message to one recipient."""
    delivery_id: int
    address: str
    name: str
    subject: str
    body: str


@dataclass(frozen=True)
class SendResult:
    """The outcome of one message; `permanent` means a retry cannot help."""
    ok: bool
    permanent: bool = False
    reason: str = ""


SENT = SendResult(ok=True)


def header_text(text: str) -> str:
    """`text` for a header: control characters (CR, LF, …) turned into spaces, so it cannot start a header,
    and each `=?` written `= ?`, so that nothing in it reads as an RFC 2047 encoded-word. Mail clients (and
    the email package, on assignment) decode one anywhere in a header: a member named
    `=?utf-8?b?Q0VPIDxjZW9AY29ycC5leGFtcGxlPg==?=` would be shown as `CEO <ceo@corp.example>`."""
    return CONTROL_CHARS.sub(" ", text).strip().replace("=?", "= ?")


def address_problem(address: str) -> str | None:
    """Why `address` cannot be a recipient, or None when it can (see ADDRESS)."""
    match = ADDRESS.fullmatch(address or "")
    if match and len(match.group(1)) <= 64 and len(address) <= 254:
        return None
    if not (address or "").isascii():
        return f"invalid address {address!r}: only ASCII addresses are supported"
    return f"invalid address {address!r}: expected name@domain"


def build_message(settings: Settings, item: Outgoing) -> EmailMessage:
    """The member's message: From MAIL_FROM, To the member, UTF-8 subject and body, Date, Message-ID."""
    problem = address_problem(item.address)
    if problem:
        raise ValueError(problem)
    message = EmailMessage(policy=MAIL_POLICY)
    message["From"] = settings.mail_from
    message["To"] = Address(display_name=header_text(item.name), addr_spec=item.address)
    message["Subject"] = header_text(item.subject)
    message["Date"] = format_datetime(datetime.now(settings.tz))
    # An explicit domain also spares make_msgid a DNS lookup of this host's name.
    message["Message-ID"] = make_msgid(domain=_sender(settings).rpartition("@")[2] or "wecom-mailer.invalid")
    message.set_content(item.body, charset="utf-8")
    return message


class _Renderer:
    """build_message(...).as_bytes() for a batch: what every recipient of one subject and body shares is
    serialised once, only To, Date and Message-ID per message (the email package takes ~0.7 ms a message)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.domain = _sender(settings).rpartition("@")[2] or "wecom-mailer.invalid"
        self._shared: dict[tuple[str, str], bytes] = {}

    def __call__(self, item: Outgoing) -> bytes:
        shared = self._shared.get((item.subject, item.body))
        if shared is None:
            message = build_message(self.settings, item)
            for name in ("To", "Date", "Message-ID"):
                del message[name]
            shared = self._shared[(item.subject, item.body)] = message.as_bytes()
        return b"".join((self._to(item), b"Date: ", format_datetime(datetime.now(self.settings.tz)).encode(),
                         b"\r\nMessage-ID: ", make_msgid(domain=self.domain).encode(), b"\r\n", shared))

    def _to(self, item: Outgoing) -> bytes:
        # formataddr quotes or RFC 2047-encodes the name as the policy would; a long name is folded by it.
        line = f"To: {formataddr((header_text(item.name), item.address), charset='utf-8')}\r\n"
        if len(line) <= 78:
            return line.encode("ascii")
        message = EmailMessage(policy=MAIL_POLICY)
        message["To"] = Address(display_name=header_text(item.name), addr_spec=item.address)
        return message.as_bytes()[:-2]  # the header block without the blank line that ends it


def send_all(settings: Settings, items: Iterable[Outgoing],
             on_result: Callable[[Outgoing, SendResult], bool | None],
             stop: threading.Event | None = None, *, tls_context: ssl.SSLContext | None = None,
             before_content: Callable[[], None] | None = None) -> None:
    """Send every item with MAIL_BACKEND, calling on_result right after each outcome; False from it stops.

    With SMTP, `before_content` runs in the sending thread once the server has answered DATA, right
    before the message itself goes out: the last moment to finish what the previous outcome started.
    """
    stop = stop or threading.Event()
    halt = threading.Event()  # on_result said stop, or a thread failed
    pending, lock = iter(items), threading.Lock()

    def next_item() -> Outgoing | None:
        with lock:  # one shared iterator: each item goes to exactly one thread
            return None if stop.is_set() or halt.is_set() else next(pending, None)

    def work(send: Callable[[Outgoing, EmailMessage | bytes], SendResult], alive: Callable[[], bool],
             render: Callable[[Outgoing], EmailMessage | bytes] = lambda item: build_message(settings, item)) -> None:
        try:
            while alive() and (item := next_item()) is not None:
                result = _attempt(item, send, render)
                _log_result(item, result)
                if on_result(item, result) is False:
                    halt.set()
        except BaseException:
            halt.set()  # the other threads stop too; the error reaches the caller via its future
            raise

    renderer = _Renderer(settings)

    def smtp_thread() -> None:
        connection = _SmtpConnection(settings, tls_context, before_content)
        try:
            work(connection.send, lambda: not connection.broken, renderer)
        finally:
            connection.close(quit=True)

    if settings.mail_backend == "smtp":
        with ThreadPoolExecutor(settings.smtp_connections, thread_name_prefix="smtp") as pool:
            for future in [pool.submit(smtp_thread) for _ in range(settings.smtp_connections)]:
                future.result()
    elif settings.mail_backend == "file":
        work(lambda item, message: _write_eml(Path(settings.mail_file_dir), item, message), lambda: True)
    else:
        work(_print_message, lambda: True)


def check_smtp(settings: Settings, *, tls_context: ssl.SSLContext | None = None) -> str:
    """Connect, secure and log in as configured, send nothing, QUIT; describe it or raise MailError."""
    try:
        smtp = _open(settings, tls_context)
    except OSError as exc:  # smtplib.SMTPException is an OSError too
        raise MailError(_connect_failure(settings, exc)) from None
    tls = smtp.sock.version() if isinstance(smtp.sock, ssl.SSLSocket) else "no TLS"
    _quit(smtp)
    login = f"logged in as {settings.smtp_user}" if settings.smtp_user else "no login (SMTP_USER is empty)"
    return f"SMTP {settings.smtp_host}:{settings.smtp_port} ({settings.smtp_security}): {tls}, {login}"


class _SmtpConnection:
    """One sending thread's SMTP connection: reused for all its messages, reopened once when dropped."""

    def __init__(self, settings: Settings, tls_context: ssl.SSLContext | None,
                 before_content: Callable[[], None] | None = None):
        self.settings = settings
        self.tls_context = tls_context
        self.before_content = before_content
        self.smtp: _SMTP | None = None
        self.broken = False  # cannot connect or log in: this thread sends nothing more

    def send(self, item: Outgoing, message: bytes) -> SendResult:
        """Send to item.address: 250 → ok, 4xx → transient, 5xx → permanent for this recipient."""
        for retry in (False, True):
            if self.smtp is None:
                try:
                    self.smtp = _open(self.settings, self.tls_context)
                except OSError as exc:  # smtplib.SMTPException is an OSError too
                    self.broken = True
                    return SendResult(ok=False, reason=_connect_failure(self.settings, exc))
                if self.before_content:
                    self.smtp.before_content = self.before_content
            try:
                # On a refusal smtplib sends RSET itself, so the connection stays usable.
                self.smtp.sendmail(_sender(self.settings), [item.address], message)
                return SENT
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients[item.address]
            except smtplib.SMTPSenderRefused as exc:
                # Not about this recipient: the next messages would be refused alike, so stop here
                # and leave them for a later retry (after the settings are fixed, for a 5xx).
                self.broken = True
                why = f"sender refused ({exc.smtp_code} {_reply_text(exc.smtp_error)})"
                hint = f": {SENDER_HINT}" if exc.smtp_code >= 500 else ""
                return SendResult(ok=False, reason=mask(why + hint, self.settings))
            except smtplib.SMTPResponseException as exc:
                code, text = exc.smtp_code, exc.smtp_error
            except OSError as exc:  # dropped: SMTPServerDisconnected, reset, timeout
                self.close()
                if retry:
                    return SendResult(ok=False, reason=f"connection lost twice: {_reply_text(exc)}")
                continue
            if code == 421:  # the server is closing this connection; the next message reconnects
                self.close()
            return SendResult(ok=False, permanent=code >= 500,
                              reason=mask(f"{code} {_reply_text(text)}", self.settings))
        raise AssertionError("unreachable")

    def close(self, quit: bool = False) -> None:
        """Close the connection; QUIT first only when asked (a dropped peer would not answer)."""
        if self.smtp is not None:
            smtp, self.smtp = self.smtp, None
            if quit:
                _quit(smtp)
            else:
                smtp.close()


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP calling `before_content` between the server's 354 to DATA and the message itself."""

    @staticmethod
    def before_content() -> None:
        pass

    def getreply(self):
        code, text = super().getreply()
        if code == 354:
            try:
                self.before_content()
            except BaseException:
                self.close()  # mid-DATA a QUIT would be read as text; cut off before the final dot, nothing is accepted
                raise
        return code, text


class _SMTP_SSL(_SMTP, smtplib.SMTP_SSL):
    pass


def _open(settings: Settings, tls_context: ssl.SSLContext | None) -> _SMTP:
    """Connect, secure (SMTP_SECURITY) and log in (when SMTP_USER is set)."""
    context = tls_context or ssl.create_default_context()
    host, port, timeout = settings.smtp_host, settings.smtp_port, settings.smtp_timeout
    if settings.smtp_security == "ssl":
        smtp = _SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        smtp = _SMTP(host, port, timeout=timeout)
    try:
        smtp.ehlo()
        if settings.smtp_security == "starttls":
            smtp.starttls(context=context)
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


def _connect_failure(settings: Settings, exc: OSError) -> str:
    """Why the connection could not be opened, and which setting to check."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        why = (f"login as {settings.smtp_user} refused ({exc.smtp_code} {_reply_text(exc.smtp_error)}): "
               + LOGIN_HINT)
    elif isinstance(exc, ssl.SSLCertVerificationError):
        why = (f"TLS certificate not trusted ({exc.verify_message}): SMTP_HOST must be the name "
               "on the server's certificate")
    elif isinstance(exc, ssl.SSLError):
        why = f"TLS failed ({exc.reason}): check SMTP_SECURITY matches SMTP_PORT (ssl: 465, starttls: 587)"
    elif isinstance(exc, smtplib.SMTPNotSupportedError):
        why = f"{exc} check SMTP_SECURITY (ssl or starttls; most servers offer login only over TLS)"
    elif isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
        why = (f"no answer within {settings.smtp_timeout:g} s: check SMTP_HOST, SMTP_PORT, "
               "SMTP_SECURITY (ssl: 465, starttls: 587) and that outbound SMTP is not blocked")
    elif isinstance(exc, smtplib.SMTPResponseException):
        why = f"refused: {exc.smtp_code} {_reply_text(exc.smtp_error)}"
    else:
        why = f"cannot connect ({_reply_text(exc)}): check SMTP_HOST and SMTP_PORT"
    where = f"SMTP {settings.smtp_host}:{settings.smtp_port} ({settings.smtp_security})"
    return mask(f"{where}: {why}", settings)


def _reply_text(value: bytes | str | BaseException) -> str:
    """A server reply or error as one line of text."""
    if isinstance(value, OSError) and value.strerror:
        value = value.strerror
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split()) or type(value).__name__


def _sender(settings: Settings) -> str:
    """The envelope sender: the address in MAIL_FROM, which may be `Name <addr>`."""
    return parseaddr(settings.mail_from)[1] or settings.mail_from


def _write_eml(directory: Path, item: Outgoing, message: EmailMessage) -> SendResult:
    """Write `message` as <delivery id>-<address>.eml; atomically, so a reader never sees half a file."""
    safe_address = re.sub(r"[^A-Za-z0-9@._+-]", "_", item.address)[:100]
    path = directory / f"{item.delivery_id:08d}-{safe_address}.eml"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(message.as_bytes())
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as exc:
        return SendResult(ok=False, reason=f"cannot write {path} ({exc.strerror}): check MAIL_FILE_DIR")
    return SENT


def _print_message(item: Outgoing, message: EmailMessage) -> SendResult:
    """Print headers and decoded body to stdout (MAIL_BACKEND=console)."""
    headers = "".join(f"{name}: {value}\n" for name, value in message.items())
    print(f"{headers}\n{message.get_content().rstrip()}\n{'-' * 72}", flush=True)
    return SENT


def _attempt(item: Outgoing, send, render) -> SendResult:
    """One message: an address or content that cannot become an email fails it, not the whole round."""
    problem = address_problem(item.address)
    if problem:
        return SendResult(ok=False, permanent=True, reason=problem)
    try:
        message = render(item)
    except (ValueError, UnicodeError) as exc:  # e.g. the email package's header encoder on odd subjects
        return SendResult(ok=False, permanent=True, reason=f"message cannot be built ({exc.__class__.__name__}): "
                                                           "check the template's email_title and email_body")
    return send(item, message)


def _log_result(item: Outgoing, result: SendResult) -> None:
    who = f"{header_text(item.name)} <{header_text(item.address)}>"
    if result.ok:  # the original flow logged each member's name at INFO; operators grep for it
        log.info("delivery %d: mailed %s", item.delivery_id, who)
    else:
        kind = "permanent" if result.permanent else "transient"
        log.warning("delivery %d to %s failed (%s): %s", item.delivery_id, who, kind, result.reason)
