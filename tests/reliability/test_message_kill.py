"""A worker killed between message/send and its mark (issue 21): the next worker sends the same request again,
WeCom's duplicate check (enable_duplicate_check, 1,800 s) drops it, and the ledger ends with each member once."""
from __future__ import annotations

import collections
import signal

import pytest

from devtools.wecom_standin import make_members
from store import schema
from support import DEPARTMENT
from support.messages import APP_AGENT_ID, APP_SECRET, received
from support.reliability import event_xml, figure, packet, post, prepare_database, reliability_env, rows, wait_for

MEMBERS = 1500  # two calls: the kill comes during the first


@pytest.mark.slow
def test_a_worker_killed_after_message_send_before_its_mark_repeats_nothing(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    standin.enable_app(APP_AGENT_ID, APP_SECRET)
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="false", LEASE_SECONDS="1",
                          WECOM_MESSAGE="only", WECOM_AGENT_ID=APP_AGENT_ID, WECOM_APP_SECRET=APP_SECRET)
    _, base = processes.gunicorn(env)
    first = processes.worker(env)
    killed = []

    def kill_on_first_call(request):
        if not killed:  # recorded (and delivered) by WeCom; the worker dies before it reads the answer
            killed.append(request)
            first.signal(signal.SIGKILL)
            first.proc.wait(timeout=10)
    standin.on_message = kill_on_first_call
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"
    wait_for(lambda: killed, 60, "the first message/send call", first)
    [event] = rows(engine, schema.events)
    assert event.status == "sending"
    assert {d.status for d in rows(engine, schema.deliveries)} == {"pending"}  # nothing marked

    last = processes.worker(env)
    wait_for(lambda: rows(engine, schema.events)[0].status == "done", 60, "the event to be done", last)

    calls = standin.message_calls
    figure("message/send calls", len(calls))
    figure("dropped by the duplicate check", sum(c["duplicate"] for c in calls))
    assert calls[1]["request"] == calls[0]["request"] and calls[1]["duplicate"]  # the same content again
    assert all(c["request"]["enable_duplicate_check"] == 1 for c in calls)
    assert received(standin) == {f"user{i:04d}": 1 for i in range(1, MEMBERS + 1)}
    deliveries = rows(engine, schema.deliveries)
    assert collections.Counter((d.userid, d.status) for d in deliveries) == {
        (f"user{i:04d}", "sent"): 1 for i in range(1, MEMBERS + 1)}
