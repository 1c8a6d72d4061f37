"""Group commit on the callback path: callbacks that arrive together share one INSERT and one commit, and each
is answered `success` only once the commit that holds its row is done; a database that dies mid-batch, or a web
process killed mid-batch, costs WeCom a retry and never an event."""
from __future__ import annotations

import collections
import hashlib
import os
import re
import signal
import threading
import time

import pytest
import requests
import sqlalchemy as sa

from store import db, schema
from support.reliability import (event_xml, figure, packet, post, prepare_database, private_mariadb,  # noqa: F401
                                 reliability_env, rows, wait_for)
from devtools.latency_proxy import LatencyProxy

SUCCESS = (200, "success")
UNAVAILABLE = (503, "state database unavailable\n")
LOST = (0, "connection error")  # the answer never came: the process serving it died


class Callback:
    """One sealed callback about `userid`, kept so that it can be sent again as WeCom's retry."""

    def __init__(self, crypto, userid: str):
        xml = event_xml(userid)
        self.userid = userid
        self.dedup_key = hashlib.sha256(xml.encode("utf-8")).hexdigest()  # the event's unique key
        self.sealed = packet(crypto, xml)


def _answer(base: str, callback: Callback, session) -> tuple[int, str]:
    # WeCom waits 5 s for an answer: a slower one is a timeout to WeCom, and fails these tests too.
    try:
        answer = post(base, callback.sealed, session, timeout=5)
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
        return LOST  # refused, reset, or cut off mid-answer
    return answer.status_code, answer.text


def _sending(callbacks: list[Callback], threads: int, send):
    """Start `send(callback, session)` for every callback from `threads` threads that leave at the same instant;
    each thread has its own keep-alive session and takes the next callback not yet taken. Returns `finish()`,
    which waits for them and fails with what went wrong in any of them."""
    pending = iter(callbacks)
    taking = threading.Lock()
    gate = threading.Barrier(threads)
    failures: list[BaseException] = []

    def sender():
        try:
            with requests.Session() as session:
                gate.wait(timeout=10)
                while True:
                    with taking:
                        callback = next(pending, None)
                    if callback is None:
                        return
                    send(callback, session)
        except BaseException as exc:  # noqa: BLE001 (reported by finish(), in the test's own thread)
            failures.append(exc)

    senders = [threading.Thread(target=sender) for _ in range(threads)]
    for one in senders:
        one.start()

    def finish():
        for one in senders:
            one.join(timeout=120)
        assert not any(one.is_alive() for one in senders), "senders still running after 120 s"
        assert not failures, failures
    return finish


def _streaming(base: str, callbacks: list[Callback], threads: int, after: int):
    """_sending(...) of plain posts: (answers by userid, an event set once `after` are answered, finish)."""
    answers: dict[str, tuple[int, str]] = {}
    reached = threading.Event()

    def send(callback, session):
        answers[callback.userid] = _answer(base, callback, session)
        if len(answers) >= after:
            reached.set()
    return answers, reached, _sending(callbacks, threads, send)


def _send_together(callbacks: list[Callback], threads: int, send) -> None:
    """_sending(...), waited for."""
    _sending(callbacks, threads, send)()


def _batches(base: str) -> tuple[float, float]:
    """(INSERT batches written, rows in them) from /metrics, every web process added up."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    found = {}
    for suffix in ("count", "sum"):
        match = re.search(rf"^wecom_mailer_callback_batch_rows_{suffix}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        assert match, f"/metrics shows no wecom_mailer_callback_batch_rows_{suffix}:\n{text[:3000]}"
        found[suffix] = float(match.group(1))
    return found["count"], found["sum"]


def _rows_per_user(engine) -> collections.Counter:
    return collections.Counter(e.user_id for e in rows(engine, schema.events))


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


# --- 1. many at once: fewer commits than callbacks, and no answer before its commit ------------------------

DISTINCT = 200
SENDERS = 48
DATABASE_ONE_WAY = 0.02  # what the service sends the database arrives 20 ms later, and its answers too


@pytest.fixture
def distant_database(mysql_url):
    """mysql_url's database as the service sees it on another host, 20 ms each way (devtools' LatencyProxy);
    its URL is `.url`. A callback answered before its commit is then answered 20 ms early, while the test reads
    the row straight from the server: an early answer cannot hide in a microsecond race."""
    url = sa.engine.make_url(mysql_url)
    with LatencyProxy((url.host, url.port or 3306), rtt=2 * DATABASE_ONE_WAY) as link:
        link.url = url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
        yield link


@pytest.mark.slow
def test_200_concurrent_callbacks_share_commits_and_each_success_comes_after_its_row_is_committed(
        standin, smtp_sink, mysql_url, distant_database, processes, crypto):
    engine = prepare_database(mysql_url)
    # Straight to the server and on other connections than the service's: a row seen here is committed.
    observer = sa.create_engine(mysql_url, isolation_level="AUTOCOMMIT", pool_size=SENDERS, max_overflow=0)
    for conn in [observer.connect() for _ in range(SENDERS)]:  # connected before the burst, not during it
        conn.close()
    web, base = processes.gunicorn(reliability_env(standin, smtp_sink, distant_database.url,
                                                   WORKER_IN_WEB="false"))
    callbacks = [Callback(crypto, f"burst{i:03d}") for i in range(DISTINCT)]
    answers: dict[str, tuple[int, str]] = {}
    answered_before_commit: list[str] = []

    def send(callback, session):
        answers[callback.userid] = answer = _answer(base, callback, session)
        if answer == SUCCESS:  # at this instant, the row must already be there for everyone to see
            with observer.connect() as conn:
                stored = conn.execute(sa.select(schema.events.c.user_id)
                                      .where(schema.events.c.dedup_key == callback.dedup_key)).scalar()
            if stored != callback.userid:
                answered_before_commit.append(callback.userid)

    try:
        started = time.monotonic()
        _send_together(callbacks, SENDERS, send)
        took = time.monotonic() - started
        batches, written = _batches(base)
    finally:
        observer.dispose()

    figure("group commit: answers", dict(collections.Counter(answers.values())))
    figure("group commit: INSERT batches for 200 callbacks", int(batches))
    figure("group commit: rows per batch (mean)", round(written / batches, 1) if batches else None)
    figure("group commit: 200 callbacks answered and checked, database 20 ms away (s)", round(took, 2))
    assert [answers[c.userid] for c in callbacks] == [SUCCESS] * DISTINCT, web.log[-3000:]
    assert answered_before_commit == []
    assert _rows_per_user(engine) == {c.userid: 1 for c in callbacks}
    assert written == DISTINCT  # every row written in exactly one batch
    assert 1 <= batches < DISTINCT  # callbacks that arrived together shared a commit


# --- 2. one callback fifty times at once: one row, fifty successes ------------------------------------------

COPIES = 50


@pytest.mark.slow
def test_50_concurrent_copies_of_one_callback_make_one_row_and_50_successes(
        standin, smtp_sink, mysql_url, processes, crypto):
    engine = prepare_database(mysql_url)
    web, base = processes.gunicorn(reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="false"))
    copied = Callback(crypto, "copied")
    answers: list[tuple[int, str]] = []

    _send_together([copied] * COPIES, COPIES, lambda callback, session: answers.append(
        _answer(base, callback, session)))

    figure("copies: answers", dict(collections.Counter(answers)))
    assert answers == [SUCCESS] * COPIES, web.log[-3000:]
    assert _rows_per_user(engine) == {"copied": 1}
    assert [e.dedup_key for e in rows(engine, schema.events)] == [copied.dedup_key]
    batches, written = _batches(base)
    figure("copies: INSERT batches for 50 copies", int(batches))
    figure("copies: rows in them", int(written))


# --- 3. the database dies mid-batch: 503 for that batch, and WeCom's retry records it ---------------------

STREAM = 400
CRASH_AFTER = 40


@pytest.mark.slow
def test_database_crash_mid_batch_answers_503_never_a_false_success_and_the_retries_record_each_event_once(
        private_mariadb, standin, smtp_sink, processes, crypto):
    private_mariadb.start()
    prepare_database(private_mariadb.url).dispose()
    web, base = processes.gunicorn(reliability_env(standin, smtp_sink, private_mariadb.url,
                                                   WORKER_IN_WEB="false"))
    callbacks = [Callback(crypto, f"crash{i:03d}") for i in range(STREAM)]
    answers, crash_now, finish = _streaming(base, callbacks, 8, CRASH_AFTER)
    try:
        assert crash_now.wait(timeout=60), "the stream of callbacks never got going"
        private_mariadb.crash()  # while eight senders have callbacks in flight
        crashed_at = len(answers)
    finally:
        finish()

    outcome = collections.Counter(answers.values())
    figure("database crash mid-batch: answers", dict(outcome))
    figure("database crash mid-batch: answered when the database died", crashed_at)
    assert len(answers) == STREAM
    assert set(outcome) <= {SUCCESS, UNAVAILABLE}, web.log[-3000:]  # no 500, no timeout, no dropped answer

    private_mariadb.start()
    wait_for(lambda: _status(f"{base}/readyz") == 200, 30, "/readyz to answer 200 again", web)
    engine = db.make_engine(private_mariadb.url)
    try:
        recorded = _rows_per_user(engine)
        answered_without_row = [u for u, answer in answers.items() if answer == SUCCESS and u not in recorded]
        assert answered_without_row == []  # a success survives the crash: it was committed before the answer
        assert outcome[UNAVAILABLE] >= 10  # the crash hit callbacks in flight and after, not an idle service
        assert "state database unavailable, answered 503 so WeCom retries" in web.log

        # WeCom retries every callback (the answered ones too, as if their answers had been lost).
        retries = {}
        _send_together(callbacks, 8, lambda callback, session: retries.__setitem__(
            callback.userid, _answer(base, callback, session)))
        assert [retries[c.userid] for c in callbacks] == [SUCCESS] * STREAM, web.log[-3000:]
        assert _rows_per_user(engine) == {c.userid: 1 for c in callbacks}
        for event in rows(engine, schema.events):  # no half-written row: each is complete
            assert event.xml.startswith("<xml>") and event.change_type == "create_user" and event.received_at
    finally:
        engine.dispose()


# --- 4. kill -9 of a web process under load: every success has its row ------------------------------------

LOAD = 400
KILL_AFTER = 100


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (gunicorn's arbiter: its workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def _callers_held(pid: int, port: int) -> int:
    """How many established connections to `port` process `pid` holds: the callers it is serving."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                for line in list(lines)[1:]:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                        established.add(fields[9])
        except OSError:
            continue
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        held += target.startswith("socket:[") and target[8:-1] in established
    return held


@pytest.mark.slow
def test_sigkill_of_a_web_process_under_load_loses_no_answered_event_and_the_retries_record_the_rest(
        standin, smtp_sink, mysql_url, distant_database, processes, crypto):
    engine = prepare_database(mysql_url)
    # The database 20 ms away: each write takes long enough for the kill to land in the middle of one.
    web, base = processes.gunicorn(reliability_env(standin, smtp_sink, distant_database.url,
                                                   WORKER_IN_WEB="false"), workers=2)
    port = int(base.rsplit(":", 1)[1])
    arbiter = web.proc.pid
    wait_for(lambda: len(_children(arbiter)) == 2, 30, "two gunicorn workers", web)
    callbacks = [Callback(crypto, f"load{i:03d}") for i in range(LOAD)]
    answers, kill_now, finish = _streaming(base, callbacks, 12, KILL_AFTER)
    try:
        assert kill_now.wait(timeout=60), "the load never got going"
        # The worker serving more of the twelve callers' connections: killed in the middle of its work.
        held = {pid: _callers_held(pid, port) for pid in _children(arbiter)}
        victim = max(held, key=held.get)
        os.kill(victim, signal.SIGKILL)
        killed_at = len(answers)
    finally:
        finish()
    wait_for(lambda: len(_children(arbiter)) == 2 and victim not in _children(arbiter), 30,
             "gunicorn to replace the killed worker", web)

    outcome = collections.Counter(answers.values())
    figure("kill -9 of a web process: answers", dict(outcome))
    figure("kill -9 of a web process: answered when it was killed", killed_at)
    figure("kill -9 of a web process: callers' connections held by each worker", sorted(held.values()))
    assert len(answers) == LOAD
    assert set(outcome) <= {SUCCESS, UNAVAILABLE, LOST}, web.log[-3000:]
    assert outcome[LOST] >= 1  # the kill caught callbacks in flight
    assert sum(1 for c in callbacks[killed_at + 2 * 12:] if answers[c.userid] == SUCCESS) > 0  # still serving

    recorded = _rows_per_user(engine)
    answered_without_row = [u for u, answer in answers.items() if answer == SUCCESS and u not in recorded]
    assert answered_without_row == []

    failed = [c for c in callbacks if answers[c.userid] != SUCCESS]
    figure("kill -9 of a web process: callbacks to retry", len(failed))
    retries = {}
    _send_together(failed, 4, lambda callback, session: retries.__setitem__(
        callback.userid, _answer(base, callback, session)))
    assert [retries[c.userid] for c in failed] == [SUCCESS] * len(failed), web.log[-3000:]
    assert _rows_per_user(engine) == {c.userid: 1 for c in callbacks}
