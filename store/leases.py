"""Named leases: work that one process does once per interval (reconciliation), taken by compare-and-set."""
from __future__ import annotations

import time

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import insert_ignore, leases


@dataclass(frozen=True)
class Turn:
    """The outcome of asking for a turn: `round` (the run number) when taken, else None; when it last ran."""

    round: int | None
    last_run_at: float | None


def take_turn(engine: Engine, name: str, owner: str, interval: float, hold: float, now: float) -> Turn:
    """Take the lease `name` for `hold` seconds if its last run began at least `interval` ago and nobody holds
    it; count the run. Any number of processes may ask at once: one gets the turn."""
    due = sa.and_(leases.c.name == name,
                  sa.or_(leases.c.last_run_at.is_(None), leases.c.last_run_at <= now - interval),
                  sa.or_(leases.c.lease_until.is_(None), leases.c.lease_until < now))

    def take():
        with engine.begin() as conn:
            taken = conn.execute(leases.update().where(due).values(
                owner=owner, lease_until=now + hold, last_run_at=now, runs=leases.c.runs + 1)).rowcount
            if not taken and conn.execute(insert_ignore(leases), {"name": name, "runs": 0}).rowcount:
                taken = conn.execute(leases.update().where(due).values(
                    owner=owner, lease_until=now + hold, last_run_at=now, runs=leases.c.runs + 1)).rowcount
            row = conn.execute(sa.select(leases.c.runs, leases.c.last_run_at, leases.c.owner)
                               .where(leases.c.name == name)).one()
            return Turn(row.runs if taken else None, row.last_run_at)
    return with_retries(take)


def finish_turn(engine: Engine, name: str, owner: str, outcome: str) -> None:
    """Release our lease and say how the run went (for `check`)."""
    def write():
        with engine.begin() as conn:
            conn.execute(leases.update().where(leases.c.name == name, leases.c.owner == owner)
                         .values(lease_until=None, last_outcome=outcome[:1000]))
    with_retries(write)


def last_turn(engine: Engine, name: str):
    """The lease row (last_run_at, runs, last_outcome, …), or None when it never ran."""
    with engine.connect() as conn:
        return conn.execute(sa.select(leases).where(leases.c.name == name)).first()


def next_turn_at(engine: Engine, name: str, interval: float, soonest: float) -> float:
    """When the next run under lease `name` is due: `interval` after its last run by any process, and not
    sooner than `soonest` seconds from now (a process that found another's turn in progress asks again then)."""
    last = last_turn(engine, name)
    started = last.last_run_at if last is not None and last.last_run_at else time.time()
    return max(started + interval, time.time() + soonest)
