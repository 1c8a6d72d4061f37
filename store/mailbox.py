"""The bounce mailbox's position: per folder, its UIDVALIDITY and the last UID processed (wm_bounce_mailbox)."""
from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import bounce_mailbox, insert_ignore


@dataclass(frozen=True)
class Position:
    """Every message of `folder` with a UID up to `last_uid` (under `uidvalidity`) has been processed."""

    folder: str
    uidvalidity: int
    last_uid: int
    updated_at: float


def position(engine: Engine, folder: str) -> Position | None:
    """Where the poll of `folder` stands, or None before its first poll."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(bounce_mailbox).where(bounce_mailbox.c.folder == folder)).first()
    return None if row is None else Position(row.folder, int(row.uidvalidity), int(row.last_uid),
                                             float(row.updated_at))


def save_position(engine: Engine, folder: str, uidvalidity: int, last_uid: int, now: float) -> None:
    """Record that every message up to `last_uid` under `uidvalidity` has been processed."""
    values = {"uidvalidity": uidvalidity, "last_uid": last_uid, "updated_at": now}

    def write():
        with engine.begin() as conn:
            updated = conn.execute(bounce_mailbox.update().where(bounce_mailbox.c.folder == folder)
                                   .values(**values)).rowcount
            if not updated:
                conn.execute(insert_ignore(bounce_mailbox), {"folder": folder, **values})
    with_retries(write)
