"""Recording callbacks with group commit (store/recording.py): rows that arrive together are written in
one statement, each caller learns its own event id and whether it was new, and a failure is nobody's success."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

import wecom
from store import migrate
from store.db import StateUnavailable, make_engine
from store.recording import GroupCommit, event_row
from store.schema import events
from support import DEPARTMENT, TEST_CORP_ID, rows


def _row(userid: str, **changes) -> dict:
    xml = wecom.event_xml("create_user", userid, TEST_CORP_ID, str(DEPARTMENT), create_time=1_700_000_000)
    return dict(event_row(xml, wecom.parse_event(xml), "pending", None, time.time()), **changes)


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def test_a_batch_creates_the_new_rows_and_names_the_resends_and_the_copies(engine):
    recorder = GroupCommit(engine)
    [(first_id, created)] = recorder._write([_row("user0001")])
    assert created
    outcomes = recorder._write([_row("user0001"), _row("user0002"), _row("user0002"), _row("user0003")])
    ids = [event_id for event_id, _ in outcomes]
    assert [created for _, created in outcomes] == [False, True, False, True]  # resend, new, copy, new
    assert ids[0] == first_id and ids[1] == ids[2]
    stored = rows(engine, events)
    assert sorted(e.user_id for e in stored) == ["user0001", "user0002", "user0003"]
    assert {e.id for e in stored} == set(ids) and {e.status for e in stored} == {"pending"}


def test_a_batch_of_new_rows_gives_each_caller_the_id_of_its_own_row(engine):
    recorder = GroupCommit(engine)
    recorder._write([_row("user0000")])  # ids do not start at 1
    outcomes = recorder._write([_row(f"user{i:04d}") for i in range(1, 6)])
    stored = {e.user_id: e.id for e in rows(engine, events)}
    assert outcomes == [(stored[f"user{i:04d}"], True) for i in range(1, 6)]


def test_a_resend_inside_a_batch_of_distinct_rows_is_found_and_the_others_are_new(engine):
    recorder = GroupCommit(engine)
    [(first_id, _)] = recorder._write([_row("user0002")])
    outcomes = recorder._write([_row(f"user{i:04d}") for i in range(1, 5)])  # user0002 is WeCom's resend
    stored = {e.user_id: e.id for e in rows(engine, events)}
    assert outcomes == [(stored["user0001"], True), (first_id, False), (stored["user0003"], True),
                        (stored["user0004"], True)]


def test_a_lone_resend_answers_with_the_id_of_the_first(engine):
    recorder = GroupCommit(engine)
    first_id, created = recorder.record(_row("user0001"))
    assert created and rows(engine, events)[0].id == first_id
    assert recorder.record(_row("user0001")) == (first_id, False)
    assert len(rows(engine, events)) == 1


def test_one_bad_row_fails_alone_and_its_batch_mates_are_recorded(mysql_url):
    engine = make_engine(mysql_url)
    migrate.upgrade(engine)
    bad = _row("user0002", status="s" * 40)  # too long for the column: MariaDB in strict mode refuses it
    outcomes = GroupCommit(engine)._write([_row("user0001"), bad, _row("user0003")])
    assert isinstance(outcomes[1], StateUnavailable)
    assert outcomes[0][1] and outcomes[2][1]
    assert sorted(e.user_id for e in rows(engine, events)) == ["user0001", "user0003"]
    engine.dispose()


def test_callbacks_that_arrive_together_share_a_statement_and_each_gets_its_own_answer(engine):
    batches: list[int] = []
    recorder = GroupCommit(engine, observe=batches.append)
    userids = [f"user{i:04d}" for i in range(1, 201)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda u: (u, recorder.record(_row(u))), userids + userids[:50]))
    stored = {e.user_id: e.id for e in rows(engine, events)}
    assert len(stored) == 200
    assert all(stored[userid] == event_id for userid, (event_id, _) in answers)  # each caller its own row
    assert sum(created for _, (_, created) in answers) == 200  # the 50 resends are not new
    assert sum(batches) == 250 and len(batches) < 250 and max(batches) > 1


def test_while_the_database_hangs_queued_callbacks_give_up_unwritten_and_in_time(engine):
    release = threading.Event()
    recorder = GroupCommit(engine, wait_seconds=0.5)
    real_write = recorder._write

    def hung_then_real(rows_):
        release.wait(5)  # the first writer is stuck on the database
        return real_write(rows_)

    recorder._write = hung_then_real
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(recorder.record, _row("user0001"))
        time.sleep(0.1)  # part of the scenario: the second callback arrives while the first write hangs
        started = time.monotonic()
        second = pool.submit(recorder.record, _row("user0002"))
        with pytest.raises(StateUnavailable, match="no answer from the state database"):
            second.result(timeout=5)
        waited = time.monotonic() - started
        release.set()
        assert first.result(timeout=5)[1]
    assert waited < 2  # answered (503) within its wait, not after the hung write
    assert [e.user_id for e in rows(engine, events)] == ["user0001"]  # the one that gave up was not written


def test_a_failing_database_fails_the_batch_and_everything_queued_behind_it(engine):
    recorder = GroupCommit(engine)
    entered, release = threading.Event(), threading.Event()

    def failing(rows_):
        entered.set()
        release.wait(5)
        return [StateUnavailable("OperationalError")] * len(rows_)

    recorder._write = failing
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(recorder.record, _row("user0001"))]
        entered.wait(5)
        futures += [pool.submit(recorder.record, _row(f"user{i:04d}")) for i in range(2, 8)]
        time.sleep(0.1)  # part of the scenario: they queue up behind the failing write
        release.set()
        errors = []
        for future in futures:
            with pytest.raises(StateUnavailable):
                future.result(timeout=5)
            errors.append(True)
    assert len(errors) == 7
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one() == 0


@pytest.mark.parametrize("size", [1, 3])
def test_a_write_whose_answer_was_lost_after_its_commit_is_still_reported_new_on_the_retry(engine, monkeypatch,
                                                                                          size):
    from sqlalchemy.exc import DBAPIError

    from store import recording
    real, calls = recording.write_rows, []

    def committed_then_cut(conn, rows_, stamp):
        calls.append(len(rows_))
        outcome = real(conn, rows_, stamp)
        if len(calls) == 1:  # the commit is done, the answer never reaches us
            raise DBAPIError("INSERT", {}, ConnectionResetError("reset"), connection_invalidated=True)
        return outcome

    monkeypatch.setattr(recording, "write_rows", committed_then_cut)
    outcomes = GroupCommit(engine)._write([_row(f"user{i:04d}") for i in range(1, 4)][:size])
    assert calls == [size, size]  # retried once, on a new connection
    assert [created for _, created in outcomes] == [True] * size  # new, not mistaken for WeCom's resends
    assert len(rows(engine, events)) == size
