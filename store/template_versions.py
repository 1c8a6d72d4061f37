"""Every template saved through /admin/templates, in the state database: who, when, what; append only.

The template table itself (TEMPLATE_DATABASE_URL) has no history and may be shared with the original
flow, so the versions live here. Which version an event was rendered from is found by content: the newest
version of that change type whose title and body are the ones the worker loaded (NULL when none is).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import digests, events, template_versions

SAVE, ROLLBACK, ORIGINAL = "save", "rollback", "original"  # ORIGINAL: the row as found before the first save


@dataclass(frozen=True)
class TemplateVersion:
    id: int
    change_type: str
    title: str
    body: str
    saved_by: str
    saved_at: float
    action: str
    restored_from: int | None


def content_digest(title: str, body: str) -> str:
    """Which content a version holds: sha256 of title and body."""
    return hashlib.sha256(title.encode("utf-8") + b"\0" + body.encode("utf-8")).hexdigest()


def _version(row) -> TemplateVersion:
    return TemplateVersion(row.id, row.change_type, row.email_title, row.email_body, row.saved_by, row.saved_at,
                           row.action, row.restored_from)


def add(engine: Engine, app: str, change_type: str, title: str, body: str, saved_by: str, action: str = SAVE,
        restored_from: int | None = None) -> int:
    """Keep one version; returns its id."""
    row = {"app": app, "change_type": change_type, "email_title": title, "email_body": body,
           "digest": content_digest(title, body), "saved_by": saved_by[:64], "saved_at": time.time(),
           "action": action, "restored_from": restored_from}

    def insert():
        with engine.begin() as conn:
            return conn.execute(template_versions.insert(), row).inserted_primary_key[0]
    return with_retries(insert)


def keep_original(engine: Engine, app: str, change_type: str, title: str, body: str) -> None:
    """Before the first save of a change type, keep the row as found, so it can be restored too."""
    with engine.connect() as conn:
        known = conn.execute(sa.select(template_versions.c.id).where(
            template_versions.c.app == app, template_versions.c.change_type == change_type).limit(1)).first()
    if known is None:
        add(engine, app, change_type, title, body, "-", ORIGINAL)


def history(engine: Engine, app: str, change_type: str, limit: int = 50) -> list[TemplateVersion]:
    """The versions of one change type, newest first."""
    query = (sa.select(template_versions)
             .where(template_versions.c.app == app, template_versions.c.change_type == change_type)
             .order_by(template_versions.c.id.desc()).limit(limit))
    with engine.connect() as conn:
        return [_version(row) for row in conn.execute(query)]


def get(engine: Engine, app: str, version_id: int) -> TemplateVersion | None:
    """One version of `app`, or None."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(template_versions).where(template_versions.c.id == version_id,
                                                              template_versions.c.app == app)).first()
    return None if row is None else _version(row)


def matching(app: str, change_type: str, title: str, body: str):
    """A scalar subquery: the newest version of this content (NULL when there is none)."""
    return (sa.select(sa.func.max(template_versions.c.id))
            .where(template_versions.c.app == app, template_versions.c.change_type == change_type,
                   template_versions.c.digest == content_digest(title, body))
            .scalar_subquery())


def mark_event(engine: Engine, event_id: int, app: str, change_type: str, title: str, body: str) -> None:
    """Record on the event which version its message was rendered from (one statement)."""
    def write():
        with engine.begin() as conn:
            conn.execute(events.update().where(events.c.id == event_id)
                         .values(template_version=matching(app, change_type, title, body)))
    with_retries(write)


def mark_digest(engine: Engine, digest_id: int, app: str, title: str, body: str) -> None:
    """Record on a digest which version of the 'digest' row its wrapper was composed from (one statement)."""
    def write():
        with engine.begin() as conn:
            conn.execute(digests.update().where(digests.c.id == digest_id)
                         .values(template_version=matching(app, "digest", title, body)))
    with_retries(write)
