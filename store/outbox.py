"""The outbox: events claimed with leases, expanded into deliveries, marked one by one (recording: recording.py)."""
from __future__ import annotations

import threading
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from store import recipients
from store.db import with_retries
from store.schema import DELIVERY_OPEN, EVENT_OPEN, deliveries, events, insert_ignore

# --- claiming events -----------------------------------------------------------------------

def _lease_free(now: float):
    return sa.or_(events.c.lease_until.is_(None), events.c.lease_until < now)


def claim_event(engine: Engine, owner: str, lease_seconds: float, now: float | None = None):
    """Take the next due event with a lease (compare-and-set), or None. Any number of processes may call this."""
    now = time.time() if now is None else now
    with engine.connect() as conn:
        candidates = conn.execute(
            sa.select(events.c.id)
            .where(events.c.status.in_(EVENT_OPEN), events.c.next_attempt_at <= now, _lease_free(now))
            .order_by(events.c.next_attempt_at, events.c.id).limit(8)).scalars().all()
    for event_id in candidates:
        def take():
            with engine.begin() as conn:
                return conn.execute(
                    events.update()
                    .where(events.c.id == event_id, events.c.status.in_(EVENT_OPEN), _lease_free(now))
                    .values(lease_owner=owner, lease_until=now + lease_seconds)).rowcount
        if with_retries(take) == 1:
            with engine.connect() as conn:
                return conn.execute(sa.select(events).where(events.c.id == event_id)).first()
    return None


def renew_lease(engine: Engine, event_id: int, owner: str, lease_seconds: float, now: float | None = None) -> bool:
    """Extend our lease; False when another process has taken the event over."""
    def renew():
        with engine.begin() as conn:
            return conn.execute(events.update()
                                .where(events.c.id == event_id, events.c.lease_owner == owner)
                                .values(lease_until=(time.time() if now is None else now) + lease_seconds)).rowcount
    return with_retries(renew) == 1


def update_event(engine: Engine, event_id: int, owner: str, release: bool = True, **values) -> bool:
    """Write our outcome to an event we hold, releasing the lease; False if we no longer hold it."""
    if release:
        values.update(lease_owner=None, lease_until=None)

    def write():
        with engine.begin() as conn:
            return conn.execute(events.update()
                                .where(events.c.id == event_id, events.c.lease_owner == owner)
                                .values(**values)).rowcount
    return with_retries(write) == 1


# --- deliveries ----------------------------------------------------------------------------

def expand_event(engine: Engine, event_id: int, owner: str, subject: str, body: str,
                 rows: list[dict], now: float | None = None, hold: recipients.Hold | None = None) -> bool:
    """Write one delivery row per recipient and move the event to `sending`, in one transaction; with
    `hold` (the digest is on) each recipient's row is decided there too: at once, or held for a digest."""
    now = time.time() if now is None else now
    for row in rows:
        row.setdefault("reason", None)
        row.setdefault("address_source", None)
        row.update(event_id=event_id, attempts=0, next_attempt_at=0, digest_id=None)
        if row["status"] != "pending":
            row["first_attempt_at"] = now
        else:
            row.setdefault("first_attempt_at", None)
    if hold is not None:
        recipients.ensure_recipients(engine, [r["address"] for r in rows if r["status"] == "pending"])

    def write():
        with engine.begin() as conn:
            ours = conn.execute(events.update()
                                .where(events.c.id == event_id, events.c.lease_owner == owner,
                                       events.c.status == "pending")
                                .values(status="sending", subject=subject, body=body, reason=None)).rowcount
            if ours != 1:
                conn.rollback()
                return False
            written, held_rows = rows, 0
            if hold is not None:  # after the event's row: every transaction locks events before recipients
                written, held_rows = recipients.hold_rows(conn, rows, hold)
            for start in range(0, len(written), 1000):
                conn.execute(insert_ignore(deliveries), written[start:start + 1000])
            if held_rows:
                conn.execute(events.update().where(events.c.id == event_id).values(held_rows=held_rows))
            return True
    return with_retries(write)


def due_deliveries(engine: Engine, event_id: int, now: float | None = None) -> list:
    """The deliveries of one event that may be tried now."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(deliveries.c.id, deliveries.c.address, deliveries.c.name, deliveries.c.userid,
                      deliveries.c.attempts, deliveries.c.first_attempt_at)
            .where(deliveries.c.event_id == event_id, deliveries.c.status.in_(DELIVERY_OPEN),
                   deliveries.c.next_attempt_at <= (time.time() if now is None else now))
            .order_by(deliveries.c.id)).all()


class DeliveryMarks:
    """Delivery outcomes of a sending round over one database connection of their own, every UPDATE
    autocommitted, so a mark is durable when mark() returns after one round trip (no pool checkout and ping,
    no separate COMMIT). Whichever thread records takes the connection in turn: with SMTP_CONNECTIONS up to
    32, a connection per thread would outgrow the pool."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._conn = None
        self._lock = threading.Lock()

    # Built once: the columns set come from the parameters, so per mark only the values change; the
    # status list is rendered inline (literal_execute), sparing the per-execution expansion of IN.
    _statement = (deliveries.update()
                  .where(deliveries.c.id == sa.bindparam("delivery_id"),
                         deliveries.c.status.in_(sa.bindparam("open_statuses", list(DELIVERY_OPEN),
                                                              literal_execute=True))))

    def mark(self, delivery_id: int, **values) -> None:
        """Record one delivery's outcome; only an open row changes (a sent row stays sent)."""
        self._execute(self._statement, {"delivery_id": delivery_id, **values})

    # Every sent mark alike (attempts and first attempt follow from the row), so any number in one UPDATE.
    _sent_statement = (deliveries.update()
                       .where(deliveries.c.id.in_(sa.bindparam("delivery_ids", expanding=True)),
                              deliveries.c.status.in_(sa.bindparam("open_statuses", list(DELIVERY_OPEN),
                                                                   literal_execute=True)))
                       .values(status="sent", sent_at=sa.bindparam("now"), attempts=deliveries.c.attempts + 1,
                               first_attempt_at=sa.func.coalesce(deliveries.c.first_attempt_at,
                                                                 sa.bindparam("now")),
                               reason=None))

    def mark_sent(self, delivery_ids: list[int], now: float) -> None:
        """Mark deliveries sent in one autocommitted UPDATE (open ones only)."""
        self._execute(self._sent_statement, {"delivery_ids": list(delivery_ids), "now": now})

    def _execute(self, statement, parameters: dict) -> None:
        def write():
            with self._lock:
                if self._conn is None:
                    self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                try:
                    self._conn.execute(statement, parameters)
                except DBAPIError:
                    conn, self._conn = self._conn, None  # the next try starts from a fresh connection
                    conn.close()
                    raise
        with_retries(write)

    def close(self) -> None:
        """Give the connection back to the pool."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def postpone_untried(engine: Engine, event_id: int, until: float, give_up_before: float | None = None,
                     reason: str = "", now: float | None = None) -> None:
    """Deliveries a stopped round left untried (no connection, throttled) share one retry time with the ones that
    were refused. Their RETRY_MAX_HOURS clock starts with this round, and those whose clock started before
    `give_up_before` fail with `reason`."""
    now = time.time() if now is None else now
    untried = (deliveries.c.event_id == event_id, deliveries.c.status.in_(DELIVERY_OPEN),
               deliveries.c.next_attempt_at <= now)

    def write():
        with engine.begin() as conn:
            if give_up_before is not None:
                conn.execute(deliveries.update().where(*untried, deliveries.c.first_attempt_at < give_up_before)
                             .values(status="failed", reason=reason[:1000]))
            conn.execute(deliveries.update().where(*untried)
                         .values(next_attempt_at=until,
                                 first_attempt_at=sa.func.coalesce(deliveries.c.first_attempt_at, now)))
    with_retries(write)


def wait_for_quota(engine: Engine, event_id: int, until: float, reason: str, now: float) -> int:
    """Deliveries left untried because a daily quota is used up wait until `until` with `reason`. Waiting is
    no attempt and does not count towards RETRY_MAX_HOURS: a started clock moves on by the wait."""
    untried = (deliveries.c.event_id == event_id, deliveries.c.status.in_(DELIVERY_OPEN),
               deliveries.c.next_attempt_at <= now)

    def write():
        with engine.begin() as conn:
            return conn.execute(deliveries.update().where(*untried).values(
                status="retry", next_attempt_at=until, reason=reason[:1000],
                first_attempt_at=deliveries.c.first_attempt_at + (until - now))).rowcount
    return with_retries(write)


def counts_reason(counts: dict[str, int]) -> str:
    """An event's reason from its delivery counts: '3 sent, 1 skipped'."""
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


def delivery_counts(engine: Engine, event_id: int) -> dict[str, int]:
    """Deliveries of one event by status."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(deliveries.c.status, sa.func.count())
                            .where(deliveries.c.event_id == event_id)
                            .group_by(deliveries.c.status)).all()
    return {status: count for status, count in rows}


def settle_event(engine: Engine, event_id: int, owner: str, now: float, reason: str) -> str | None:
    """An event without open deliveries: `done`, or `held` while deliveries of it wait for a digest (the
    digest that carries the last of them finishes it). Decided in one UPDATE of the event's row, which a
    digest finishing its rows updates too: whichever comes second sees what the first wrote. Returns the
    status it got (None: the lease was lost)."""
    waiting = events.c.held_rows > 0
    if not update_event(engine, event_id, owner, reason=reason,
                        finished_at=sa.case((waiting, None), else_=now),
                        status=sa.case((waiting, "held"), else_="done")):
        return None
    with engine.connect() as conn:
        return conn.execute(sa.select(events.c.status).where(events.c.id == event_id)).scalar()


def next_open_delivery_at(engine: Engine, event_id: int) -> float | None:
    """When the earliest open delivery of an event is due; None when all are final."""
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.min(deliveries.c.next_attempt_at))
                            .where(deliveries.c.event_id == event_id,
                                   deliveries.c.status.in_(DELIVERY_OPEN))).scalar()


def event_message(engine: Engine, event_id: int) -> tuple[str, str]:
    """The rendered subject and body of an expanded event."""
    with engine.connect() as conn:
        return tuple(conn.execute(sa.select(events.c.subject, events.c.body)
                                  .where(events.c.id == event_id)).one())


# --- requeueing (`retry`, /admin) ----------------------------------------------------------

def requeue(engine, event_id: int | None = None) -> tuple[int, int]:
    """Make failed deliveries (and failed events) due again; return (events, deliveries) requeued."""
    now = time.time()

    def write():
        with engine.begin() as conn:
            d_where = [deliveries.c.status == "failed"]
            e_where = [events.c.status == "failed"]
            if event_id is not None:
                d_where.append(deliveries.c.event_id == event_id)
                e_where.append(events.c.id == event_id)
            n_deliveries = conn.execute(deliveries.update().where(*d_where).values(
                status="retry", next_attempt_at=now, first_attempt_at=now, attempts=0)).rowcount
            # A failed event that never got deliveries starts over; one with deliveries resumes sending.
            expanded = sa.exists().where(deliveries.c.event_id == events.c.id)
            n_events = conn.execute(events.update().where(*e_where, ~expanded).values(
                status="pending", next_attempt_at=now, first_attempt_at=None, attempts=0, reason="requeued",
                finished_at=None)).rowcount
            reopened = [deliveries.c.event_id == events.c.id, deliveries.c.status.in_(DELIVERY_OPEN)]
            conn.execute(events.update().where(events.c.status.in_(("done", "failed", "held")),
                                               sa.exists().where(*reopened),
                                               *([events.c.id == event_id] if event_id is not None else []))
                         .values(status="sending", next_attempt_at=now, finished_at=None))
            return n_events, n_deliveries
    return with_retries(write)
