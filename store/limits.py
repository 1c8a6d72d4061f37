"""The provider's limits as rows, so that every process on one DATABASE_URL counts against the same numbers."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import insert_ignore, limit_locks, send_days, send_log

# A message is counted when it is handed over, a little before it arrives at the server: one second of
# margin keeps every 60 s window at the server within SMTP_MAX_PER_MINUTE.
WINDOW_SECONDS = 61.0


def take_minute_slot(engine: Engine, limit: int, now: float) -> float | None:
    """Count one message in the rolling minute if fewer than `limit` were; else when a slot frees up."""
    def attempt():
        with engine.begin() as conn:
            # Updating the lock row first makes the count and the insert of two processes take turns.
            conn.execute(limit_locks.update().where(limit_locks.c.name == "minute")
                         .values(ticks=limit_locks.c.ticks + 1))
            count, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(send_log.c.sent_at))
                                         .where(send_log.c.sent_at > now - WINDOW_SECONDS)).one()
            if count >= limit:
                return oldest + WINDOW_SECONDS
            conn.execute(send_log.insert(), {"sent_at": now})
            if count == 0:  # a quiet moment: forget what no window can see any more
                conn.execute(send_log.delete().where(send_log.c.sent_at <= now - WINDOW_SECONDS))
            return None
    return with_retries(attempt)


def take_day_slot(engine: Engine, limit: int, day: str) -> bool:
    """Count one message on `day` (YYYY-MM-DD in TIMEZONE) unless `limit` were counted already."""
    def attempt():
        with engine.begin() as conn:
            counted = conn.execute(send_days.update()
                                   .where(send_days.c.day == day, send_days.c.sent < limit)
                                   .values(sent=send_days.c.sent + 1)).rowcount
            if counted:
                return True
            if conn.execute(sa.select(send_days.c.sent).where(send_days.c.day == day)).first() is not None:
                return False
            return conn.execute(insert_ignore(send_days), {"day": day, "sent": 1}).rowcount == 1 or None
    for _ in range(3):  # None: another process created the day's row at the same moment; count again
        taken = with_retries(attempt)
        if taken is not None:
            return taken
    return False


def sent_on(engine: Engine, day: str) -> int:
    """How many messages were counted on `day`."""
    with engine.connect() as conn:
        return conn.execute(sa.select(send_days.c.sent).where(send_days.c.day == day)).scalar() or 0
