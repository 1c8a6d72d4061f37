"""SMTP outages: the server gone for 10 s, or answering 451 for a while → all delivered later, none failed."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from store import schema
from support import DEPARTMENT, ROOT
from support.reliability import (addresses, duplicates, event_xml, figure, packet, post, prepare_database, recipients,
                     reliability_env, rows, wait_for)
from devtools.wecom_standin import make_members

MEMBERS = 300
OUTAGE_SECONDS = 10


def _deliveries_in_retry(engine):
    return [d for d in rows(engine, schema.deliveries) if d.status == "retry"]


@pytest.mark.slow
def test_smtp_server_down_for_ten_seconds_mid_fan_out_then_everything_is_delivered(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    _, base = processes.gunicorn(reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="true"))
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"
    wait_for(lambda: len(smtp_sink.messages) >= MEMBERS // 3, 60, "a third of the fan-out")

    smtp_sink.stop()
    down_at = time.monotonic()
    # While the server is down the worker backs off: the row it tried is in retry with the reason.
    in_retry = wait_for(lambda: [d for d in _deliveries_in_retry(engine) if d.attempts >= 3], OUTAGE_SECONDS,
                        "a delivery retried three times during the outage")
    # Part of the scenario, not a wait for a condition: the server stays down for OUTAGE_SECONDS.
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
    during = rows(engine, schema.deliveries)
    smtp_sink.start()
    figure("SMTP outage survived (s)", round(time.monotonic() - down_at, 1))

    retried = max(in_retry, key=lambda d: d.attempts)
    assert "127.0.0.1" in retried.reason and retried.next_attempt_at > retried.first_attempt_at
    attempts_during = max(d.attempts for d in during)
    figure("highest attempts of one delivery during the outage", attempts_during)
    # Doubling backoff (0.2, 0.4, 0.8, … s): far fewer tries than a busy loop would make in 10 s.
    assert 3 <= attempts_during <= 8
    assert [d for d in during if d.status == "failed"] == []

    wait_for(lambda: rows(engine, schema.events)[0].status == "done", 60, "the event to be done after recovery")
    got = recipients(smtp_sink)
    deliveries = rows(engine, schema.deliveries)
    assert set(got) == addresses(MEMBERS) and duplicates(got) == 0
    assert {d.status for d in deliveries} == {"sent"}
    assert max(d.attempts for d in deliveries) == attempts_during + 1


@pytest.mark.slow
def test_an_outage_longer_than_retry_max_hours_fails_every_recipient_together_and_status_says_why(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(40, DEPARTMENT))
    engine = prepare_database(mysql_url)
    max_hours = 0.001  # 3.6 s
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="true", RETRY_MAX_HOURS=max_hours)
    smtp_sink.stop()  # down for good
    _, base = processes.gunicorn(env)
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"
    wait_for(lambda: rows(engine, schema.events)[0].status == "done", 30,
             "the event to give up (every delivery failed)")
    deliveries = rows(engine, schema.deliveries)
    assert {d.status for d in deliveries} == {"failed"} and len(deliveries) == 40
    assert all(d.reason.startswith("gave up") for d in deliveries)
    spans = [d.first_attempt_at for d in deliveries]
    assert max(spans) - min(spans) < max_hours * 3600  # one clock for the whole round, not one per member
    status = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "status"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={"PATH": os.environ["PATH"], **env})
    assert "40 failed" in status.stdout and "failed delivery" in status.stdout and "gave up" in status.stdout
    figure("RETRY_MAX_HOURS=0.001: gave up after (s)",
           round(rows(engine, schema.events)[0].finished_at - rows(engine, schema.events)[0].received_at, 1))


@pytest.mark.slow
def test_smtp_answering_451_for_a_while_is_retried_with_backoff_and_nothing_fails(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    _, base = processes.gunicorn(reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="true"))
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"
    wait_for(lambda: len(smtp_sink.messages) >= MEMBERS // 3, 60, "a third of the fan-out")

    smtp_sink.fail_next(10**6, "451 4.3.0 mailbox busy, try again later")
    busy_at = time.monotonic()
    wait_for(lambda: [d for d in _deliveries_in_retry(engine) if d.attempts >= 2], 30,
             "deliveries retried after 451")
    time.sleep(max(0.0, 4 - (time.monotonic() - busy_at)))  # the scenario: 451 for 4 s (not a wait for a condition)
    during = rows(engine, schema.deliveries)
    smtp_sink.fail_next(0)
    figure("SMTP 451 period survived (s)", round(time.monotonic() - busy_at, 1))

    in_retry = [d for d in during if d.status == "retry"]
    assert in_retry and all(d.reason.startswith("451") for d in in_retry)
    assert all(d.next_attempt_at > d.first_attempt_at for d in in_retry)
    assert [d for d in during if d.status == "failed"] == []

    wait_for(lambda: rows(engine, schema.events)[0].status == "done", 60, "the event to be done after 451s stop")
    got = recipients(smtp_sink)
    deliveries = rows(engine, schema.deliveries)
    figure("451: deliveries that needed more than one attempt", sum(d.attempts > 1 for d in deliveries))
    assert set(got) == addresses(MEMBERS) and duplicates(got) == 0
    assert {d.status for d in deliveries} == {"sent"} and max(d.attempts for d in deliveries) >= 3
