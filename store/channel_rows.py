"""The ledger's second channel: WeCom message deliveries added to an event after its expansion (a member
email could not reach, WECOM_MESSAGE=fallback), and the email outcomes that call for one.

An email delivery is "unreached" when it ended `failed` (for good) or `bounced`, or was `skipped` with
`no address` or `address suppressed: …`. Rows are added under the lock on the event's row, which every
writer of its deliveries takes first, and only where the event has no WeCom row for that member yet: a
member gets at most one message per event, whoever adds it and however often.
"""
from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store import recipients
from store.db import with_retries
from store.schema import deliveries, events

WECOM_PREFIX = "wecom:"
SUPPRESSED_PREFIX = "address suppressed:"
UNREACHED_FINAL = ("failed", "bounced")


def wecom_address(userid: str) -> str:
    """The ledger's address of a member on the wecom channel (userids are case-insensitive in WeCom)."""
    return WECOM_PREFIX + userid.lower()


def unreached_clause():
    """An email delivery email cannot (or did not) reach."""
    return sa.and_(deliveries.c.channel == "email", sa.or_(
        deliveries.c.status.in_(UNREACHED_FINAL),
        sa.and_(deliveries.c.status == "skipped",
                sa.or_(deliveries.c.reason == "no address",
                       deliveries.c.reason.like(SUPPRESSED_PREFIX + "%")))))


def unreached(engine: Engine, event_id: int) -> list:
    """(userid, name) of one event's email deliveries that did not reach their member."""
    with engine.connect() as conn:
        return conn.execute(sa.select(deliveries.c.userid, deliveries.c.name)
                            .where(deliveries.c.event_id == event_id, unreached_clause())
                            .order_by(deliveries.c.id)).all()


def events_with_unreached(engine: Engine, since: float, limit: int = 100) -> list[int]:
    """Events received since `since` with an email delivery that ended failed or bounced and no WeCom row for
    that member. (Skipped ones are decided in the event's own round; looking for them here would, the day
    fallback is turned on, message members about changes they were never going to hear of.)"""
    other = deliveries.alias("message")
    covered = sa.exists().where(other.c.event_id == deliveries.c.event_id,
                                other.c.address == sa.literal(WECOM_PREFIX).concat(sa.func.lower(deliveries.c.userid)))
    with engine.connect() as conn:
        first = conn.execute(sa.select(sa.func.min(events.c.id)).where(events.c.received_at >= since)).scalar()
        if first is None:
            return []
        return list(conn.execute(sa.select(deliveries.c.event_id).distinct()
                                 .where(deliveries.c.event_id >= first, deliveries.c.channel == "email",
                                        deliveries.c.status.in_(UNREACHED_FINAL), ~covered)
                                 .order_by(deliveries.c.event_id).limit(limit)).scalars())


def add_messages(engine: Engine, event_id: int, members: list[tuple[str, str]],
                 hold: recipients.Hold | None, now: float | None = None) -> int:
    """Add a pending WeCom delivery to `event_id` for each (userid, name) that has none (held for a digest
    when the digest says so); reopen the event if it had finished. Returns how many rows were added."""
    now = time.time() if now is None else now
    wanted = {wecom_address(userid): (userid, name) for userid, name in members}
    if not wanted:
        return 0
    if hold is not None:
        recipients.ensure_recipients(engine, list(wanted))

    def write():
        with engine.begin() as conn:
            # The event's row first, as expansion and the digests lock it before recipients.
            if not conn.execute(events.update().where(events.c.id == event_id)
                                .values(held_rows=events.c.held_rows)).rowcount:
                return 0
            have = set(conn.execute(sa.select(deliveries.c.address).where(
                deliveries.c.event_id == event_id, deliveries.c.address.in_(list(wanted)))).scalars())
            rows = [{"event_id": event_id, "userid": userid[:64], "name": name[:255], "address": address,
                     "channel": "wecom", "status": "pending", "reason": None, "attempts": 0,
                     "next_attempt_at": 0, "first_attempt_at": None, "digest_id": None}
                    for address, (userid, name) in sorted(wanted.items()) if address not in have]
            if not rows:
                return 0
            held = 0
            if hold is not None:
                rows, held = recipients.hold_rows(conn, rows, hold)
            for start in range(0, len(rows), 1000):
                conn.execute(deliveries.insert(), rows[start:start + 1000])
            pending = len(rows) > held
            finished = events.c.status.in_(("done", "held", "failed"))
            conn.execute(events.update().where(events.c.id == event_id).values(
                held_rows=events.c.held_rows + held,
                status=sa.case((sa.and_(finished, sa.literal(pending)), "sending"),
                               (finished, "held"), else_=events.c.status),
                next_attempt_at=sa.case((finished, now), else_=events.c.next_attempt_at),
                finished_at=sa.case((finished, None), else_=events.c.finished_at)))
            return len(rows)
    return with_retries(write)


def due_messages(engine: Engine, event_id: int, now: float) -> list:
    """The WeCom deliveries of one event that may be tried now, in id order (the order calls are cut in)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(deliveries.c.id, deliveries.c.address, deliveries.c.name, deliveries.c.userid,
                      deliveries.c.attempts, deliveries.c.first_attempt_at)
            .where(deliveries.c.event_id == event_id, deliveries.c.channel == "wecom",
                   deliveries.c.status.in_(("pending", "retry")), deliveries.c.next_attempt_at <= now)
            .order_by(deliveries.c.id)).all()


def mark_many(engine: Engine, delivery_ids: list[int], values: dict) -> int:
    """The same outcome on several open deliveries in one transaction (a sent row stays sent)."""
    def write():
        with engine.begin() as conn:
            return conn.execute(deliveries.update().where(deliveries.c.id.in_(delivery_ids),
                                                          deliveries.c.status.in_(("pending", "retry")))
                                .values(**values)).rowcount
    return with_retries(write) if delivery_ids else 0


def channel_counts(engine: Engine, event_ids: list[int] | None = None) -> dict[tuple[str, str], int]:
    """(channel, status) → deliveries, over every event or the given ones."""
    query = sa.select(deliveries.c.channel, deliveries.c.status, sa.func.count()).group_by(
        deliveries.c.channel, deliveries.c.status)
    if event_ids is not None:
        query = query.where(deliveries.c.event_id.in_(event_ids))
    with engine.connect() as conn:
        return {(channel, status): n for channel, status, n in conn.execute(query)}
