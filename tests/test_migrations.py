"""Schema upgrades: a database the last hand-kept release made is upgraded to head with every row intact;
processes starting at once upgrade it once."""
from __future__ import annotations

import collections
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from alembic import command

import wecom
import wecom_api
from store import db, migrate, outbox, recording, schema
from support import ROOT, change_xml, count, rows
from support.digests import Clock
from support.legacy import legacy_release

LEGACY_TABLES = ("wm_events", "wm_deliveries", "wm_department_snapshots", "wm_snapshot_members",
                 "wm_address_book", "wm_access_tokens")


def fill_as_the_last_release_did(legacy, engine) -> None:
    """Events in every state, deliveries sent, failed and still open, a snapshot, a token, an address."""
    legacy.init_schema(engine)
    for n, change_type in enumerate(("create_user", "update_user", "delete_user", "create_user")):
        xml = change_xml(change_type, f"user{n:04d}")
        legacy.record_event(engine, xml, wecom.parse_event(xml), "pending")
    held = legacy.claim_event(engine, "old-worker", 30)
    rows = [{"userid": f"m{i}", "name": f"成员{i}", "address": f"m{i}@corp.example", "status": "pending"}
            for i in range(4)] + [{"userid": "noaddr", "name": "", "address": None, "status": "skipped",
                                   "reason": "no address"}]
    assert legacy.expand_event(engine, held.id, "old-worker", "新增成员", "新增成员 ID：user0000", rows)
    marks = legacy.DeliveryMarks(engine)
    due = legacy.due_deliveries(engine, held.id)
    marks.mark_sent([due[0].id, due[1].id], 1700000100.0)
    marks.mark(due[2].id, status="failed", attempts=1, first_attempt_at=1700000100.0, reason="550 no such user")
    marks.close()
    legacy.update_event(engine, held.id, "old-worker", release=False, next_attempt_at=1700000200.0)
    legacy.save_snapshot(engine, 2, [wecom_api.Member("m0", "成员0"), wecom_api.Member("m1", "成员1")], (2, 21))
    legacy.TokenStore(engine).put("k" * 64, "token-value", 1700007200.0)
    with engine.begin() as conn:
        conn.execute(legacy.address_book.insert(), {"userid": "m3", "email": "m3@corp.example",
                                                    "updated_at": 1700000000.0})


def every_row(engine, columns: dict[str, list[str]] | None = None) -> dict[str, list[tuple]]:
    """Every row of the legacy tables; with `columns`, only those columns of each ("*": all of them), as
    later revisions add some."""
    with engine.connect() as conn:
        columns = columns or {name: [c["name"] for c in sa.inspect(conn).get_columns(name)] for name in LEGACY_TABLES}
        return {name: sorted(tuple(row) for row in conn.execute(
                    sa.select(*(sa.text("*") if c == "*" else sa.column(c) for c in columns[name]))
                    .select_from(sa.table(name))))
                for name in LEGACY_TABLES}


def test_a_database_of_the_last_hand_kept_release_is_upgraded_with_every_row_intact(db_url):
    legacy = legacy_release()
    old = legacy.make_engine(db_url)
    fill_as_the_last_release_did(legacy, old)
    before = every_row(old)
    legacy_columns = {name: [c["name"] for c in sa.inspect(old).get_columns(name)] for name in LEGACY_TABLES}
    old.dispose()
    assert sum(map(len, before.values())) == 4 + 5 + 1 + 2 + 1 + 1

    engine = db.make_engine(db_url)
    assert migrate.current_revision(engine) is None  # it knew no Alembic
    assert migrate.upgrade(engine) == migrate.head_revision()
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert every_row(engine, legacy_columns) == before
    with engine.connect() as conn:  # every event recorded before reconciliation came from a callback
        assert conn.execute(sa.text("SELECT DISTINCT source FROM wm_events")).scalars().all() == ["callback"]
    assert not sa.inspect(engine).has_table("wm_schema")  # the hand-kept version table is gone

    # And the service goes on with it: the event in hand is taken over, a new one is recorded.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE wm_events SET lease_until = 0"))
    taken = outbox.claim_event(engine, "new-worker", 30)
    assert taken is not None and taken.status in ("pending", "sending")
    xml = change_xml("create_user", "after-upgrade")
    event_id, created = recording.record_event(engine, xml, wecom.parse_event(xml), "pending")
    assert created and event_id == 5
    engine.dispose()


def test_an_upgraded_database_upgrades_to_nothing_new(db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO wm_address_book (userid, email, updated_at) VALUES ('a', 'a@b.example', 1)"))
    assert migrate.upgrade(engine) == migrate.head_revision()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM wm_address_book")).scalar_one() == 1
    engine.dispose()


UPGRADE = "import sys; from store import db, migrate; print(migrate.upgrade(db.make_engine(sys.argv[1])))"


@pytest.mark.slow
def test_processes_starting_at_once_upgrade_the_empty_database_once(db_url):
    def start(_):
        return subprocess.run([sys.executable, "-c", UPGRADE, db_url], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(start, range(4)))
    assert [(r.returncode, r.stdout.strip()) for r in results] == [(0, migrate.head_revision())] * 4, \
        [r.stderr[-2000:] for r in results]
    engine = db.make_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == \
            [migrate.head_revision()]
    engine.dispose()


def test_the_migrations_build_exactly_the_tables_schema_py_declares(db_url):
    """Every table, column (with its type), index and unique key of store/schema.py, and nothing else."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from store.schema import metadata

    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    engine.dispose()
    assert differences == []


def _lightweight(name: str, *columns: str) -> sa.TableClause:
    return sa.table(name, *map(sa.column, columns))


OLD_EVENTS = _lightweight("wm_events", "id", "dedup_key", "change_type", "user_id", "departments", "create_time",
                          "xml", "status", "subject", "body", "attempts", "received_at", "next_attempt_at",
                          "lease_owner", "lease_until")
OLD_DELIVERIES = _lightweight("wm_deliveries", "id", "event_id", "userid", "name", "address", "status", "reason",
                              "attempts", "first_attempt_at", "next_attempt_at", "sent_at")


def test_a_database_at_0002_with_open_deliveries_upgrades_to_the_digest_and_loses_none(db_url, request):
    engine = db.make_engine(db_url)
    with engine.connect() as conn:
        command.upgrade(migrate._config(conn), "0002")  # the schema before the digest
        conn.commit()
    sending, pending = change_xml("create_user", "halfway"), change_xml("update_user", "untouched")
    with engine.begin() as conn:
        conn.execute(OLD_EVENTS.insert(), [
            {"id": 1, "dedup_key": recording.dedup_key(sending), "change_type": "create_user", "user_id": "halfway",
             "departments": "2", "create_time": 1700000000, "xml": sending, "status": "sending",
             "subject": "新增成员", "body": "新增成员 ID：halfway", "attempts": 0, "received_at": 1700000000.0,
             "next_attempt_at": 0, "lease_owner": "old-worker", "lease_until": 1.0},  # a dead worker's
            {"id": 2, "dedup_key": recording.dedup_key(pending), "change_type": "update_user", "user_id": "untouched",
             "departments": "2", "create_time": 1700000001, "xml": pending, "status": "pending",
             "subject": None, "body": None, "attempts": 0, "received_at": 1700000001.0, "next_attempt_at": 0,
             "lease_owner": None, "lease_until": None}])
        conn.execute(OLD_DELIVERIES.insert(), [
            {"id": i, "event_id": 1, "userid": f"user{i:04d}", "name": "", "address": f"user{i:04d}@corp.example",
             "status": status, "reason": None, "attempts": attempts, "first_attempt_at": first,
             "next_attempt_at": 0, "sent_at": 1700000100.0 if status == "sent" else None}
            for i, status, attempts, first in ((1, "sent", 1, 1700000100.0), (2, "retry", 1, 1700000100.0),
                                               (3, "pending", 0, None), (4, "pending", 0, None),
                                               (5, "failed", 1, 1700000100.0))])
    before = every_row(engine, {"wm_events": [c.name for c in OLD_EVENTS.c],
                                "wm_deliveries": [c.name for c in OLD_DELIVERIES.c],
                                **{name: ["*"] for name in LEGACY_TABLES[2:]}})
    engine.dispose()

    service = request.getfixturevalue("service")  # the app upgrades the database at start
    smtp_sink = request.getfixturevalue("smtp_sink")
    assert migrate.current_revision(service.engine) == migrate.head_revision()
    assert every_row(service.engine, {"wm_events": [c.name for c in OLD_EVENTS.c],
                                      "wm_deliveries": [c.name for c in OLD_DELIVERIES.c],
                                      **{name: ["*"] for name in LEGACY_TABLES[2:]}}) == before
    assert {e.held_rows for e in rows(service.engine, schema.events)} == {0}
    assert {d.digest_id for d in rows(service.engine, schema.deliveries)} == {None}

    clock = Clock(time.time())
    worker = service.make_worker(digest_window=60)
    worker.clock = clock
    service.drain(worker)
    clock.advance(61)  # the untouched event finds its recipients just mailed: held, then one digest each
    service.drain(worker)
    got = collections.Counter((m["X-RcptTo"], m["Subject"]) for m in smtp_sink.messages)
    assert got == {**{(f"user{i:04d}@corp.example", "新增成员"): 1 for i in (2, 3, 4)},
                   **{(f"user{i:04d}@corp.example", "更新成员"): 1 for i in range(1, 6)}}
    assert [e.status for e in rows(service.engine, schema.events)] == ["done", "done"]
    assert count(service.engine, schema.deliveries, schema.deliveries.c.status.in_(("pending", "retry", "held"))) == 0
