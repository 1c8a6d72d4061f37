"""The bounce corpus (tests/data/bounces/): a message with its placeholders filled in."""
from __future__ import annotations

from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bounces"


def load(name: str, rcpt: str = "wangwu@corp.example", tag: str = "", msgid: str = "<x@corp.example>",
         report_id: str | None = None) -> bytes:
    """Corpus message `name` about the mail `msgid` (tag `tag`) sent to `rcpt`; its own Message-ID names it."""
    text = (CORPUS / name).read_bytes()
    for placeholder, value in ((b"@@RCPT@@", rcpt), (b"@@TAG@@", tag), (b"@@MSGID@@", msgid),
                               (b"@@ID@@", f"{report_id or 'report.' + name}@relay.corp.example")):
        text = text.replace(placeholder, value.encode())
    return text
