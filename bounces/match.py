"""Which of our mails a report is about: the VERP tag of the address it came back to, the DSN's ENVID, or the
Message-ID of the returned message (its message/rfc822 or text/rfc822-headers part, or quoted in the text of
a non-standard 退信). Every tag's MAC is checked (in constant time, bounces/tags.py): a forged one names
nothing."""
from __future__ import annotations

import re
from dataclasses import dataclass
from email import message_from_string
from email.message import Message

from bounces import tags
from bounces.classify import MAX_TEXT, raw_payload, header, walk

RETURNED_TO = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")
QUOTED_ID = re.compile(r"Message-ID:\s*<?([^\s<>]{1,250})>?", re.I)


@dataclass(frozen=True)
class Match:
    """What a report names (None: nothing of ours), how it was found, and whether a tag with a wrong MAC
    was seen (a forgery, or mail of another installation)."""
    named: tags.Named | None
    via: str = ""
    forged: bool = False


def find(key: bytes, message: Message, envid: str = "") -> Match:
    """The delivery or digest `message` reports on."""
    forged = False
    for via, texts in (("VERP address", _returned_to(message)), ("ENVID", [envid]),
                       ("returned Message-ID", _returned_ids(message)), ("quoted Message-ID", _quoted_ids(message))):
        for text in texts:
            named, bad = tags.find(key, text)
            forged = forged or bad
            if named is not None:
                return Match(named, via, forged)
    return Match(None, "", forged)


def _returned_to(message: Message) -> list[str]:
    """The addresses the report was delivered to: a VERP tag sits in the local part."""
    values = []
    for name in RETURNED_TO:
        values += [str(v)[:1000] for v in (message.get_all(name) or [])[:20]]
    return values


def _returned_ids(message: Message) -> list[str]:
    """Message-IDs of the returned message: a message/rfc822 part's headers, or a text/rfc822-headers part."""
    found = []
    for part in walk(message):
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else payload
            if isinstance(inner, Message):
                found.append(header(inner, "Message-ID"))
        elif ctype in ("text/rfc822-headers", "text/global-headers"):
            try:
                text = (part.get_payload(decode=True) or b"")[:MAX_TEXT].decode("utf-8", "replace")
            except (ValueError, AssertionError):
                text = raw_payload(part)
            found.append(header(message_from_string(text), "Message-ID"))
    return [f for f in found if f]


def _quoted_ids(message: Message) -> list[str]:
    """`Message-ID: <…>` lines quoted in the report's own text (a non-standard 退信 pastes them)."""
    ids = []
    for part in walk(message):
        if part.get_content_maintype() != "text":
            continue
        try:
            text = (part.get_payload(decode=True) or b"")[:MAX_TEXT].decode(part.get_content_charset() or "utf-8",
                                                                            "replace")
        except (LookupError, ValueError, AssertionError):
            continue
        ids += [m.group(1) for m in QUOTED_ID.finditer(text)][:20]
    return ids
