"""Reconciliation across processes: two gunicorn workers (each with its delivery thread) and two `flask worker`s
on one MariaDB, RECONCILE_SECONDS=2. One of them lists the department per interval; each change whose
callback never came reaches every member once, and the late callback adds nothing."""
from __future__ import annotations

import collections
import re
import time

import pytest
import sqlalchemy as sa

from devtools.wecom_standin import make_members
from store import schema
from support import DEPARTMENT
from support.reliability import event_xml, figure, packet, post, prepare_database, reliability_env, rows, wait_for

INTERVAL = 2
NEWCOMER = {"userid": "wangwu", "name": "王五", "department": [DEPARTMENT], "email": "wangwu@corp.example"}


def runs(engine) -> int:
    """Reconciliation rounds taken so far (the lease row counts them)."""
    return _lease(engine).runs


def _lease(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.leases).where(schema.leases.c.name == "reconcile")).one()


def between_rounds(engine, standin, *processes) -> tuple[int, int]:
    """(rounds so far, user/list calls so far), read while no round is in progress, so that every round
    counted has made its listing (and logged its line) and no listing of a later round is counted."""
    def reading():
        before = _lease(engine)
        calls = standin.calls["user/list"]
        after = _lease(engine)
        if before.lease_until is None and after.lease_until is None and after.runs == before.runs:
            return before.runs, calls
        return None
    return wait_for(reading, 30, "a moment between two rounds", *processes)


def about(message) -> tuple[str, str]:
    """(subject, userid the mail is about)."""
    return message["Subject"], re.search(r"成员 ID：(\S+)", message.get_content()).group(1)


@pytest.mark.slow
def test_two_web_processes_and_two_workers_reconcile_once_per_interval_and_mail_each_change_once(
        standin, smtp_sink, mysql_url, processes, crypto):
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="true", RECONCILE_SECONDS=INTERVAL)
    web, base = processes.gunicorn(env, workers=2)
    workers = [processes.worker(env, name=f"worker{i}") for i in (1, 2)]
    everyone = (web, *workers)
    wait_for(lambda: rows(engine, schema.reconciled_departments), 60, "the first round to seed the department",
             *everyone)
    wait_for(lambda: all("delivery worker" in p.log for p in workers) and web.log.count("delivery worker") >= 2,
             60, "all four delivery loops to run", *everyone)

    # A quiet spell: nothing changes, so only reconciliation lists the department.
    started = time.monotonic()
    rounds, calls = between_rounds(engine, standin, *everyone)
    wait_for(lambda: runs(engine) >= rounds + 5, 60, "five more rounds", *everyone)
    rounds_after, calls_after = between_rounds(engine, standin, *everyone)
    quiet_seconds = time.monotonic() - started
    quiet_calls, quiet_rounds = calls_after - calls, rounds_after - rounds
    figure("reconcile: user/list calls in a quiet spell", f"{quiet_calls} in {quiet_seconds:.1f} s, "
                                                          f"{quiet_rounds} rounds, 4 processes")
    assert quiet_calls == quiet_rounds  # one listing per round, by one process
    assert quiet_rounds <= quiet_seconds / INTERVAL + 1  # and one round per interval, not one per process
    assert smtp_sink.messages == []  # the members at the first start are never announced

    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])  # a join, its callback lost
    wait_for(lambda: len(smtp_sink.messages) >= 6, 60, "the join to be mailed", *everyone)
    late = post(base, packet(crypto, event_xml("wangwu", name="王五")))  # then WeCom's callback after all
    assert late.text == "success"
    wait_for(lambda: rows(engine, schema.events)[-1].status == "ignored", 60, "the late callback handled",
             *everyone)

    standin.set_members(DEPARTMENT, make_members(4, DEPARTMENT) + [NEWCOMER])  # user0005 leaves, no callback
    wait_for(lambda: len(smtp_sink.messages) >= 11, 60, "the leave to be mailed", *everyone)
    settled = runs(engine)
    wait_for(lambda: runs(engine) >= settled + 3, 60, "three more rounds", *everyone)
    time.sleep(1)  # a duplicate would arrive now, if any process were to send one
    rounds, _ = between_rounds(engine, standin, *everyone)

    mails = collections.Counter((m["X-RcptTo"], *about(m)) for m in smtp_sink.messages)
    events = rows(engine, schema.events)
    ran = {p.log_path.name: len(re.findall(r"reconciliation round \d+:", p.log)) for p in everyone}
    figure("reconcile: rounds run per process log", ran)
    figure("reconcile: mails", len(smtp_sink.messages))
    joined_to = {f"user{i:04d}@corp.example" for i in range(1, 6)} | {"wangwu@corp.example"}
    left_to = joined_to - {"user0005@corp.example"}
    assert mails == {**{(rcpt, "新增成员", "wangwu"): 1 for rcpt in joined_to},
                     **{(rcpt, "删除成员", "user0005"): 1 for rcpt in left_to}}
    assert [(e.source, e.change_type, e.user_id, e.status) for e in events] == [
        ("reconcile", "create_user", "wangwu", "done"), ("callback", "create_user", "wangwu", "ignored"),
        ("reconcile", "delete_user", "user0005", "done")]
    assert events[1].reason.startswith("already announced by reconciliation at ")
    assert rounds <= sum(ran.values()) <= rounds + 1  # each round run and logged by one process (one may start since)
