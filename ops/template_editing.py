"""What /admin/templates checks and previews: the worker's own renderer, on a sample or a recent real event.

Nothing here writes. A preview is exactly what the worker would send for that event (templates_repo.py),
or the render error it would record on the event; `check` refuses what the template table cannot hold or
what the worker could not render, so nothing is saved that fails later.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import sqlalchemy as sa

import templates_repo
import wecom
from delivery.digest_message import SEPARATOR
from store.schema import events

DIGEST = "digest"
HANDLED = (*wecom.MEMBER_CHANGES, DIGEST)  # the change types the service renders a template for
CHANGE_TYPE = re.compile(r"[a-z_]{1,32}")
TITLE_MAX = 255  # the template table's email_title is VARCHAR(255)
BODY_MAX_BYTES = 60_000  # its email_body is TEXT: 65,535 bytes, UTF-8
RECENT = 10  # real events offered for the preview
SAMPLE_USERID, SAMPLE_NAME, SAMPLE_TIME = "zhangsan", "张三", 1700000000  # 2023-11-15 06:13:20 Asia/Shanghai
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, LF and CR are text; the rest is not


@dataclass(frozen=True)
class Preview:
    """What the worker would send (subject, body), or the error it would record."""
    subject: str = ""
    body: str = ""
    error: str | None = None


@dataclass(frozen=True)
class RecentEvent:
    id: int
    user_id: str
    create_time: int | None
    xml: str


def check(title: str, body: str) -> str | None:
    """Why this title and body cannot be stored as they are (size, control characters), or None."""
    if "\r" in title or "\n" in title:
        return "标题须为一行 The title must be one line (no line breaks)"
    if len(title) > TITLE_MAX:
        return f"标题过长 The title is {len(title)} characters: at most {TITLE_MAX}"
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > BODY_MAX_BYTES:
        return f"正文过长 The body is {size:,} bytes: at most {BODY_MAX_BYTES:,} (the table's TEXT column)"
    if _CONTROL.search(title) or _CONTROL.search(body):
        return "含有控制字符 Control characters are not allowed (only line breaks and tabs in the body)"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in title + body):
        return "含有无效字符 Invalid characters (lone surrogates) are not allowed"
    return None


def sample_change(settings, change_type: str) -> wecom.ContactChange:
    """A made-up event of `change_type` in the first watched department."""
    kind = change_type if change_type in wecom.MEMBER_CHANGES else "create_user"
    return wecom.parse_event(wecom.event_xml(kind, SAMPLE_USERID, settings.corp_id, str(settings.department_ids[0]),
                                             create_time=SAMPLE_TIME, name=SAMPLE_NAME))


def recent_events(engine, change_type: str, limit: int = RECENT) -> list[RecentEvent]:
    """The latest real events of `change_type` (not test sends), newest first."""
    query = (sa.select(events.c.id, events.c.user_id, events.c.create_time, events.c.xml)
             .where(events.c.change_type == change_type, events.c.source != "test")
             .order_by(events.c.id.desc()).limit(limit))
    with engine.connect() as conn:
        return [RecentEvent(*row) for row in conn.execute(query)]


def preview(settings, change_type: str, title: str, body: str, change: wecom.ContactChange | None = None,
            templates: dict | None = None) -> Preview:
    """Render as the worker would: a member change with `change` (default: the sample), the digest with two
    sample changes each rendered by its own template in `templates`."""
    template = templates_repo.EmailTemplate(title, body)
    try:
        if change_type == DIGEST:
            values = _digest_values(settings, templates or {})
            lines = templates_repo.render(title, values).splitlines()
            subject = " ".join(line.strip() for line in lines if line.strip())
            return Preview(subject, templates_repo.render(body, values))
        change = change or sample_change(settings, change_type)
        subject, text = templates_repo.render_email(template, change, settings.tz, SAMPLE_NAME if change.user_id ==
                                                    SAMPLE_USERID else "")
        return Preview(subject, text)
    except templates_repo.RenderError as exc:
        return Preview(error=f"template error: {exc}")  # word for word what the worker records


def _digest_values(settings, templates: dict) -> dict[str, str]:
    parts = []
    for kind in ("create_user", "update_user"):
        stored = templates.get(kind)
        if stored is None:
            parts.append(f"{kind} · {SAMPLE_USERID}")
            continue
        try:
            subject, text = templates_repo.render_email(stored, sample_change(settings, kind), settings.tz, SAMPLE_NAME)
            parts.append(f"{subject}\n{text}")
        except templates_repo.RenderError:
            parts.append(f"{kind} · {SAMPLE_USERID}")
    when = templates_repo.format_time(SAMPLE_TIME, settings.tz)
    return {"count": str(len(parts)), "changes": SEPARATOR.join(parts), "first_time": when, "last_time": when}
