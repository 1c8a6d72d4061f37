"""SIGTERM during a fan-out: the message in flight finishes, the lease is released, another worker goes on."""
from __future__ import annotations

import signal

import pytest

from store import schema
from support import DEPARTMENT
from support.reliability import (addresses, duplicates, event_xml, figure, packet, post, prepare_database, recipients,
                     reliability_env, rows, wait_for)
from devtools.wecom_standin import make_members

MEMBERS = 600


@pytest.mark.slow
def test_sigterm_finishes_the_message_in_flight_releases_the_lease_and_another_worker_continues(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    # A long lease: if the next worker goes on at once, it is because the lease was released, not expired.
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="false", LEASE_SECONDS="300")
    _, base = processes.gunicorn(env)
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"

    first = processes.worker(env, name="first")
    wait_for(lambda: len(smtp_sink.messages) >= MEMBERS // 4, 60, "a quarter of the fan-out", first)
    first.signal(signal.SIGTERM)
    assert first.proc.wait(timeout=30) == 0, first.log[-3000:]
    assert "finishing the message in flight" in first.log

    [event] = rows(engine, schema.events)
    sent = [d for d in rows(engine, schema.deliveries) if d.status == "sent"]
    figure("mails sent before SIGTERM took effect", len(smtp_sink.messages))
    assert event.status == "sending" and event.lease_owner is None and event.lease_until is None
    # Every mail that reached the server is recorded as sent: the one in flight was finished, not dropped.
    assert sorted(d.address for d in sent) == sorted(recipients(smtp_sink))
    assert 0 < len(sent) < MEMBERS

    second = processes.worker(env, name="second")
    wait_for(lambda: rows(engine, schema.events)[0].status == "done", 60, "the second worker to finish", second)
    got = recipients(smtp_sink)
    figure("graceful shutdown: messages received", sum(got.values()))
    assert set(got) == addresses(MEMBERS)
    assert duplicates(got) == 0


@pytest.mark.slow
def test_sigterm_to_gunicorn_stops_its_delivery_thread_cleanly_and_a_new_instance_continues(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="true", LEASE_SECONDS="300")
    web, base = processes.gunicorn(env)
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"
    wait_for(lambda: len(smtp_sink.messages) >= MEMBERS // 4, 60, "a quarter of the fan-out", web)
    web.signal(signal.SIGTERM)
    assert web.proc.wait(timeout=30) == 0, web.log[-3000:]

    [event] = rows(engine, schema.events)
    sent = [d for d in rows(engine, schema.deliveries) if d.status == "sent"]
    figure("gunicorn SIGTERM: mails sent before it took effect", len(smtp_sink.messages))
    assert event.status == "sending" and event.lease_owner is None
    assert sorted(d.address for d in sent) == sorted(recipients(smtp_sink))

    _, base = processes.gunicorn(env)
    wait_for(lambda: rows(engine, schema.events)[0].status == "done", 60, "the new instance to finish")
    got = recipients(smtp_sink)
    assert set(got) == addresses(MEMBERS) and duplicates(got) == 0
