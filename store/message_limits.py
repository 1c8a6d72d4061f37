"""WeCom application messages' limits as rows, so every process on one DATABASE_URL counts against the same
numbers: per person (WeCom silently drops beyond 30 a minute or 1,000 an hour to one member) and per day
(WECOM_MESSAGE_MAX_PER_DAY recipients per calendar day in TIMEZONE)."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import insert_ignore, limit_locks, message_days, message_log

PER_MINUTE, PER_HOUR = 30, 1000  # WeCom's per app and member; beyond them a message is dropped without a word
# Counted when the call is made, a little before WeCom counts it: a second of margin on each window.
MINUTE, HOUR = 61.0, 3601.0
LOCK = "wecom_people"
CHUNK = 1000


def take_people(engine: Engine, addresses: list[str], now: float, per_minute: int = PER_MINUTE,
                per_hour: int = PER_HOUR) -> dict[str, float]:
    """Count one message now for each address under both limits; return those that are not, each with the
    time its next slot frees up. Every process takes turns on one lock row, so no person is counted past a
    limit by two processes at once."""
    refused: dict[str, float] = {}

    def attempt():
        refused.clear()
        with engine.begin() as conn:
            if not conn.execute(limit_locks.update().where(limit_locks.c.name == LOCK)
                                .values(ticks=limit_locks.c.ticks + 1)).rowcount:
                conn.execute(insert_ignore(limit_locks), {"name": LOCK, "ticks": 1})
            recent = message_log.c.sent_at > now - MINUTE
            for start in range(0, len(addresses), CHUNK):
                chunk = addresses[start:start + CHUNK]
                for address, hour_count, hour_oldest, minute_count, minute_oldest in conn.execute(
                        sa.select(message_log.c.address, sa.func.count(), sa.func.min(message_log.c.sent_at),
                                  sa.func.sum(sa.case((recent, 1), else_=0)),
                                  sa.func.min(sa.case((recent, message_log.c.sent_at), else_=None)))
                        .where(message_log.c.address.in_(chunk), message_log.c.sent_at > now - HOUR)
                        .group_by(message_log.c.address)):
                    if hour_count >= per_hour:
                        refused[address] = hour_oldest + HOUR
                    elif (minute_count or 0) >= per_minute:
                        refused[address] = minute_oldest + MINUTE
            taken = [{"address": a, "sent_at": now} for a in addresses if a not in refused]
            for start in range(0, len(taken), CHUNK):
                conn.execute(message_log.insert(), taken[start:start + CHUNK])
            # What no window can see any more (the index on sent_at keeps this a short range delete).
            conn.execute(message_log.delete().where(message_log.c.sent_at <= now - HOUR))
    with_retries(attempt)
    return dict(refused)


def take_day(engine: Engine, limit: int, day: str, wanted: int) -> int:
    """Count up to `wanted` recipients on `day` (YYYY-MM-DD in TIMEZONE) without passing `limit`; how many."""
    def attempt():
        with engine.begin() as conn:
            conn.execute(insert_ignore(message_days), {"day": day, "sent": 0})
            sent = conn.execute(sa.select(message_days.c.sent).where(message_days.c.day == day)
                                .with_for_update()).scalar() or 0
            granted = max(0, min(wanted, limit - sent))
            if granted:
                conn.execute(message_days.update().where(message_days.c.day == day)
                             .values(sent=message_days.c.sent + granted))
            return granted
    return with_retries(attempt)


def sent_on(engine: Engine, day: str) -> int:
    """How many message recipients were counted on `day`."""
    with engine.connect() as conn:
        return conn.execute(sa.select(message_days.c.sent).where(message_days.c.day == day)).scalar() or 0
