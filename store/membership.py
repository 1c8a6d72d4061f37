"""The announced membership of each watched department, and what reconciliation's listings observed.

Every change of state is a compare-and-set on one (department, userid) row, so that a callback and a
reconciliation round racing in two processes announce a join or a leave once.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import (EVENT_OPEN, events, insert_ignore, membership, observations,
                          reconciled_departments)


@dataclass(frozen=True)
class Mark:
    """What marking a row did: `changed` when this call moved it; `row` is the row as it was before
    (changed) or as it is (unchanged: someone announced it already, or it was never known)."""

    changed: bool
    row: object | None


# --- reading -------------------------------------------------------------------------------------

def department_state(engine: Engine, department_id: int):
    """The department's reconciliation state (seeded_at, last_round, listed_at, …), or None before seeding."""
    with engine.connect() as conn:
        return conn.execute(sa.select(reconciled_departments)
                            .where(reconciled_departments.c.department_id == department_id)).first()


def joined_members(engine: Engine, department_id: int) -> dict[str, str]:
    """userid → name of everyone announced as joined (and not since as left)."""
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(membership.c.userid, membership.c.name)
                                 .where(membership.c.department_id == department_id,
                                        membership.c.state == "joined")).all())


def observed(engine: Engine, department_id: int) -> dict[str, object]:
    """userid → observation row (kind, listings, since, name) of the department's last listing."""
    with engine.connect() as conn:
        return {row.userid: row for row in conn.execute(
            sa.select(observations).where(observations.c.department_id == department_id))}


def open_event_userids(engine: Engine, userids) -> set[str]:
    """Those of `userids` that an event still open in the outbox (pending or sending) is about."""
    userids = list(userids)
    if not userids:
        return set()
    with engine.connect() as conn:
        return set(conn.execute(sa.select(events.c.user_id).distinct()
                                .where(events.c.status.in_(EVENT_OPEN), events.c.user_id.in_(userids))).scalars())


def rows_of(engine: Engine, userid: str) -> dict[int, object]:
    """department id → membership row of one userid."""
    with engine.connect() as conn:
        return {row.department_id: row for row in conn.execute(
            sa.select(membership).where(membership.c.userid == userid))}


# --- seeding and observing (reconciliation's own listings) ---------------------------------------

def seed(engine: Engine, department_id: int, members, round_no: int, now: float, fetch_child: bool) -> None:
    """A listing becomes the department's announced membership (nobody is mailed for it): at its first
    listing, and again when WECOM_FETCH_CHILD changed what a listing covers. What callbacks announced
    stays as they announced it."""
    rows = [{"department_id": department_id, "userid": m.userid[:64], "state": "joined", "name": m.name[:255],
             "announced_by": "seed", "announced_at": now, "changed_at": now, "event_id": None}
            for m in {m.userid: m for m in members}.values()]
    state = {"department_id": department_id, "seeded_at": now, "last_round": round_no, "listed_at": now,
             "member_count": len(rows), "fetch_child": int(fetch_child)}

    def write():
        with engine.begin() as conn:
            conn.execute(membership.delete().where(membership.c.department_id == department_id,
                                                   membership.c.announced_by != "callback"))
            conn.execute(observations.delete().where(observations.c.department_id == department_id))
            for start in range(0, len(rows), 1000):
                conn.execute(insert_ignore(membership), rows[start:start + 1000])
            conn.execute(reconciled_departments.delete()
                         .where(reconciled_departments.c.department_id == department_id))
            conn.execute(reconciled_departments.insert(), state)
    with_retries(write)


def save_observations(engine: Engine, department_id: int, rows: list[dict], round_no: int, now: float,
                      member_count: int) -> None:
    """Replace the department's observations with those of this listing, and note the listing."""
    rows = [dict(row, department_id=department_id) for row in rows]

    def write():
        with engine.begin() as conn:
            conn.execute(observations.delete().where(observations.c.department_id == department_id))
            for start in range(0, len(rows), 1000):
                conn.execute(observations.insert(), rows[start:start + 1000])
            conn.execute(reconciled_departments.update()
                         .where(reconciled_departments.c.department_id == department_id)
                         .values(last_round=round_no, listed_at=now, member_count=member_count))
    with_retries(write)


# --- marking (a callback's expansion) ------------------------------------------------------------

def _key(department_id: int, userid: str):
    return sa.and_(membership.c.department_id == department_id, membership.c.userid == userid)


def _read(conn, department_id: int, userid: str):
    return conn.execute(sa.select(membership).where(_key(department_id, userid))).first()


def mark(engine: Engine, department_id: int, userid: str, state: str, by: str, event_id: int | None,
         changed_at: float | None, name: str = "", now: float | None = None, create: bool = True) -> Mark:
    """Move (department, userid) to `state` unless it is there already: compare-and-set, one winner.
    Without `create`, a userid never known stays unknown (a leave of someone never announced)."""
    now = time.time() if now is None else now

    def write():
        with engine.begin() as conn:
            before = _read(conn, department_id, userid)
            if before is not None and before.state == state:
                return Mark(False, before)
            values = {"state": state, "announced_by": by, "announced_at": now, "changed_at": changed_at,
                      "event_id": event_id, "name": (name or (before.name if before else ""))[:255]}
            if before is None:
                if not create:
                    return Mark(False, None)
                moved = conn.execute(insert_ignore(membership),
                                     dict(values, department_id=department_id, userid=userid[:64])).rowcount
            else:
                moved = conn.execute(membership.update()
                                     .where(_key(department_id, userid), membership.c.state == before.state)
                                     .values(**values)).rowcount
        if moved == 1:
            return Mark(True, before)
        with engine.connect() as conn:  # another process moved it first: read what it wrote
            return Mark(False, _read(conn, department_id, userid))
    return with_retries(write)


def rename(engine: Engine, old: str, new: str) -> None:
    """A userid renamed (NewUserID): its rows follow it; a row the new id already has (announced by
    reconciliation meanwhile) wins. Observations of either id start over."""
    def write():
        with engine.begin() as conn:
            taken = set(conn.execute(sa.select(membership.c.department_id)
                                     .where(membership.c.userid == new)).scalars())
            conn.execute(membership.delete().where(membership.c.userid == old,
                                                   membership.c.department_id.in_(list(taken))))
            conn.execute(membership.update().where(membership.c.userid == old).values(userid=new[:64]))
            conn.execute(observations.delete().where(observations.c.userid.in_([old, new])))
    with_retries(write)


# --- announcing (reconciliation) -----------------------------------------------------------------

def announcement_key(department_ids, userid: str, kind: str, round_no: int) -> str:
    """Dedup key of a synthetic event: the departments, the userid, join/leave and the confirming round."""
    text = "\0".join(["reconcile", ",".join(map(str, sorted(department_ids))), userid, kind, str(round_no)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def announce(engine: Engine, department_ids, userid: str, state: str, name: str, changed_at: float,
             event: dict, now: float) -> tuple[int | None, list[int]]:
    """In one transaction: move (department, userid) to `state` for each department where it is not there
    yet (compare-and-set), and record `event` (a row of wm_events) for those. Returns (event id, the
    departments it announces to); (None, []) when callbacks announced every one of them first."""
    values = {"state": state, "announced_by": "reconcile", "announced_at": now, "changed_at": changed_at,
              "name": name[:255]}

    def write():
        with engine.begin() as conn:
            won = []
            for department_id in department_ids:
                moved = conn.execute(membership.update()
                                     .where(_key(department_id, userid), membership.c.state != state)
                                     .values(**values)).rowcount
                if not moved and state == "joined":
                    moved = conn.execute(insert_ignore(membership), dict(
                        values, department_id=department_id, userid=userid[:64])).rowcount
                if moved:
                    won.append(department_id)
            if not won:
                conn.rollback()
                return None, []
            row = dict(event, departments=",".join(map(str, won)))
            event_id = conn.execute(events.insert(), row).inserted_primary_key[0]
            conn.execute(membership.update()
                         .where(membership.c.userid == userid, membership.c.department_id.in_(won))
                         .values(event_id=event_id))
            return event_id, won
    return with_retries(write)
