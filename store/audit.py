"""The audit log: who did what, when and from where; append only, written by /admin and the CLI alike."""
from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from logs import escape_controls as clean
from store.db import with_retries
from store.schema import audit_log

CLI = "cli"  # the actor of a command run on the server
TOKEN = "token"  # the actor of a session opened with ADMIN_TOKEN (break-glass)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    client: str
    action: str
    target: str
    detail: str


def _short(value: object, limit: int) -> str:
    """One printable line of at most `limit` characters: control characters escaped, the rest cut."""
    text = clean(str(value if value is not None else ""))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record(engine: Engine, actor: str, action: str, target: object = "", detail: object = "",
           client: str = "") -> None:
    """Append one row. `detail` is a short summary chosen by the caller: never a secret or a whole body."""
    row = {"at": time.time(), "actor": _short(actor, 64), "client": _short(client, 64),
           "action": _short(action, 32), "target": _short(target, 255), "detail": _short(detail, 255)}

    def insert():
        with engine.begin() as conn:
            conn.execute(audit_log.insert(), row)
    with_retries(insert)


def entries(engine: Engine, since: float | None = None, actor: str | None = None, action: str | None = None,
            limit: int = 200) -> list[AuditEntry]:
    """Rows newest first, optionally since a time and for one actor and/or action."""
    query = sa.select(audit_log).order_by(audit_log.c.at.desc(), audit_log.c.id.desc()).limit(limit)
    if since is not None:
        query = query.where(audit_log.c.at >= since)
    if actor:
        query = query.where(audit_log.c.actor == actor)
    if action:
        query = query.where(audit_log.c.action == action)
    with engine.connect() as conn:
        return [AuditEntry(r.id, r.at, r.actor, r.client, r.action, r.target, r.detail)
                for r in conn.execute(query)]


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one()
