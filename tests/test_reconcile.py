"""Reconciliation: a join or leave whose callback never came is announced once, through the outbox; a callback
for a change already announced is ignored with the reason; a listing that looks broken is never acted on.

Rounds are driven by hand on an injected clock (one interval apart, nothing waited for), except in the first
test, where the worker's own loop runs them with RECONCILE_SECONDS=2.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
import threading
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

import app as app_module
import services
import wecom
from delivery import reconcile
from devtools.wecom_standin import make_members
from prometheus_client import REGISTRY

from ops import checks, report
from store import membership, schema
from support.admin import post_login
from support import DEPARTMENT, TEST_CORP_ID, TEST_ADMIN_TOKEN, event_rows, rows, signed_post, wait_until

INTERVAL = 2.0
NEWCOMER = {"userid": "wangwu", "name": "王五", "department": [DEPARTMENT], "email": "wangwu@corp.example",
            "biz_mail": "", "status": 1}
SHANGHAI = ZoneInfo("Asia/Shanghai")


class Rounds:
    """Reconciliation rounds by hand, each one interval after the previous one (the clock is injected)."""

    def __init__(self, service, **overrides):
        self.service = service
        self.worker = service.make_worker(reconcile_seconds=INTERVAL, **overrides)
        self.now = time.time()
        self.reports: list[reconcile.RoundReport] = []

    def run(self, deliver: bool = True) -> reconcile.RoundReport:
        worker = self.worker
        result = reconcile.run_round(worker.settings, worker.engine, worker.reconciler.client, worker.owner,
                                     now=self.now, metrics=worker.metrics)
        assert result is not None, "the round was due and nobody else held it"
        self.reports.append(result)
        self.now += INTERVAL
        if deliver:
            self.service.drain(worker)
        return result


def about(message) -> tuple[str, str]:
    """(subject, the userid the mail is about), read back from the body the member gets."""
    body = message.get_content()
    return message["Subject"], re.search(r"成员 ID：(\S+)", body).group(1)


def mails_about(sink, userid: str) -> collections.Counter:
    """Recipient → how many mails about `userid` they got."""
    return collections.Counter(m["X-RcptTo"] for m in sink.messages if about(m)[1] == userid)


def addresses(*userids) -> set[str]:
    return {f"{u}@corp.example" for u in userids}


FIVE = [f"user{i:04d}" for i in range(1, 6)]


def callback(service, crypto, change_type: str, userid: str, name: str = "", new_userid: str = ""):
    """The callback WeCom sends for the change (CreateTime now), posted and recorded."""
    xml = wecom.event_xml(change_type, userid, TEST_CORP_ID, str(DEPARTMENT), create_time=int(time.time()),
                          name=name)
    if new_userid:
        xml = xml.replace("</UserID>", f"</UserID><NewUserID><![CDATA[{new_userid}]]></NewUserID>")
    assert signed_post(service.test_client(), crypto, xml).data == b"success"


def events_from(engine, source: str):
    return rows(engine, schema.events, schema.events.c.source == source)


# --- the promise -------------------------------------------------------------------------------------

def test_a_join_without_callback_is_mailed_once_by_the_worker_loop_and_its_late_callback_is_ignored(
        service, standin, smtp_sink, crypto):
    worker = service.make_worker(reconcile_seconds=INTERVAL)
    worker.start()
    try:
        wait_until(lambda: membership.department_state(service.engine, DEPARTMENT), timeout=30,
                   what="the first round to seed the department")
        assert smtp_sink.messages == []  # the existing members are not announced
        standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])  # and no callback
        started = time.monotonic()
        wait_until(lambda: len(smtp_sink.messages) >= 6, timeout=30, what="the reconciled join to be mailed")
        print(f"\njoin announced {time.monotonic() - started:.1f} s after it (RECONCILE_SECONDS={INTERVAL:g})")
        [synthetic] = events_from(service.engine, "reconcile")
        wait_until(lambda: event_rows(service.engine)[-1].status == "done", timeout=30, what="the event done")

        callback(service, crypto, "create_user", "wangwu", name="王五")  # the lost callback, late after all
        worker.wakeup.set()  # as the web process's delivery thread is woken after an answer
        wait_until(lambda: event_rows(service.engine)[-1].status == "ignored", timeout=30,
                   what="the late callback to be handled")
        runs = reconcile_runs(service.engine)
        wait_until(lambda: reconcile_runs(service.engine) >= runs + 2, timeout=30, what="two more rounds")
    finally:
        worker.shutdown()
    assert mails_about(smtp_sink, "wangwu") == dict.fromkeys(addresses(*FIVE, "wangwu"), 1)
    assert len(smtp_sink.messages) == 6
    assert {about(m)[0] for m in smtp_sink.messages} == {"新增成员"}
    assert (synthetic.change_type, synthetic.user_id, synthetic.departments) == ("create_user", "wangwu", "2")
    late = event_rows(service.engine)[-1]
    assert late.source == "callback" and late.status == "ignored"
    announced_at = membership.rows_of(service.engine, "wangwu")[DEPARTMENT].announced_at
    assert late.reason == ("already announced by reconciliation at "
                           + datetime.fromtimestamp(announced_at, SHANGHAI).strftime("%Y-%m-%d %H:%M:%S"))


def reconcile_runs(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.leases.c.runs).where(schema.leases.c.name == "reconcile")).scalar() or 0


def test_a_busy_worker_puts_a_due_round_off_for_one_interval_at_most(service, monkeypatch):
    started = []
    monkeypatch.setattr(reconcile, "run_round", lambda *args, **kwargs: started.append(time.time()))
    reconciler = service.make_worker(reconcile_seconds=INTERVAL).reconciler
    reconciler._next_check = time.time()  # a round is due now
    reconciler.tick(idle=False)  # the worker has an event in hand
    assert reconciler.thread is None
    reconciler.tick(idle=True)
    reconciler.join(10)
    assert len(started) == 1
    reconciler._next_check = time.time() - INTERVAL - 0.1  # overdue by more than an interval: busy or not
    reconciler.tick(idle=False)
    reconciler.join(10)
    assert len(started) == 2


def test_the_reconciled_join_says_when_it_was_first_seen_and_comes_after_two_listings(service, standin,
                                                                                       smtp_sink):
    rounds = Rounds(service)
    assert rounds.run().seeded == [DEPARTMENT]
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])
    first_seen = rounds.now
    assert rounds.run().announced == []  # one listing is not enough
    assert smtp_sink.messages == []
    [(event_id, change_type, userid)] = rounds.run().announced
    assert (change_type, userid) == ("create_user", "wangwu")
    assert len(smtp_sink.messages) == 6
    seen = datetime.fromtimestamp(int(first_seen), SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")
    body = smtp_sink.messages[0].get_content().replace("\r\n", "\n")
    assert f"新增时间：{seen}" in body and "新增成员 ID：wangwu" in body
    for _ in range(3):
        assert rounds.run().announced == []
    assert len(smtp_sink.messages) == 6


def test_the_callback_first_then_rounds_mail_once(service, standin, smtp_sink, crypto):
    rounds = Rounds(service)
    rounds.run()
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])
    callback(service, crypto, "create_user", "wangwu", name="王五")
    service.drain()
    assert len(smtp_sink.messages) == 6
    for _ in range(4):
        assert rounds.run().announced == []
    assert mails_about(smtp_sink, "wangwu") == dict.fromkeys(addresses(*FIVE, "wangwu"), 1)
    assert events_from(service.engine, "reconcile") == []
    assert membership.rows_of(service.engine, "wangwu")[DEPARTMENT].announced_by == "callback"


def test_a_leave_without_callback_mails_the_remaining_members_once_and_its_late_callback_is_ignored(
        service, standin, smtp_sink, crypto):
    rounds = Rounds(service)
    rounds.run()
    standin.set_members(DEPARTMENT, make_members(4, DEPARTMENT))  # user0005 left; WeCom's callback is lost
    rounds.run()
    assert smtp_sink.messages == []
    [(_, change_type, userid)] = rounds.run().announced
    assert (change_type, userid) == ("delete_user", "user0005")
    assert mails_about(smtp_sink, "user0005") == dict.fromkeys(addresses(*FIVE[:4]), 1)
    assert {about(m)[0] for m in smtp_sink.messages} == {"删除成员"}

    callback(service, crypto, "delete_user", "user0005")
    service.drain()
    for _ in range(2):
        rounds.run()
    assert len(smtp_sink.messages) == 4
    late = event_rows(service.engine)[-1]
    assert late.status == "ignored" and late.reason.startswith("already announced by reconciliation at ")


def test_a_callback_recorded_but_still_pending_is_left_to_announce_the_join(service, standin, smtp_sink, crypto):
    rounds = Rounds(service)
    rounds.run()
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])
    callback(service, crypto, "create_user", "wangwu", name="王五")  # recorded; its delivery has not begun
    for _ in range(3):
        result = rounds.run(deliver=False)
        assert result.announced == []
    assert result.waiting == ["wangwu"]
    service.drain()
    for _ in range(3):
        assert rounds.run().announced == []
    assert mails_about(smtp_sink, "wangwu") == dict.fromkeys(addresses(*FIVE, "wangwu"), 1)
    assert len(smtp_sink.messages) == 6 and events_from(service.engine, "reconcile") == []


# --- quiet about what it cannot see -------------------------------------------------------------------

LISTING_FAULTS = [
    ("rate limit 45009", lambda s: s.script("user/list", {"errcode": 45009, "errmsg": "api freq out of limit"}),
     "45009"),
    ("48009 and user/list_id refused too", lambda s: (
        s.script("user/list", {"errcode": 48009, "errmsg": "api forbidden for contact secret"}),
        s.script("user/list_id", {"errcode": 48002, "errmsg": "api forbidden"})), "48002"),
    ("token refused", lambda s: (s.expire_tokens(), s.script("gettoken", {"errcode": 40001, "errmsg": "invalid"})),
     "40001"),
    ("HTTP 502", lambda s: s.script("user/list", ("http", 502)), "HTTP 502"),
]


@pytest.mark.parametrize("fault, says", [(f, s) for _, f, s in LISTING_FAULTS], ids=[n for n, _, _ in LISTING_FAULTS])
def test_a_failed_listing_then_an_empty_department_announce_nothing(service, standin, smtp_sink, caplog, fault,
                                                                    says):
    caplog.set_level(logging.INFO, logger="wecom_mailer.reconcile")
    rounds = Rounds(service)
    rounds.run()
    failures_before = _sample("wecom_mailer_reconcile_failures_total", reason="listing")
    fault(standin)
    failed = rounds.run()
    assert list(failed.failed) == [DEPARTMENT] and says in failed.failed[DEPARTMENT]
    standin.clear_script()
    standin.set_members(DEPARTMENT, [])  # WeCom answers, with nobody in the department
    for _ in range(4):
        empty = rounds.run()
        assert empty.announced == [] and "the listing is empty" in empty.failed[DEPARTMENT]
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT))
    for _ in range(3):
        assert rounds.run().announced == []
    assert smtp_sink.messages == [] and event_rows(service.engine) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(says in w and "nothing announced" in w for w in warnings)
    assert sum("the listing is empty while 5 member(s) are announced" in w for w in warnings) == 4
    assert _sample("wecom_mailer_reconcile_failures_total", reason="listing") == failures_before + 1
    assert reconcile_outcome(service.engine).startswith("ok")


def reconcile_outcome(engine) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.leases.c.last_outcome)).scalar_one()


def test_a_listing_that_drops_most_of_the_department_waits_for_a_third_listing(service, standin, smtp_sink,
                                                                               caplog):
    caplog.set_level(logging.INFO, logger="wecom_mailer.reconcile")
    standin.set_members(DEPARTMENT, make_members(10, DEPARTMENT))
    rounds = Rounds(service)
    rounds.run()
    standin.set_members(DEPARTMENT, make_members(4, DEPARTMENT))  # 6 of 10 gone at once
    assert rounds.run().announced == []
    assert rounds.run().announced == []  # two listings would do for a small change: not for this one
    assert smtp_sink.messages == []
    waiting = [r.getMessage() for r in caplog.records if "not acted on until a third listing confirms it" in
               r.getMessage()]
    assert len(waiting) == 2 and "lacks 6 of its 10 announced members" in waiting[0]
    third = rounds.run()
    assert sorted(userid for _, _, userid in third.announced) == [f"user{i:04d}" for i in range(5, 11)]
    assert any("a third listing confirms it: 6 leave(s) announced" in r.getMessage() for r in caplog.records)
    counts = collections.Counter(m["X-RcptTo"] for m in smtp_sink.messages)
    assert counts == dict.fromkeys(addresses(*[f"user{i:04d}" for i in range(1, 5)]), 6)


def test_a_listing_that_drops_most_of_the_department_and_comes_back_announces_nothing(service, standin,
                                                                                     smtp_sink):
    standin.set_members(DEPARTMENT, make_members(10, DEPARTMENT))
    rounds = Rounds(service)
    rounds.run()
    standin.set_members(DEPARTMENT, make_members(3, DEPARTMENT))  # a partial answer, twice
    rounds.run()
    rounds.run()
    standin.set_members(DEPARTMENT, make_members(10, DEPARTMENT))
    for _ in range(3):
        assert rounds.run().announced == []
    assert smtp_sink.messages == []


# --- starts and restarts -----------------------------------------------------------------------------

def test_the_first_start_announces_nobody_and_a_restart_announces_nothing(service, service_env, standin,
                                                                         smtp_sink):
    rounds = Rounds(service)
    first = rounds.run()
    assert first.seeded == [DEPARTMENT] and first.announced == []
    seeded = rows(service.engine, schema.membership)
    assert sorted((r.userid, r.state, r.announced_by) for r in seeded) == [(u, "joined", "seed") for u in FIVE]
    for _ in range(3):
        assert rounds.run().announced == []

    restarted = restart(service_env)  # a new process on the same state database
    again = Rounds(restarted)
    again.now = rounds.now
    for _ in range(3):
        result = again.run()
        assert result.seeded == [] and result.announced == []
    assert smtp_sink.messages == [] and event_rows(service.engine) == []


def restart(service_env):
    """The service as a freshly started process would build it, on the same state database."""
    flask_app = app_module.create_app(service_env)
    parts = services.of(flask_app)

    def make_worker(**overrides):
        return parts.make_worker(dataclasses.replace(parts.settings, **overrides))

    def drain(worker):
        worker.ensure_snapshots()
        for _ in range(200):
            if not worker.run_once():
                return worker
        raise AssertionError("worker still busy")

    flask_app.make_worker, flask_app.drain, flask_app.engine = make_worker, drain, parts.engine
    return flask_app


def test_a_join_while_the_service_was_down_is_announced_after_the_restart(service, service_env, standin,
                                                                          smtp_sink):
    rounds = Rounds(service)
    rounds.run()
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])  # during a deploy: callback lost
    again = Rounds(restart(service_env))
    again.now = rounds.now + 3600
    again.run()
    [(_, change_type, userid)] = again.run().announced
    assert (change_type, userid) == ("create_user", "wangwu")
    assert mails_about(smtp_sink, "wangwu") == dict.fromkeys(addresses(*FIVE, "wangwu"), 1)


def test_changing_wecom_fetch_child_seeds_again_instead_of_announcing_the_sub_departments(service, standin,
                                                                                          smtp_sink):
    standin.children = {DEPARTMENT: [21]}
    standin.set_members(21, [dict(m, department=[21]) for m in make_members(3, 21, prefix="sub")])
    Rounds(service).run()  # department 2 alone
    rounds = Rounds(service, fetch_child=True)  # restarted with WECOM_FETCH_CHILD=true: 2 and 21
    rounds.now += 3600
    assert rounds.run().seeded == [DEPARTMENT]
    for _ in range(3):
        assert rounds.run().announced == []
    assert smtp_sink.messages == []
    assert len(membership.joined_members(service.engine, DEPARTMENT)) == 8


def test_a_join_a_callback_announced_before_the_first_round_is_not_announced_again(service, standin, smtp_sink,
                                                                                   crypto):
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])
    callback(service, crypto, "create_user", "wangwu", name="王五")
    service.drain()
    assert len(smtp_sink.messages) == 6
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT))  # the first listing lags behind the callback
    rounds = Rounds(service)
    assert rounds.run().seeded == [DEPARTMENT]
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])
    for _ in range(3):
        assert rounds.run().announced == []
    assert len(smtp_sink.messages) == 6


# --- one announcement per change, also when they race ---------------------------------------------------

def test_a_renamed_userid_moves_the_record_and_is_announced_as_nothing(service, standin, smtp_sink, crypto):
    rounds = Rounds(service)
    rounds.run()
    renamed = [dict(m, userid="zhangsan") if m["userid"] == "user0003" else m for m in make_members(5, DEPARTMENT)]
    renamed[2]["email"] = "zhangsan@corp.example"
    standin.set_members(DEPARTMENT, renamed)
    callback(service, crypto, "update_user", "user0003", new_userid="zhangsan")
    service.drain()
    assert len(smtp_sink.messages) == 5  # the update's own mail
    for _ in range(3):
        assert rounds.run().announced == []
    assert sorted(membership.joined_members(service.engine, DEPARTMENT)) == sorted(
        ["user0001", "user0002", "zhangsan", "user0004", "user0005"])


@pytest.mark.parametrize("state", ["joined", "left"])
def test_a_callback_and_a_round_marking_the_same_change_at_once_announce_it_once(service, state):
    """Twenty members, each marked by a 'callback' and a 'round' in two threads released together."""
    engine = service.engine
    userids = [f"race{i:02d}" for i in range(20)]
    if state == "left":
        for userid in userids:
            membership.mark(engine, DEPARTMENT, userid, "joined", "seed", None, 0)
    winners = collections.Counter()

    def as_callback(userid, gate):
        gate.wait(10)
        if membership.mark(engine, DEPARTMENT, userid, state, "callback", 1, time.time()).changed:
            winners[userid, "callback"] += 1

    def as_round(userid, gate):
        gate.wait(10)
        event = {"dedup_key": membership.announcement_key([DEPARTMENT], userid, state, 1), "change_type": "x",
                 "user_id": userid, "create_time": 0, "xml": "<xml/>", "status": "ignored", "reason": "race test",
                 "attempts": 0, "received_at": time.time(), "next_attempt_at": 0, "source": "reconcile"}
        event_id, _ = membership.announce(engine, [DEPARTMENT], userid, state, "", 0, event, time.time())
        if event_id is not None:
            winners[userid, "round"] += 1

    for userid in userids:
        gate = threading.Barrier(2)
        threads = [threading.Thread(target=f, args=(userid, gate)) for f in (as_callback, as_round)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert [sum(winners[u, who] for who in ("callback", "round")) for u in userids] == [1] * 20
    recorded = rows(engine, schema.events, schema.events.c.source == "reconcile")
    assert len(recorded) == sum(winners[u, "round"] for u in userids)


def test_a_member_who_joins_two_watched_departments_gets_one_mail(service, standin, smtp_sink):
    standin.set_members(3, [dict(m, department=[3]) for m in make_members(2, 3, prefix="ops")])
    rounds = Rounds(service, department_ids=(DEPARTMENT, 3))
    rounds.run()
    both = dict(NEWCOMER, department=[DEPARTMENT, 3])
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [both])
    standin.set_members(3, [dict(m, department=[3]) for m in make_members(2, 3, prefix="ops")] + [both])
    rounds.run()
    [(_, _, userid)] = rounds.run().announced
    assert userid == "wangwu"
    assert mails_about(smtp_sink, "wangwu") == dict.fromkeys(addresses(*FIVE, "ops0001", "ops0002", "wangwu"), 1)
    [synthetic] = events_from(service.engine, "reconcile")
    assert synthetic.departments == f"{DEPARTMENT},3"


# --- seen by operators ---------------------------------------------------------------------------------

def _sample(name: str, **labels) -> float:
    """A counter of this process as /metrics shows it (0 before its first increment)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_status_check_metrics_and_admin_show_what_reconciliation_found(service, service_env, standin, smtp_sink,
                                                                       crypto):
    rounds_before = _sample("wecom_mailer_reconcile_rounds_total", outcome="ok")
    created_before = _sample("wecom_mailer_reconcile_events_total", change_type="create_user")
    rounds = Rounds(service)
    rounds.run()
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [NEWCOMER])
    rounds.run()
    rounds.run()
    callback(service, crypto, "create_user", "wangwu")
    service.drain()
    assert _sample("wecom_mailer_reconcile_rounds_total", outcome="ok") == rounds_before + 3
    assert _sample("wecom_mailer_reconcile_events_total", change_type="create_user") == created_before + 1

    lines = report.status_lines(service.engine, SHANGHAI)
    synthetic = next(line for line in lines if " create_user " in line and "wangwu" in line and "done" in line)
    assert synthetic.endswith("(source: reconcile)")
    assert any(line.strip().startswith("reason: already announced by reconciliation at") for line in lines)

    settings = dataclasses.replace(service.parts.settings, reconcile_seconds=900)
    ok, line = checks.reconciliation(service.engine, settings)
    when = datetime.fromtimestamp(rounds.now - INTERVAL, SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")
    assert ok and line == (f"reconciliation (every 900 s): last round {when} (Asia/Shanghai); 1 change(s) found "
                           "in the last 7 days that WeCom's callbacks never delivered")
    standin.script("user/list", {"errcode": 45009, "errmsg": "api freq out of limit"})
    rounds.run()
    ok, line = checks.reconciliation(service.engine, settings)
    assert not ok and "last round failed: department 2: listing failed" in line and "45009" in line

    admin = app_module.create_app(dict(service_env, ADMIN_TOKEN=TEST_ADMIN_TOKEN)).test_client()
    assert post_login(admin, TEST_ADMIN_TOKEN).status_code == 302
    page = admin.get("/admin/").get_data(as_text=True)
    [row] = [r for r in re.findall(r'<tr id="event-\d+">.*?</tr>', page, re.S) if "对账 reconcile" in r]
    assert "wangwu" in row and "create_user" in row
    event_id = events_from(service.engine, "reconcile")[0].id
    detail = admin.get(f"/admin/events/{event_id}").get_data(as_text=True)
    assert re.search(r'<dd id="event-source">对账 reconcile', detail)


def test_check_prints_the_reconciliation_line(service, service_env, tmp_path):
    parts = services.of(app_module.create_app(dict(service_env, RECONCILE_SECONDS="900")))
    results = checks.run_all(parts)
    assert (True, "reconciliation (every 900 s): has not run yet (the first delivery worker to start runs it)") \
        in results
    assert all(ok for ok, _ in results)
    without = checks.run_all(service.parts)  # RECONCILE_SECONDS=0: no line
    assert not any(line.startswith("reconciliation") for _, line in without)
