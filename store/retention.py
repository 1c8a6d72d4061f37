"""Retention (RETENTION_DAYS): finished events older than the limit deleted with their deliveries and digests,
in small batches, each its own short transaction, so that a callback never waits behind a long delete.

What may go, and why it is safe:
- an event whose status is final (done, failed, skipped, ignored) and which finished (or, never expanded,
  was received) before the cutoff; `sending`, `pending` and `held` events are never touched;
- its deliveries only while they are final (sent, failed, skipped): a delivery requeued meanwhile (`retry`)
  stays, and so does its event, since an event is deleted only once no delivery of it is left;
- a digest that is final (sent, failed, merged), older than the cutoff, that no remaining delivery names;
- the membership row of someone who left before the cutoff: it guards nothing any more (a resent leave of
  an unknown userid announces nothing either, and a return is a join whether the row is there or not), and
  without this every leaver in the life of the service would keep a row (bench/steady.py found it).
The cutoff is at least a day back, and WeCom resends a callback within minutes: a dedup key it could still
resend is never deleted.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import deliveries, digests, events, membership

EVENT_FINAL = ("done", "failed", "skipped", "ignored")
DELIVERY_FINAL = ("sent", "failed", "skipped")
DIGEST_FINAL = ("sent", "failed", "merged")
MIN_AGE_SECONDS = 86400  # never younger than a day, whatever is asked: WeCom's resends come within minutes
EVENTS_PER_BATCH = 50
ROWS_PER_DELETE = 500  # one DELETE, one transaction: a few milliseconds on InnoDB


@dataclass
class Pruned:
    """What one pruning run deleted."""

    events: int = 0
    deliveries: int = 0
    digests: int = 0
    members: int = 0  # membership rows of people who left before the cutoff
    batches: int = 0
    complete: bool = True  # False: stopped early (time up, or asked to stop); the next run goes on
    seconds: float = field(default=0.0)

    def summary(self) -> str:
        """One line for the log and `check`."""
        return (f"{self.events} event(s), {self.deliveries} delivery(ies), {self.digests} digest(s), "
                f"{self.members} leaver(s) deleted "
                f"in {self.batches} batch(es), {self.seconds:.1f} s" + ("" if self.complete else "; more left"))


def cutoff(days: int, now: float) -> float:
    """The time before which finished rows may go (at least MIN_AGE_SECONDS back)."""
    return now - max(days * 86400, MIN_AGE_SECONDS)


def _old_finished_events(before: float):
    """Final events that finished before `before` (those finished without a time: received before it)."""
    return sa.and_(events.c.status.in_(EVENT_FINAL), events.c.received_at < before,
                   sa.func.coalesce(events.c.finished_at, events.c.received_at) < before)


def prune(engine: Engine, days: int, now: float | None = None, stop: threading.Event | None = None,
          deadline: float | None = None, pause: float = 0.0, yield_factor: float = 0.0) -> Pruned:
    """Delete what RETENTION_DAYS lets go, batch after batch, until nothing is left, `stop` is set or the
    monotonic `deadline` passes. Between two transactions it waits `pause` seconds, or `yield_factor` times
    as long as the last one took if that is longer: the callbacks' commits get the database meanwhile (with 3,
    pruning holds it a quarter of the time at most, however slow the server is)."""
    started = time.monotonic()
    result = Pruned()
    last = [time.monotonic()]

    def rest() -> None:
        took = time.monotonic() - last[0]
        wait = max(pause, took * yield_factor)
        if wait > 0:
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
        last[0] = time.monotonic()
    if days <= 0:
        return result
    before = cutoff(days, time.time() if now is None else now)

    def halted() -> bool:
        return (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() > deadline)

    cursor = (0.0, 0)  # (received_at, id) of the last event looked at: one left behind is not read again
    while True:
        if halted():
            result.complete = False
            break
        received, last_id = cursor
        with engine.connect() as conn:
            found = conn.execute(
                sa.select(events.c.id, events.c.received_at)
                .where(_old_finished_events(before),
                       sa.or_(events.c.received_at > received,
                              sa.and_(events.c.received_at == received, events.c.id > last_id)))
                .order_by(events.c.received_at, events.c.id).limit(EVENTS_PER_BATCH)).all()
        if not found:
            break
        ids = [row.id for row in found]
        cursor = (found[-1].received_at, found[-1].id)
        while not halted():
            deleted = _delete_deliveries(engine, ids)
            result.deliveries += deleted
            result.batches += 1
            rest()
            if deleted < ROWS_PER_DELETE:
                break
        if halted():
            result.complete = False
            break
        result.events += _delete_events(engine, ids, before)
        result.batches += 1
        rest()
    for delete, counter in ((_delete_digests, "digests"), (_delete_leavers, "members")):
        while result.complete:  # batch after batch, until one comes back short
            if halted():
                result.complete = False
                break
            deleted = delete(engine, before)
            setattr(result, counter, getattr(result, counter) + deleted)
            result.batches += 1
            if deleted < ROWS_PER_DELETE:
                break
            rest()
    result.seconds = time.monotonic() - started
    return result


def _delete_deliveries(engine: Engine, event_ids: list[int]) -> int:
    """Up to ROWS_PER_DELETE final deliveries of these events, in one transaction."""
    def write():
        with engine.begin() as conn:
            ids = conn.execute(sa.select(deliveries.c.id)
                               .where(deliveries.c.event_id.in_(event_ids), deliveries.c.status.in_(DELIVERY_FINAL))
                               .limit(ROWS_PER_DELETE)).scalars().all()
            if not ids:
                return 0
            # The status again in the DELETE: a row requeued since the SELECT stays.
            return conn.execute(deliveries.delete().where(deliveries.c.id.in_(ids),
                                                          deliveries.c.status.in_(DELIVERY_FINAL))).rowcount
    return with_retries(write)


def _delete_events(engine: Engine, event_ids: list[int], before: float) -> int:
    """These events, where still final and old, and none of their deliveries is left."""
    left = sa.exists().where(deliveries.c.event_id == events.c.id)

    def write():
        with engine.begin() as conn:
            return conn.execute(events.delete().where(events.c.id.in_(event_ids), _old_finished_events(before),
                                                      ~left)).rowcount
    return with_retries(write)


def _delete_digests(engine: Engine, before: float) -> int:
    """Up to ROWS_PER_DELETE final, old digests no delivery names any more."""
    named = sa.exists().where(deliveries.c.digest_id == digests.c.id)
    old = sa.and_(digests.c.status.in_(DIGEST_FINAL),
                  sa.func.coalesce(digests.c.sent_at, digests.c.created_at) < before, ~named)

    def write():
        with engine.begin() as conn:
            ids = conn.execute(sa.select(digests.c.id).where(old).limit(ROWS_PER_DELETE)).scalars().all()
            if not ids:
                return 0
            return conn.execute(digests.delete().where(digests.c.id.in_(ids), old)).rowcount
    return with_retries(write)


def _delete_leavers(engine: Engine, before: float) -> int:
    """Up to ROWS_PER_DELETE membership rows of people who left before `before`. The keys are read first
    (a plain read locks nothing), then deleted by key with the condition again: a DELETE that scanned the
    table itself would lock every row it looked at, and a callback marking a member would wait for it."""
    gone = sa.and_(membership.c.state == "left", membership.c.announced_at < before)

    def write():
        with engine.begin() as conn:
            keys = conn.execute(sa.select(membership.c.department_id, membership.c.userid).where(gone)
                                .limit(ROWS_PER_DELETE)).all()
            if not keys:
                return 0
            return conn.execute(membership.delete().where(
                sa.tuple_(membership.c.department_id, membership.c.userid).in_([tuple(k) for k in keys]),
                gone)).rowcount
    return with_retries(write)


# --- what `check` shows -----------------------------------------------------------------------

@dataclass(frozen=True)
class TableSize:
    """A table's row count and its oldest row's time (None when empty)."""

    table: str
    rows: int
    oldest: float | None


def table_sizes(engine: Engine) -> list[TableSize]:
    """Row counts and the oldest row kept of the tables retention bounds."""
    with engine.connect() as conn:
        sizes = []
        for table, column in ((events, events.c.received_at), (deliveries, None), (digests, digests.c.created_at)):
            count = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0
            if column is None:  # a delivery's age is its event's
                oldest = conn.execute(sa.select(sa.func.min(events.c.received_at))
                                      .where(events.c.id == sa.select(sa.func.min(deliveries.c.event_id))
                                             .scalar_subquery())).scalar()
            else:
                oldest = conn.execute(sa.select(sa.func.min(column))).scalar()
            sizes.append(TableSize(table.name, count, oldest))
        return sizes
