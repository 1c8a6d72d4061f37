"""Messages and what the server said about them: build each member's message, read SMTP replies (sent,
transient, permanent, throttled), and the file and console backends. smtp_session.py holds the connection."""
from __future__ import annotations

import logging
import os
import re
import smtplib
import ssl
import tempfile
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, formataddr, make_msgid, parseaddr
from pathlib import Path

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


# Provider answers that mean "slow down", whatever their code (../shared/reference/smtp-providers.md):
# transient, and counted towards the three refusals in a row that pause the connection.
THROTTLING = (
    (re.compile(r"frequency limited", re.I), "QQ Mail / Exmail: connection, sender or domain frequency"),
    (re.compile(r"too many (connections|messages|mails|recipients|sessions)", re.I), "too many at once"),
    (re.compile(r"too much mail", re.I), "Postfix anvil (smtpd_client_message_rate_limit)"),
    (re.compile(r"rate limit|slow down|sending limit", re.I), "a rate limit"),
)
# The day's quota is used up: retrying within seconds or minutes only adds refusals; wait for tomorrow.
QUOTA = ((re.compile(r"\bMI:STC\b"), "NetEase: the day's sending quota is used up"),)


@dataclass(frozen=True)
class Outgoing:
    """One message to one recipient; `delivery_id` names it in logs and files (a delivery or a digest);
    `tag` (bounces/tags.py) names it in its Message-ID, VERP envelope sender and DSN ENVID ('' = untagged)."""
    delivery_id: int
    address: str
    name: str
    subject: str
    body: str
    tag: str = ""


@dataclass(frozen=True)
class SendResult:
    """The outcome of one message: `permanent` means a retry cannot help; `throttled`, that the provider asked
    to slow down; `quota`, that its daily quota is used up; `sender_refused`, that MAIL FROM itself was."""
    ok: bool
    permanent: bool = False
    reason: str = ""
    throttled: bool = False
    quota: bool = False
    sender_refused: bool = False


SENT = SendResult(ok=True)


class Unsendable(Exception):
    """This item cannot become an email (bad address, a subject the email package cannot encode)."""

    def __init__(self, result: SendResult):
        super().__init__(result.reason)
        self.result = result


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


def message_id(item: Outgoing, domain: str) -> str:
    """`<wm-<tag>@domain>` for a tagged item (a bounce that returns it names the delivery), else random.
    An explicit domain also spares make_msgid a DNS lookup of this host's name."""
    return f"<wm-{item.tag}@{domain}>" if item.tag else make_msgid(domain=domain)


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
    message["Message-ID"] = message_id(item, envelope_sender(settings).rpartition("@")[2] or "wecom-mailer.invalid")
    # RFC 3834: vacation responders stay quiet, and the mail says it is machine-sent.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(item.body, charset="utf-8")
    return message


class Renderer:
    """The bytes of each item's message, for a batch: what every recipient of one subject and body shares is
    serialised once, only To, Date and Message-ID per message (the email package takes ~0.7 ms a message).
    Raises Unsendable for an item that cannot be an email; the batch goes on."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.domain = envelope_sender(settings).rpartition("@")[2] or "wecom-mailer.invalid"
        self._shared: dict[tuple[str, str], bytes] = {}

    def __call__(self, item: Outgoing) -> bytes:
        problem = address_problem(item.address)
        if problem:
            raise Unsendable(SendResult(ok=False, permanent=True, reason=problem))
        try:
            shared = self._shared.get((item.subject, item.body))
            if shared is None:
                message = build_message(self.settings, item)
                for name in ("To", "Date", "Message-ID"):
                    del message[name]
                shared = self._shared[(item.subject, item.body)] = message.as_bytes()
            return b"".join((self._to(item), b"Date: ", format_datetime(datetime.now(self.settings.tz)).encode(),
                             b"\r\nMessage-ID: ", message_id(item, self.domain).encode(), b"\r\n", shared))
        except (ValueError, UnicodeError) as exc:  # e.g. the email package's header encoder on odd subjects
            raise Unsendable(SendResult(ok=False, permanent=True, reason=(
                f"message cannot be built ({exc.__class__.__name__}): check the template's email_title and "
                "email_body"))) from None

    def _to(self, item: Outgoing) -> bytes:
        # formataddr quotes or RFC 2047-encodes the name as the policy would; a long name is folded by it.
        line = f"To: {formataddr((header_text(item.name), item.address), charset='utf-8')}\r\n"
        if len(line) <= 78:
            return line.encode("ascii")
        message = EmailMessage(policy=MAIL_POLICY)
        message["To"] = Address(display_name=header_text(item.name), addr_spec=item.address)
        return message.as_bytes()[:-2]  # the header block without the blank line that ends it


def refusal(code: int, text: bytes | str, settings: Settings, sender: bool = False) -> SendResult:
    """What a refusing SMTP reply means: 4xx transient, 5xx permanent, unless the text says "throttled"
    (transient whatever its code) or "quota used up"; a refused sender names the settings to check."""
    said = reply_text(text)
    reason = mask(f"{code} {said}", settings)
    if any(pattern.search(said) for pattern, _ in QUOTA):
        return SendResult(ok=False, reason=reason, quota=True)
    if any(pattern.search(said) for pattern, _ in THROTTLING):
        return SendResult(ok=False, reason=reason, throttled=True)
    if sender and code >= 500:
        # Not about this recipient: every next message would be refused alike, so the batch stops. Transient,
        # so that the backoff waits for the settings to be fixed.
        return SendResult(ok=False, reason=f"sender refused ({reason}): {SENDER_HINT}", sender_refused=True)
    if sender:  # a 4xx to MAIL FROM: the server is busy, not our sender wrong; it counts as a refusal in a row
        return SendResult(ok=False, reason=f"sender refused ({reason})")
    return SendResult(ok=False, permanent=code >= 500, reason=reason)


def connect_failure(settings: Settings, exc: OSError) -> str:
    """Why the connection could not be opened, and which setting to check."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        why = (f"login as {settings.smtp_user} refused ({exc.smtp_code} {reply_text(exc.smtp_error)}): "
               + LOGIN_HINT)
    elif isinstance(exc, ssl.SSLCertVerificationError):
        trust = f"SMTP_CA_FILE={settings.smtp_ca_file}" if settings.smtp_ca_file else "the system trust store"
        why = (f"TLS certificate not trusted ({exc.verify_message}, checked against {trust}): SMTP_HOST must be "
               "the name on the server's certificate; for a relay with a private CA set SMTP_CA_FILE")
    elif isinstance(exc, ssl.SSLError):
        why = f"TLS failed ({exc.reason}): check SMTP_SECURITY matches SMTP_PORT (ssl: 465, starttls: 587)"
    elif isinstance(exc, smtplib.SMTPNotSupportedError):
        why = f"{exc} check SMTP_SECURITY (ssl or starttls; most servers offer login only over TLS)"
    elif isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
        why = (f"no answer within {settings.smtp_timeout:g} s: check SMTP_HOST, SMTP_PORT, "
               "SMTP_SECURITY (ssl: 465, starttls: 587) and that outbound SMTP is not blocked")
    elif isinstance(exc, smtplib.SMTPResponseException):
        why = f"refused: {exc.smtp_code} {reply_text(exc.smtp_error)}"
    else:
        why = f"cannot connect ({reply_text(exc)}): check SMTP_HOST and SMTP_PORT"
    where = f"SMTP {settings.smtp_host}:{settings.smtp_port} ({settings.smtp_security})"
    return mask(f"{where}: {why}", settings)


def reply_text(value: bytes | str | BaseException) -> str:
    """A server reply or error as one line of text."""
    if isinstance(value, OSError) and value.strerror:
        value = value.strerror
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split()) or type(value).__name__


def envelope_sender(settings: Settings) -> str:
    """The envelope sender: the address in MAIL_FROM, which may be `Name <addr>`."""
    return parseaddr(settings.mail_from)[1] or settings.mail_from


def return_path(settings: Settings, item: Outgoing) -> str:
    """The envelope sender of `item`: BOUNCE_ADDRESS VERP-tagged (`bounces+<tag>@corp.example`) when set and
    the item is tagged, else MAIL_FROM's address."""
    if settings.bounce_address and item.tag:
        local, _, domain = settings.bounce_address.rpartition("@")
        return f"{local}+{item.tag}@{domain}"
    return envelope_sender(settings)


def xtext(value: str) -> str:
    """RFC 3461 xtext: `+` and `=` (and anything outside ! to ~) as +XX."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


def write_eml(directory: Path, item: Outgoing, message: bytes) -> SendResult:
    """Write `message` as <delivery id>-<address>.eml; atomically, so a reader never sees half a file."""
    safe_address = re.sub(r"[^A-Za-z0-9@._+-]", "_", item.address)[:100]
    path = directory / f"{item.delivery_id:08d}-{safe_address}.eml"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(message)
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as exc:
        return SendResult(ok=False, reason=f"cannot write {path} ({exc.strerror}): check MAIL_FILE_DIR")
    return SENT


def print_message(item: Outgoing, data: bytes) -> SendResult:
    """Print headers and decoded body to stdout (MAIL_BACKEND=console)."""
    message = BytesParser(policy=policy.default).parsebytes(data)
    headers = "".join(f"{name}: {value}\n" for name, value in message.items())
    print(f"{headers}\n{message.get_content().rstrip()}\n{'-' * 72}", flush=True)
    return SENT


def log_result(item: Outgoing, result: SendResult) -> None:
    """One line per message: the member's name and address, and what happened."""
    who = f"{header_text(item.name)} <{header_text(item.address)}>"
    if result.ok:  # the original flow logged each member's name at INFO; operators grep for it
        log.info("delivery %d: mailed %s", item.delivery_id, who)
    else:
        kind = "permanent" if result.permanent else "throttled" if result.throttled else "transient"
        log.warning("delivery %d to %s failed (%s): %s", item.delivery_id, who, kind, result.reason)
