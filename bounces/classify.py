"""A report → hard / soft / sender blocked / delayed / ignored, with the reason; the same rules for a refusal
at RCPT. The status code and the diagnostic decide, never the `Action` label alone: QQ Mail's throttling comes
back as `Action: failed`, `Status: 5.0.0`, and an expired mailbox-full as `failed` with 4.2.2.

RFC 3464 reports are read with the standard library; other formats (Exchange NDRs, qmail, Exim, providers'
退信 pages) are recognised by their sender and subject, their addresses found by flufl.bounce (Mailman's
bounce detectors), and their class still read from the text.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses, parseaddr

from mailer import QUOTA, THROTTLING

# flufl.bounce logs a detector's exception with its traceback before re-raising it: we catch it (a report we
# cannot read is `ignored` with the reason), and no traceback belongs in our log.
logging.getLogger("flufl.bounce").disabled = True

MAX_TEXT = 64 * 1024  # characters of body text read per report
MAX_PARTS = 200  # MIME parts looked at per report

HARD_STATUS = re.compile(r"^5\.1\.(1|2|3|6|10)$|^5\.2\.1$")
HARD_TEXT = re.compile(
    r"user unknown|unknown user|unknown recipient|recipient unknown|no such (user|mailbox|recipient|address)|"
    r"mailbox (not found|does not exist)|user (not found|does not exist)|recip(ient)? ?not ?found|"
    r"(address|account|mailbox|recipient) (does not exist|doesn't exist|not found|is disabled|has been disabled)|"
    r"invalid (recipient|mailbox)|"
    r"该用户不存在|用户不存在|收件人不存在|邮箱不存在|地址不存在|帐号不存在|账号不存在", re.I)
SOFT_TEXT = re.compile(r"mailbox (is )?full|over quota|(disk|mailbox|storage|user'?s?( disk)?) quota (exceeded|full)|"
                       r"quota exceeded for|exceeded (the )?storage|insufficient (storage|space)|空间不足|邮箱已满|"
                       r"容量已满|超过.{0,6}容量", re.I)
SENDER_TEXT = re.compile(
    r"\bspf\b|\bdkim\b|\bdmarc\b|spam|junk mail|blacklist|blocklist|block list|black list|\brbl\b|dnsbl|"
    r"spamhaus|reputation|content (rejected|refused|denied)|inappropriate (words|content)|"
    r"message (content )?(rejected|refused) (due to|because)|"
    r"rejected due to policy|policy (violation|rejection)|not authori[sz]ed to send|relay(ing)? (access )?"
    r"denied|垃圾邮件|被拦截|发信.{0,4}(受限|频率)|反垃圾", re.I)
ENHANCED = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?![\w.])")
FAILURE = re.compile(r"(?<![\w.])([45])\.(\d{1,3})\.(\d{1,3})(?![\w.])")  # in free text: 2.0.13 is a version
REPLY_CODE = re.compile(r"(?<![\w.(+-])([45])\d\d(?![\d.)]|-\d)")

AUTO_REPLY_SUBJECT = re.compile(r"自动回复|自動回覆|休假|out of (the )?office|automatic reply|auto[- ]?reply|"
                                r"^auto:|vacation|autoresponse", re.I)
BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery status notification|returned mail|failure notice|delivery fail|"
    r"mail delivery (failed|failure|problem|system)|delivery has failed|could not be delivered|"
    r"non.?deliver|not delivered|delivery (notification|report)|系统退信|退信|投递失败|发送失败|未能送达|"
    r"无法投递|无法送达|延迟投递|投递延迟", re.I)
DAEMONS = ("mailer-daemon", "mailer_daemon", "mailerdaemon", "mail-daemon", "postmaster", "mdaemon",
           "mail.delivery.system", "bounce", "bounces", "microsoftexchange329e71ec88ae4615bbc36ab6ce41109e")


@dataclass(frozen=True)
class Verdict:
    """What a report says: `kind` one of hard, soft, sender_blocked, delayed, ignored; `is_bounce` True when
    it is a delivery report of any kind (an auto-reply or ordinary mail is not); `recipients` the addresses
    it reports on (lower case, empty when the format does not say)."""
    kind: str
    reason: str
    is_bounce: bool
    status: str = ""
    recipients: tuple[str, ...] = ()
    envid: str = ""


def decide(status: str, diagnostic: str, action: str = "failed") -> tuple[str, str]:
    """(kind, reason) from an enhanced status (`5.1.1`, may be empty), the diagnostic text and the action."""
    diagnostic = " ".join(diagnostic.split())[:600]
    if not status:
        found = FAILURE.search(diagnostic)
        status = ".".join(found.groups()) if found else ""
    if not status:
        code = REPLY_CODE.search(diagnostic)
        status = f"{code.group(1)}.0.0" if code else ""
    reason = _reason(status, diagnostic)
    text = f"{status} {diagnostic}"
    if action.lower() == "delayed":
        return "delayed", reason
    if any(p.search(diagnostic) for p, _ in QUOTA):
        return "sender_blocked", reason
    if status.endswith(".2.2") or SOFT_TEXT.search(text):  # the mailbox is full: soft, whatever the class
        return "soft", reason
    if any(p.search(diagnostic) for p, _ in THROTTLING):
        return "sender_blocked", reason
    if status.startswith("5.7.") or status == "5.3.4" or SENDER_TEXT.search(diagnostic):
        return "sender_blocked", reason
    if status.startswith("4."):
        return "soft", reason
    if HARD_STATUS.match(status) or HARD_TEXT.search(diagnostic):
        return "hard", reason
    if status.startswith("2."):
        return "ignored", f"delivered or relayed ({reason})"
    # A permanent failure we cannot name: counted as soft, so that an unknown refusal suppresses only when
    # it repeats (BOUNCE_SOFT_LIMIT), never at once.
    return "soft", reason or "unrecognised failure"


def _reason(status: str, diagnostic: str) -> str:
    """`5.1.1 <a@corp.example>: Recipient address rejected: User unknown`: the status, then the diagnostic
    without its type (`smtp;`), reply code and repeated status."""
    text = re.sub(r"^(smtp|x-postfix|x-unix|x-local|rfc822)\s*;\s*", "", diagnostic, flags=re.I)
    text = re.sub(r"^[245]\d\d[ -]", "", text)
    if status and text.startswith(status):
        text = text[len(status):].lstrip(" -")
    return f"{status} {text}".strip()[:1000]


def classify_reply(reply: str) -> Verdict:
    """A refusal at send time (`550 5.1.1 <a@corp.example>: … User unknown`), by the same rules as a report."""
    kind, reason = decide("", reply)
    return Verdict(kind, reason, True, status=reason.split(" ", 1)[0])


def header(message: Message, name: str) -> str:
    """A header decoded to text (RFC 2047), '' when absent or unreadable."""
    value = message.get(name)
    if value is None:
        return ""
    try:
        return " ".join(str(make_header(decode_header(str(value)))).split())
    except (ValueError, LookupError, UnicodeError, TypeError, MessageError):  # a broken encoded-word or charset
        return " ".join(str(value).split())


def is_auto_reply(message: Message) -> bool:
    """RFC 3834 Auto-Submitted (other than `no`), X-Autoreply / X-Autorespond, or an out-of-office subject."""
    auto = header(message, "Auto-Submitted").lower()
    return bool((auto and not auto.startswith("no")) or message.get("X-Autoreply") or message.get("X-Autorespond")
                or header(message, "Precedence").lower() == "auto_reply"
                or AUTO_REPLY_SUBJECT.search(header(message, "Subject")))


def looks_like_bounce(message: Message) -> bool:
    """A non-standard report: from a mailer daemon, with X-Failed-Recipients, or a bounce's subject."""
    sender = parseaddr(header(message, "From"))
    local = sender[1].rpartition("@")[0].lower()
    name = sender[0].lower()
    return bool(local in DAEMONS or "mail delivery" in name or "系统退信" in name or "postmaster" in name
                or message.get("X-Failed-Recipients") or BOUNCE_SUBJECT.search(header(message, "Subject")))


def walk(message: Message):
    """The report's own parts, at most MAX_PARTS, never descending into a returned message (message/rfc822):
    the text of our own mail says nothing about why it bounced."""
    stack, seen = [message], 0
    while stack and seen <= MAX_PARTS:
        part = stack.pop(0)
        seen += 1
        yield part
        if part.is_multipart() and not (part is not message and part.get_content_maintype() == "message"):
            payload = part.get_payload()
            if isinstance(payload, list):
                stack[:0] = [p for p in payload if isinstance(p, Message)]


def delivery_status_part(message: Message) -> Message | None:
    """The message/delivery-status part of an RFC 3464 report, or None."""
    for count, part in enumerate(walk(message)):
        if count > MAX_PARTS:
            return None
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            return part
    return None


def classify(message: Message) -> Verdict:
    """The verdict on one received message (never raises for a parsed message)."""
    report = delivery_status_part(message)
    if report is not None:
        verdict = _from_dsn(message, report)
        if verdict is not None:
            return verdict
    if looks_like_bounce(message):
        return _from_text(message)
    if is_auto_reply(message):
        return Verdict("ignored", "an auto-reply (Auto-Submitted, X-Autoreply or its subject)", False)
    return Verdict("ignored", "not a delivery report", False)


def _from_dsn(message: Message, report: Message) -> Verdict | None:
    blocks = report.get_payload()
    if not isinstance(blocks, list) or not blocks:
        return None
    per_message, per_recipient = blocks[0], [b for b in blocks[1:] if isinstance(b, Message)]
    envid = header(per_message, "Original-Envelope-Id") if isinstance(per_message, Message) else ""
    recipients, chosen = [], None
    rank = {"failed": 0, "delayed": 1}
    for block in per_recipient[:MAX_PARTS]:
        for name in ("Final-Recipient", "Original-Recipient"):
            address = header(block, name).rpartition(";")[2].strip().strip("<>").lower()
            if "@" in address:
                recipients.append(address)
        action = header(block, "Action").lower()
        if chosen is None or rank.get(action, 9) < rank.get(header(chosen, "Action").lower(), 9):
            chosen = block
    if chosen is None:
        return None
    status = (ENHANCED.search(header(chosen, "Status")) or None)
    status_text = ".".join(status.groups()) if status else ""
    diagnostic = header(chosen, "Diagnostic-Code") or _body_text(message)[:600]
    action = header(chosen, "Action").lower() or "failed"
    if action in ("delivered", "relayed", "expanded"):
        kind, reason = "ignored", f"the report says {action}"
    else:
        kind, reason = decide(status_text, diagnostic, action)
        if not header(chosen, "Diagnostic-Code"):
            reason = status_text or reason
    return Verdict(kind, reason, True, status=status_text, recipients=tuple(dict.fromkeys(recipients)),
                   envid=envid)


def _from_text(message: Message) -> Verdict:
    """A non-standard bounce: flufl.bounce names the addresses, the text gives the class."""
    temporary, permanent = _flufl(message)
    text = _body_text(message)
    action = "delayed" if temporary and not permanent else "failed"
    if not permanent and not temporary and re.search(r"\bdelayed\b|still trying|will (continue|retry)|"
                                                     r"延迟|仍在尝试", text, re.I):
        action = "delayed"
    failed = [a.lower() for a in (*permanent, *temporary)]
    failed += [a.lower() for _, a in getaddresses([header(message, "X-Failed-Recipients")]) if "@" in a]
    kind, reason = decide("", _diagnostic(text), action)
    return Verdict(kind, reason, True, status=reason.split(" ", 1)[0] if reason[:1].isdigit() else "",
                   recipients=tuple(dict.fromkeys(failed)))


def _flufl(message: Message) -> tuple[list[str], list[str]]:
    try:
        from flufl.bounce import all_failures

        temporary, permanent = all_failures(message)
    except Exception:  # a detector choking on odd input: the text still decides
        return [], []
    decode = (lambda a: a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a))
    return ([decode(a) for a in temporary if "@" in decode(a)], [decode(a) for a in permanent if "@" in decode(a)])


def _diagnostic(text: str) -> str:
    """The line(s) of a bounce's text that say why: the first naming a status or a known cause."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    for pattern in (FAILURE, REPLY_CODE, HARD_TEXT, SOFT_TEXT, SENDER_TEXT):
        for index, line in enumerate(lines):
            if line and pattern.search(line):
                following = lines[index + 1] if index + 1 < len(lines) and lines[index + 1] else ""
                return f"{line} {following}".strip()[:600]
    return next((line for line in lines if line), "")[:600]


def _body_text(message: Message) -> str:
    """The report's human-readable text (text/plain, else text/html without tags), at most MAX_TEXT chars."""
    plain, html = [], []
    for part in walk(message):
        if sum(map(len, plain)) > MAX_TEXT:
            break
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html") or part.get_content_disposition() == "attachment":
            continue
        try:
            payload = part.get_payload(decode=True) or b""
            text = payload[:MAX_TEXT * 4].decode(part.get_content_charset() or "utf-8", "replace")
        except (LookupError, ValueError, AssertionError):
            text = raw_payload(part)
        (plain if ctype == "text/plain" else html).append(text)
    if plain:
        return "\n".join(plain)[:MAX_TEXT]
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", "\n".join(html), flags=re.S | re.I)
    text = re.sub(r"<br\s*/?>|</p>|</div>|</tr>", "\n", text, flags=re.I)
    return re.sub(r"<[^>]{0,2000}>", " ", text).replace("&nbsp;", " ")[:MAX_TEXT]


def raw_payload(part: Message) -> str:
    """A part's payload as stored, when decoding it failed (an unknown charset or transfer encoding)."""
    payload = part._payload if isinstance(part._payload, str) else ""  # get_payload() would decode again
    return payload[:MAX_TEXT]
