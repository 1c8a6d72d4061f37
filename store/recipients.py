"""The digest's decision at expansion: per recipient address, a new delivery goes at once or is held.

Every decision about one address is taken under the lock on its `wm_recipients` row, in the transaction
that writes the event's delivery rows: two processes expanding two events for the same person at the same
moment take turns, and only the first finds the window free (the duplicate Novu's users saw when events
landed in the same second cannot happen).
"""
from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.db import with_retries
from store.schema import DIGEST_OPEN, digests, insert_ignore, recipients

CHUNK = 1000


@dataclass(frozen=True)
class Hold:
    """How expansion decides at `now`: the window to reserve (DIGEST_WINDOW_SECONDS), and, during quiet
    hours, when they end (every new delivery is held until then)."""
    now: float
    window: float
    quiet_until: float | None = None


def _chunks(items: list, size: int = CHUNK):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def ensure_recipients(engine: Engine, addresses) -> None:
    """Create the rows of addresses never seen (window open), each in its own short transaction: the
    expansion then only locks rows that exist, never upgrading a shared lock (InnoDB's deadlock)."""
    wanted = sorted(set(addresses))
    for chunk in _chunks(wanted):
        with engine.connect() as conn:
            known = set(conn.execute(sa.select(recipients.c.address)
                                     .where(recipients.c.address.in_(chunk))).scalars())
        missing = [{"address": a, "window_until": 0.0} for a in chunk if a not in known]
        if missing:
            def insert():
                with engine.begin() as conn:
                    conn.execute(insert_ignore(recipients), missing)
            with_retries(insert)


def lock_rows(conn: Connection, addresses: list[str]) -> dict[str, dict]:
    """Lock the recipients' rows (in address order) and their open digests; per address its window and
    open digests. On SQLite, which has no row locks, the caller's transaction must already hold the
    database's write lock (it has written first)."""
    query = (sa.select(recipients.c.address, recipients.c.window_until, digests.c.id, digests.c.status,
                       digests.c.due_at)
             .select_from(recipients.outerjoin(digests, sa.and_(digests.c.address == recipients.c.address,
                                                                digests.c.status.in_(DIGEST_OPEN))))
             .where(recipients.c.address.in_(addresses))
             .order_by(recipients.c.address).with_for_update())
    state: dict[str, dict] = {}
    for address, window_until, digest_id, status, due_at in conn.execute(query):
        entry = state.setdefault(address, {"window_until": window_until, "collecting": None, "sending": False})
        if status == "collecting":
            entry["collecting"] = (digest_id, due_at)
        elif status == "sending":
            entry["sending"] = True
    return state


def hold_rows(conn: Connection, rows: list[dict], hold: Hold) -> tuple[list[dict], int]:
    """Decide each new pending delivery in this transaction; return the rows to insert and how many are held.

    At once (stays `pending`) when the address has no open digest, its window has ended and quiet hours
    are not on: its window is reserved (now + DIGEST_WINDOW_SECONDS). Otherwise `held`, in the address's
    collecting digest (created when it has none), due when that digest is. One row per address, as the
    unique key (event, address) would keep: the first.
    """
    out, first = [], {}
    for row in rows:
        address = row["address"]
        if address is None:
            out.append(row)
        elif address not in first:
            first[address] = dict(row)
            out.append(first[address])
    pending = sorted(a for a, r in first.items() if r["status"] == "pending")
    held = 0
    for chunk in _chunks(pending):
        state = lock_rows(conn, chunk)
        free = [a for a in chunk if hold.quiet_until is None and state[a]["collecting"] is None
                and not state[a]["sending"] and state[a]["window_until"] <= hold.now]
        if free:
            conn.execute(recipients.update().where(recipients.c.address.in_(free))
                         .values(window_until=hold.now + hold.window))
        waiting = sorted(set(chunk) - set(free))
        for address, (digest_id, due_at) in _collecting_digests(conn, waiting, state, hold).items():
            first[address].update(status="held", digest_id=digest_id, next_attempt_at=due_at)
        held += len(waiting)
    return out, held


def _collecting_digests(conn: Connection, addresses: list[str], state: dict, hold: Hold) -> dict:
    """The collecting digest (id, due) of each address, created where it has none."""
    found = {a: state[a]["collecting"] for a in addresses if state[a]["collecting"] is not None}
    new = [a for a in addresses if a not in found]
    if new:
        conn.execute(digests.insert(), [
            {"address": a, "status": "collecting", "attempts": 0, "changes": 0, "created_at": hold.now,
             "due_at": max(state[a]["window_until"], hold.quiet_until or 0.0, hold.now)} for a in new])
        # Under the recipients' locks nobody else creates one for these addresses: read the ids back.
        for digest_id, address, due_at in conn.execute(
                sa.select(digests.c.id, digests.c.address, digests.c.due_at)
                .where(digests.c.address.in_(new), digests.c.status == "collecting")):
            found[address] = (digest_id, due_at)
    return found


def push_windows(engine: Engine, addresses, until: float) -> None:
    """Move the windows of addresses just mailed to at least `until` (the end of a sending round + W):
    what was reserved at expansion counted from then, the mail went out a little later."""
    later = sa.case((recipients.c.window_until < until, until), else_=recipients.c.window_until)
    for chunk in _chunks(sorted(set(addresses))):
        def write():
            with engine.begin() as conn:
                conn.execute(recipients.update().where(recipients.c.address.in_(chunk))
                             .values(window_until=later))
        with_retries(write)
