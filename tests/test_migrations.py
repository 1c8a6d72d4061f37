"""Schema upgrades: a database the last hand-kept release made is upgraded to head with every row intact;
processes starting at once upgrade it once."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

import wecom
import wecom_api
from store import db, migrate, outbox
from support import ROOT, change_xml
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
    """Every row of the legacy tables; with `columns`, only those columns (later revisions add some)."""
    inspector = sa.inspect(engine)
    columns = columns or {name: [c["name"] for c in inspector.get_columns(name)] for name in LEGACY_TABLES}
    with engine.connect() as conn:
        return {name: sorted(tuple(row) for row in conn.execute(
                    sa.select(sa.table(name, *map(sa.column, columns[name])))))
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
    event_id, created = outbox.record_event(engine, xml, wecom.parse_event(xml), "pending")
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
