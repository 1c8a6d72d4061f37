"""Retention (RETENTION_DAYS): old finished events go with their deliveries and digests; nothing still open,
held or young does; one process at a time; `check` shows the tables' sizes."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from delivery import retention as scheduling
from store import db, leases, migrate, retention, schema
from support import count, rows

DAY = 86400.0
NOW = 1_800_000_000.0


def _event(conn, key: str, status: str, age_days: float, deliveries=(), digest_id=None, finished=True) -> int:
    at = NOW - age_days * DAY
    event_id = conn.execute(schema.events.insert().values(
        dedup_key=key, change_type="create_user", user_id=key, departments="2", xml="<xml/>", status=status,
        received_at=at, next_attempt_at=0, finished_at=at if finished else None)).inserted_primary_key[0]
    for n, state in enumerate(deliveries):
        conn.execute(schema.deliveries.insert().values(
            event_id=event_id, userid=f"m{n}", address=f"{key}-m{n}@corp.example", status=state, attempts=1,
            next_attempt_at=0, digest_id=digest_id))
    return event_id


def _digest(conn, status: str, age_days: float) -> int:
    at = NOW - age_days * DAY
    return conn.execute(schema.digests.insert().values(address="m0@corp.example", status=status, due_at=at,
                                                       created_at=at, sent_at=at if status == "sent" else None)
                        ).inserted_primary_key[0]


def _keys(engine) -> set[str]:
    return {row.dedup_key for row in rows(engine, schema.events)}


def test_prunes_old_finished_events_with_their_rows_and_nothing_open_held_or_young(db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        old_digest = _digest(conn, "sent", 100)
        open_digest = _digest(conn, "collecting", 100)
        _event(conn, "old-done", "done", 100, ["sent"] * 3 + ["skipped"])
        _event(conn, "old-failed", "failed", 95, ["failed", "sent"])
        _event(conn, "old-ignored", "ignored", 120, finished=False)  # recorded as ignored: no finished_at
        _event(conn, "old-digested", "done", 100, ["sent"], digest_id=old_digest)
        _event(conn, "old-retrying", "done", 100, ["sent", "retry"])  # requeued: a delivery is open again
        _event(conn, "old-held", "held", 100, ["sent", "held"], digest_id=open_digest)
        _event(conn, "old-sending", "sending", 100, ["pending"])
        _event(conn, "old-pending", "pending", 100, finished=False)
        _event(conn, "young-done", "done", 89, ["sent"])
    before = count(engine, schema.deliveries)

    pruned = retention.prune(engine, 90, now=NOW)

    assert _keys(engine) == {"old-retrying", "old-held", "old-sending", "old-pending", "young-done"}
    assert (pruned.events, pruned.deliveries, pruned.digests) == (4, 8, 1) and pruned.complete
    assert count(engine, schema.deliveries) == before - 8
    # What is left of a kept event is whole: its open and its sent rows alike.
    assert {d.status for d in rows(engine, schema.deliveries)} == {"sent", "retry", "held", "pending"}
    assert [d.id for d in rows(engine, schema.digests)] == [open_digest]
    assert retention.prune(engine, 90, now=NOW).events == 0  # nothing more to do: idempotent


def test_never_younger_than_a_day_and_zero_keeps_everything(db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        _event(conn, "an-hour-old", "done", 1 / 24, ["sent"])  # WeCom could still resend this one's key
        _event(conn, "ancient", "done", 3650, ["sent"])
    assert retention.prune(engine, 0, now=NOW).events == 0
    assert _keys(engine) == {"an-hour-old", "ancient"}
    assert retention.cutoff(0, NOW) <= NOW - DAY
    retention.prune(engine, 1, now=NOW)
    assert _keys(engine) == {"an-hour-old"}


def test_people_who_left_before_the_cutoff_lose_their_membership_row_and_nobody_else_does(db_url):
    """Without this, every leaver in the service's life keeps a row (bench/steady.py's steady load found it)."""
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        for userid, state, age in (("left-long-ago", "left", 100), ("left-last-week", "left", 7),
                                   ("joined-long-ago", "joined", 100)):
            conn.execute(schema.membership.insert().values(department_id=2, userid=userid, state=state,
                                                           announced_by="callback", announced_at=NOW - age * DAY))

    pruned = retention.prune(engine, 90, now=NOW)

    assert {row.userid for row in rows(engine, schema.membership)} == {"left-last-week", "joined-long-ago"}
    assert pruned.members == 1 and "1 leaver(s) deleted" in pruned.summary()


def test_large_fan_outs_go_in_small_batches_and_a_stop_leaves_a_consistent_state(db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        for n in range(3):
            _event(conn, f"big{n}", "done", 200, ["sent"] * (retention.ROWS_PER_DELETE + 10))
    stop = threading.Event()
    real = retention._delete_deliveries

    def stop_after_first(engine_, ids):
        deleted = real(engine_, ids)
        stop.set()
        return deleted
    retention._delete_deliveries = stop_after_first
    try:
        first = retention.prune(engine, 90, now=NOW, stop=stop)
    finally:
        retention._delete_deliveries = real
    assert not first.complete and first.deliveries == retention.ROWS_PER_DELETE and first.events == 0
    assert len(_keys(engine)) == 3  # an event goes only after its last delivery
    rest = retention.prune(engine, 90, now=NOW)
    assert rest.events == 3 and count(engine, schema.deliveries) == 0
    # 2 x ROWS_PER_DELETE + 30 left: three DELETEs of at most ROWS_PER_DELETE, one for the events, one for
    # digests, one for leavers.
    assert rest.deliveries == 2 * retention.ROWS_PER_DELETE + 30 and rest.batches == 3 + 1 + 1 + 1


def test_one_process_at_a_time_holds_the_turn_and_releases_it(db_url, make_app):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        for n in range(5):
            _event(conn, f"old{n}", "done", 100, ["sent"])
    settings = make_app(DATABASE_URL=db_url, RETENTION_DAYS="90").extensions["wecom_mailer"].settings
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: scheduling.run(settings, engine, f"p{i}", now=NOW + DAY * 0), range(4)))
    ran = [r for r in results if r is not None]
    # Rows dated NOW are in the future of the clock: only the one run counts, each event deleted once.
    assert len(ran) == 1 and sum(r.events for r in ran) == 5 and not _keys(engine)
    turn = leases.last_turn(engine, scheduling.LEASE)
    assert turn.lease_until is None and turn.last_outcome.startswith("5 event(s)")
    assert scheduling.run(settings, engine, "p9", now=NOW + 60) is None  # within the hour: not due


def test_check_shows_row_counts_the_oldest_row_kept_and_the_last_run(make_app, db_url):
    app = make_app(DATABASE_URL=db_url, RETENTION_DAYS="90")
    runner = app.test_cli_runner()
    parts = app.extensions["wecom_mailer"]
    with parts.engine.begin() as conn:
        _event(conn, "kept", "done", 10, ["sent", "sent"])
    scheduling.run(parts.settings, parts.engine, "tester", now=NOW)
    said = runner.invoke(args=["check"]).output
    [line] = [line for line in said.splitlines() if line.startswith("✓ retention:")]
    assert "finished events older than 90 day(s) are deleted hourly, last run" in line
    assert "0 event(s), 0 delivery(ies), 0 digest(s), 0 leaver(s) deleted" in line
    assert "wm_events 1 row(s), oldest kept 2027-01-05 16:00:00" in line and "wm_deliveries 2 row(s), oldest kept" in line
    assert line.endswith("wm_digests 0 row(s)")


def test_the_received_at_index_is_there_for_the_prune_order(db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    names = {ix["name"] for ix in sa.inspect(engine).get_indexes("wm_events")}
    assert "ix_wm_events_received" in names


def test_the_delivery_loop_prunes_in_its_own_thread_and_releases_the_lease_on_shutdown(make_app, db_url):
    import time

    from support import wait_until

    app = make_app(DATABASE_URL=db_url, RETENTION_DAYS="30")
    parts = app.extensions["wecom_mailer"]
    now = time.time()
    with parts.engine.begin() as conn:
        for key, age in (("two-months", 60), ("a-week", 7)):
            conn.execute(schema.events.insert().values(
                dedup_key=key, change_type="create_user", user_id=key, departments="2", xml="<xml/>",
                status="done", received_at=now - age * DAY, next_attempt_at=0, finished_at=now - age * DAY))
    worker = parts.make_worker()
    worker.start()
    try:
        wait_until(lambda: _keys(parts.engine) == {"a-week"}, timeout=30, what="the worker's pruning thread")
    finally:
        worker.shutdown()
    turn = leases.last_turn(parts.engine, scheduling.LEASE)
    assert turn.owner == worker.owner and turn.lease_until is None and turn.runs == 1
