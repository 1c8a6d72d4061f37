"""Digests: one address's held deliveries, claimed with a lease, sent as one mail, and marked together.

Every transaction on a digest starts by locking its recipient's `wm_recipients` row, the lock expansion
takes before holding a delivery (store/recipients.py): a delivery is held into a collecting digest, or the
digest is claimed, never both at once. Marking a digest sent marks every delivery it carried, its
recipient's window and the events it finishes, in one transaction: a crash repeats at most the digest in
flight, and no change is marked without having been in a mail.
"""
from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.db import with_retries
from store.outbox import counts_reason
from store.schema import deliveries, digests, events, recipients


@dataclass(frozen=True)
class HeldChange:
    """One delivery a digest carries, with the event it tells of."""
    delivery_id: int
    event_id: int
    name: str  # the recipient's
    change_type: str
    user_id: str  # the member who changed
    create_time: int | None
    xml: str


@dataclass(frozen=True)
class Claimed:
    """A digest this process holds the lease on, with the changes it carries (in CreateTime order)."""
    id: int
    address: str
    attempts: int
    first_attempt_at: float | None
    changes: tuple[HeldChange, ...]

    @property
    def event_ids(self) -> list[int]:
        return [change.event_id for change in self.changes]


def due(engine: Engine, now: float, limit: int) -> list[tuple[int, str]]:
    """(id, address) of digests that may go now: collecting and due, or sending under a lease that ran out."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(digests.c.id, digests.c.address)
            .where(sa.or_(sa.and_(digests.c.status == "collecting", digests.c.due_at <= now),
                          sa.and_(digests.c.status == "sending", digests.c.lease_until < now)))
            .order_by(digests.c.due_at, digests.c.id).limit(limit))]


def _lock_recipient(conn: Connection, address: str) -> float:
    """Lock the recipient's row for this transaction; its window. SQLite has no row locks: a first write
    takes the database's write lock instead, so that what is read next stays true until the commit."""
    if conn.dialect.name == "sqlite":
        conn.execute(recipients.update().where(recipients.c.address == address)
                     .values(window_until=recipients.c.window_until))
    window = conn.execute(sa.select(recipients.c.window_until).where(recipients.c.address == address)
                          .with_for_update()).scalar()
    return window or 0.0


def claim(engine: Engine, digest_id: int, address: str, owner: str, lease_seconds: float, now: float,
          quiet_until: float | None = None) -> Claimed | None:
    """Take a due digest with a lease (compare-and-set), or take over one whose lease ran out; None when
    it is not ours to send now. One that finds its recipient's window still running (a mail went out
    since it was collected) or quiet hours on is moved to when they end."""
    def attempt():
        with engine.begin() as conn:
            window_until = _lock_recipient(conn, address)
            row = conn.execute(sa.select(digests).where(digests.c.id == digest_id)).first()
            lease = {"lease_owner": owner, "lease_until": now + lease_seconds}
            if row is None:
                return None
            if row.status == "collecting" and row.due_at <= now:
                sending = conn.execute(sa.select(sa.func.count()).select_from(digests).where(
                    digests.c.address == address, digests.c.status == "sending")).scalar()
                if sending:  # one mail at a time per person: this one waits for the other's window
                    return None
                later = max(window_until, quiet_until or 0.0)
                if later > now:
                    _reschedule(conn, digest_id, later)
                    return None
                conn.execute(digests.update().where(digests.c.id == digest_id).values(status="sending", **lease))
            elif row.status == "sending" and row.lease_until < now:  # a dead process's: sent again at most
                conn.execute(digests.update().where(digests.c.id == digest_id).values(**lease))
            else:
                return None
            changes = tuple(HeldChange(*r) for r in conn.execute(
                sa.select(deliveries.c.id, deliveries.c.event_id, deliveries.c.name, events.c.change_type,
                          events.c.user_id, events.c.create_time, events.c.xml)
                .select_from(deliveries.join(events, events.c.id == deliveries.c.event_id))
                .where(deliveries.c.digest_id == digest_id, deliveries.c.status == "held")
                .order_by(events.c.create_time, events.c.id)))
            if not changes:  # nothing left to carry (cannot happen while holds and merges keep the rules)
                conn.execute(digests.update().where(digests.c.id == digest_id).values(
                    status="merged", reason="nothing left to carry", lease_owner=None, lease_until=None))
                return None
            return Claimed(row.id, row.address, row.attempts, row.first_attempt_at, changes)
    return with_retries(attempt)


def _reschedule(conn: Connection, digest_id: int, due_at: float) -> None:
    conn.execute(digests.update().where(digests.c.id == digest_id).values(due_at=due_at))
    conn.execute(deliveries.update().where(deliveries.c.digest_id == digest_id, deliveries.c.status == "held")
                 .values(next_attempt_at=due_at))


def renew_leases(engine: Engine, _key, owner: str, lease_seconds: float, now: float) -> bool:
    """Extend the lease on every digest this process is sending (LeaseKeeper's heartbeat)."""
    def renew():
        with engine.begin() as conn:
            conn.execute(digests.update().where(digests.c.status == "sending", digests.c.lease_owner == owner)
                         .values(lease_until=now + lease_seconds))
    with_retries(renew)
    return True


def finish(engine: Engine, digest: Claimed, owner: str, now: float, values: dict, window: float,
           notes: dict[int, str] | None = None, reason: str | None = None) -> list[int] | None:
    """Record a digest's final outcome (`values` from retry.outcome: sent, or failed) on it and on every
    delivery it carried; when sent, its recipient's window runs from now. Events whose last held delivery
    this was are done; `notes` (event id → why its change was listed without its template) go on them.
    Returns the ids of the events it finished, or None when the lease was lost (nothing is written)."""
    status, notes = values["status"], notes or {}

    def attempt():
        with engine.begin() as conn:
            _lock_recipient(conn, digest.address)
            ours = conn.execute(digests.update().where(
                digests.c.id == digest.id, digests.c.status == "sending", digests.c.lease_owner == owner).values(
                status=status, attempts=values["attempts"], first_attempt_at=values["first_attempt_at"],
                sent_at=now if status == "sent" else None, changes=len(digest.changes), lease_owner=None,
                lease_until=None, reason=reason if status == "sent" else values["reason"])).rowcount
            if ours != 1:
                conn.rollback()
                return None
            marked = {"status": status, "attempts": values["attempts"],
                      "first_attempt_at": values["first_attempt_at"],
                      "reason": (f"in digest {digest.id} with {len(digest.changes)} change(s)"
                                 if status == "sent" else values["reason"])}
            if status == "sent":
                marked["sent_at"] = now
                later = sa.case((recipients.c.window_until < now + window, now + window),
                                else_=recipients.c.window_until)
                conn.execute(recipients.update().where(recipients.c.address == digest.address)
                             .values(window_until=later))
            conn.execute(deliveries.update().where(deliveries.c.id.in_([c.delivery_id for c in digest.changes]),
                                                   deliveries.c.status == "held").values(**marked))
            return _finish_events(conn, digest.event_ids, now, notes)
    return with_retries(attempt)


def _finish_events(conn: Connection, event_ids: list[int], now: float, notes: dict[int, str]) -> list[int]:
    """One held delivery fewer for each event (a digest carries one per event); those left with none, and
    waiting only for it (`held`), are done. Their rows are locked in id order, as every digest locks them."""
    ids = sorted(set(event_ids))
    before = conn.execute(sa.select(events.c.id, events.c.status, events.c.held_rows)
                          .where(events.c.id.in_(ids)).order_by(events.c.id).with_for_update()).all()
    conn.execute(events.update().where(events.c.id.in_(ids)).values(held_rows=events.c.held_rows - 1))
    done = [r.id for r in before if r.status == "held" and r.held_rows <= 1]
    counts: dict[int, dict[str, int]] = {event_id: {} for event_id in done}
    if done:
        for event_id, state, count in conn.execute(
                sa.select(deliveries.c.event_id, deliveries.c.status, sa.func.count())
                .where(deliveries.c.event_id.in_(done)).group_by(deliveries.c.event_id, deliveries.c.status)):
            counts[event_id][state] = count
    for event_id in sorted(set(done) | set(notes)):
        text = "; ".join(part for part in (counts_reason(counts[event_id]) if event_id in counts else "",
                                           notes.get(event_id, "")) if part)
        finished = {"status": "done", "finished_at": now} if event_id in counts else {}
        conn.execute(events.update().where(events.c.id == event_id).values(reason=text[:2000], **finished))
    return done


def release(engine: Engine, digest: Claimed, owner: str, due_at: float, reason: str,
            values: dict | None = None) -> bool:
    """Put a digest that did not go (a transient failure: `values` from retry.outcome; or untried: None)
    back to collecting, due at `due_at`. What its recipient got held meanwhile joins it, so the retry
    carries every change held for them. False when the lease was lost."""
    def attempt():
        with engine.begin() as conn:
            _lock_recipient(conn, digest.address)
            back = {"status": "collecting", "due_at": due_at, "reason": reason[:1000], "lease_owner": None,
                    "lease_until": None}
            if values is not None:
                back.update(attempts=values["attempts"], first_attempt_at=values["first_attempt_at"])
            ours = conn.execute(digests.update().where(
                digests.c.id == digest.id, digests.c.status == "sending",
                digests.c.lease_owner == owner).values(**back)).rowcount
            if ours != 1:
                conn.rollback()
                return False
            newer = conn.execute(sa.select(digests.c.id).where(
                digests.c.address == digest.address, digests.c.status == "collecting",
                digests.c.id != digest.id).with_for_update()).scalars().all()
            if newer:
                conn.execute(deliveries.update().where(deliveries.c.digest_id.in_(newer),
                                                       deliveries.c.status == "held").values(digest_id=digest.id))
                conn.execute(digests.update().where(digests.c.id.in_(newer))
                             .values(status="merged", reason=f"merged into digest {digest.id}"))
            conn.execute(deliveries.update().where(deliveries.c.digest_id == digest.id,
                                                   deliveries.c.status == "held")
                         .values(next_attempt_at=due_at, reason=reason[:1000]))
            return True
    return with_retries(attempt)
