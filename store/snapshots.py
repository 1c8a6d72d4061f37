"""Member snapshots: who was in each watched department when it was last listed (the scope check's memory)."""
from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import department_snapshots, insert_ignore, snapshot_members


def load_snapshots(engine: Engine, department_ids, userids=None) -> dict[int, tuple[set[int], set[str]]]:
    """Per watched department that has a snapshot: (covered department ids, member userids); with
    `userids`, only those of them that are members (an index lookup, not the whole department)."""
    result: dict[int, tuple[set[int], set[str]]] = {}
    with engine.connect() as conn:
        for row in conn.execute(sa.select(department_snapshots)
                                .where(department_snapshots.c.department_id.in_(list(department_ids)))):
            covered = {int(d) for d in row.covered.split(",") if d}
            result[row.department_id] = (covered or {row.department_id}, set())
        if result:
            query = (sa.select(snapshot_members.c.department_id, snapshot_members.c.userid)
                     .where(snapshot_members.c.department_id.in_(list(result))))
            if userids is not None:
                query = query.where(snapshot_members.c.userid.in_(list(userids)))
            for dept, userid in conn.execute(query):
                result[dept][1].add(userid)
    return result


def save_snapshot(engine: Engine, department_id: int, members, covered) -> None:
    """Replace the member snapshot of one watched department."""
    rows = [{"department_id": department_id, "userid": m.userid, "name": m.name[:255]}
            for m in {m.userid: m for m in members}.values()]
    snapshot = {"taken_at": time.time(), "member_count": len(rows),
                "covered": ",".join(str(d) for d in sorted(covered))}

    def write():
        with engine.begin() as conn:
            conn.execute(snapshot_members.delete().where(snapshot_members.c.department_id == department_id))
            for start in range(0, len(rows), 1000):
                conn.execute(snapshot_members.insert(), rows[start:start + 1000])
            if not conn.execute(department_snapshots.update()
                                .where(department_snapshots.c.department_id == department_id)
                                .values(**snapshot)).rowcount:
                conn.execute(insert_ignore(department_snapshots), {"department_id": department_id, **snapshot})
    with_retries(write)


def member_names(engine: Engine, department_ids, userids) -> dict[str, str]:
    """The names the member snapshots hold for `userids` (a digest's `{name}` fallback, as the listing is
    at expansion)."""
    userids = sorted(set(userids))
    if not userids:
        return {}
    with engine.connect() as conn:
        return {userid: name for userid, name in conn.execute(
            sa.select(snapshot_members.c.userid, snapshot_members.c.name)
            .where(snapshot_members.c.department_id.in_(list(department_ids)),
                   snapshot_members.c.userid.in_(userids))) if name}
