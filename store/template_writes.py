"""Writing the template table (TEMPLATE_DATABASE_URL) from /admin/templates, or saying why it cannot.

The worker reads that table on every event, so a save takes effect with the next event. The database user
may be allowed only to read it (the table is the original flow's): then nothing is written and the editor
shows the SQL that an administrator of that database can run instead.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from store.schema import template_table

# MySQL/MariaDB: 1142 command denied for the table, 1044/1045 access denied, 1290 --read-only,
# 1792 read-only transaction; SQLite: "attempt to write a readonly database".
DENIED_CODES = (1142, 1044, 1045, 1290, 1792)


class WriteDenied(Exception):
    """The database user may not write the template table; the message says what the database answered."""


def _denied(exc: DBAPIError) -> str | None:
    orig = exc.orig
    code = orig.args[0] if getattr(orig, "args", None) and isinstance(orig.args[0], int) else None
    text = str(orig.args[1] if code is not None and len(orig.args) > 1 else orig)
    if code in DENIED_CODES or "readonly" in text.lower() or "read-only" in text.lower():
        return f"{orig.__class__.__name__} {code or ''}: {text}".replace(" :", ":")[:300]
    return None


def write_denied(engine: Engine, table: str, app: str) -> str | None:
    """Why this database user may not change the table (a write that touches no row, rolled back), or None."""
    t = template_table(table)
    try:
        with engine.connect() as conn:
            with conn.begin() as transaction:
                conn.execute(t.update().where(sa.false()).values(email_title=t.c.email_title))
                conn.execute(t.insert().from_select(
                    ["app", "change_type", "email_title", "email_body"],
                    sa.select(t.c.app, t.c.change_type, t.c.email_title, t.c.email_body).where(sa.false())))
                transaction.rollback()
    except DBAPIError as exc:
        reason = _denied(exc)
        if reason is None:
            raise
        return reason
    return None


def save(engine: Engine, table: str, app: str, change_type: str, title: str, body: str) -> None:
    """Replace (or add) the row of `change_type`; WriteDenied when the user may not."""
    t = template_table(table)
    try:
        with engine.begin() as conn:
            changed = conn.execute(t.update().where(t.c.app == app, t.c.change_type == change_type)
                                   .values(email_title=title, email_body=body)).rowcount
            if not changed:
                present = conn.execute(sa.select(t.c.app).where(t.c.app == app, t.c.change_type == change_type)
                                       .limit(1)).first()  # MySQL counts only rows that changed
                if present is None:
                    conn.execute(t.insert(), {"app": app, "change_type": change_type, "email_title": title,
                                              "email_body": body})
    except DBAPIError as exc:
        reason = _denied(exc)
        if reason is None:
            raise
        raise WriteDenied(reason) from None


def _literal(value: str) -> str:
    """A MySQL string literal (default sql_mode: backslashes escaped, quotes doubled)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''").replace("\0", "\\0") + "'"


def sql_to_run(table: str, app: str, change_type: str, title: str, body: str, exists: bool) -> str:
    """The statement an administrator of the template database can run instead."""
    if exists:
        return (f"UPDATE {table} SET email_title = {_literal(title)},\n    email_body = {_literal(body)}\n"
                f"WHERE app = {_literal(app)} AND change_type = {_literal(change_type)};")
    return (f"INSERT INTO {table} (app, change_type, email_title, email_body)\nVALUES ({_literal(app)}, "
            f"{_literal(change_type)}, {_literal(title)},\n    {_literal(body)});")
