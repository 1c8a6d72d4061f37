"""Email templates: read from the original table, rendered with plain placeholders only."""
from __future__ import annotations

import string
from dataclasses import dataclass
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from store.schema import template_table
from wecom import MEMBER_FIELDS, ContactChange

# The original scenario's rows, bodies exactly as stored there: a two-character backslash-n.
ORIGINAL_ROWS = (
    ("create_user", "新增成员", "新增时间：{createtime}\\n 新增成员 ID：{userid}"),
    ("update_user", "更新成员", "更新时间：{createtime}\\n 更新成员 ID：{userid}"),
    ("delete_user", "删除成员", "删除时间：{createtime}\\n 删除成员 ID：{userid}"),
)
# The digest's row (DIGEST_WINDOW_SECONDS, QUIET_HOURS): `init-db --seed-templates` adds it beside the
# original three, and without it in the table the digest says the same (delivery/digest_message.py).
DIGEST_ROW = ("digest", "通讯录变更汇总：{count} 项 ({count} contact changes)",
              "{first_time} 至 {last_time} 共有 {count} 项通讯录变更：\\n"
              "{count} contact changes from {first_time} to {last_time}:\\n\\n{changes}")
SEEDED_ROWS = ORIGINAL_ROWS + (DIGEST_ROW,)
DEFAULT_TZ = "Asia/Shanghai"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
PLACEHOLDERS = ("createtime", "change_type", "changetype") + tuple(f.lower() for f in MEMBER_FIELDS)


@dataclass(frozen=True)
class EmailTemplate:
    title: str
    body: str


class RenderError(Exception):
    """A template that cannot be rendered; the message names the placeholder and is safe to store."""


def load_template(engine: Engine, table: str, app: str, change_type: str) -> EmailTemplate | None:
    """The (title, body) row for `app` and `change_type`, or None; only reads (the database may be read-only)."""
    t = template_table(table)
    query = (sa.select(t.c.email_title, t.c.email_body)
             .where(t.c.app == app, t.c.change_type == change_type).limit(1))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return None if row is None else EmailTemplate(row.email_title or "", row.email_body or "")


def load_templates(engine: Engine, table: str, app: str) -> dict[str, EmailTemplate]:
    """Every row of `app`, by change type (one read, for a digest that lists several kinds of change)."""
    t = template_table(table)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.change_type, t.c.email_title, t.c.email_body).where(t.c.app == app))
        return {row.change_type: EmailTemplate(row.email_title or "", row.email_body or "") for row in rows}


def seed_templates(engine: Engine, table: str, app: str) -> int:
    """Create the template table if missing and add the rows `app` lacks (the original three and the
    digest's); return rows added."""
    try:
        return _seed_once(engine, template_table(table), app)
    except IntegrityError:
        # Another process inserted the same rows at the same moment: look again, once.
        return _seed_once(engine, template_table(table), app)


def _seed_once(engine: Engine, t: sa.Table, app: str) -> int:
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateTable(t, if_not_exists=True))  # no check-then-create race
        # A pre-existing table may lack the unique key, so look before inserting.
        present = set(conn.execute(sa.select(t.c.change_type).where(t.c.app == app)).scalars())
        missing = [{"app": app, "change_type": change_type, "email_title": title, "email_body": body}
                   for change_type, title, body in SEEDED_ROWS if change_type not in present]
        if missing:
            conn.execute(t.insert(), missing)
    return len(missing)


def event_values(change: ContactChange, tz: tzinfo | None, name_fallback: str = "") -> dict[str, str]:
    """Every placeholder's value for this event; fields the event lacks are empty."""
    values = {name: "" for name in PLACEHOLDERS}
    values.update({key: str(value) for key, value in change.fields.items() if key in values})
    values["userid"] = change.user_id or values["userid"]
    values["name"] = values["name"] or name_fallback
    values["change_type"] = values["changetype"] = change.change_type
    values["createtime"] = format_time(change.create_time, tz)
    return values


def format_time(create_time: int | None, tz: tzinfo | None) -> str:
    """A CreateTime as `{createtime}` shows it: %Y-%m-%d %H:%M:%S in TIMEZONE ('' when the event has none)."""
    if create_time is None:
        return ""
    try:
        return datetime.fromtimestamp(create_time, tz or ZoneInfo(DEFAULT_TZ)).strftime(TIME_FORMAT)
    except (OverflowError, OSError, ValueError):
        return str(create_time)  # beyond datetime's range: show it as sent


def render(text: str, values: dict[str, str]) -> str:
    """Substitute `{name}` placeholders; anything but a plain known name raises RenderError."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:  # a lone { or }
        raise RenderError(f"template is malformed ({exc}): write a literal brace as {{{{ or }}}}") from None
    out = []
    for literal, name, spec, conversion in parts:
        # The stored rows hold a two-character \n; only template text is converted, never event data.
        out.append(literal.replace("\\r\\n", "\n").replace("\\n", "\n"))
        if name is None:
            continue
        shown = _placeholder(name, spec, conversion)
        if conversion is not None or spec or name not in values:
            raise RenderError(f"template placeholder {shown} is not allowed: use a plain name, one of "
                              + ", ".join("{%s}" % n for n in sorted(values)))
        out.append(values[name])
    return "".join(out)


def _placeholder(name: str, spec: str | None, conversion: str | None) -> str:
    text = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
    return text if len(text) <= 60 else text[:57] + "...}"


def render_email(template: EmailTemplate, change: ContactChange, tz: tzinfo | None,
                 name_fallback: str = "") -> tuple[str, str]:
    """(subject, body) for this event; the subject is one line so it can never add a header."""
    values = event_values(change, tz, name_fallback)
    lines = render(template.title, values).splitlines()
    return " ".join(line.strip() for line in lines if line.strip()), render(template.body, values)
