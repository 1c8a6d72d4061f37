"""kill -9 mid fan-out: a dead worker's event is taken over after its lease; nobody misses the mail, and each
kill repeats at most the one message in flight on each SMTP connection."""
from __future__ import annotations

import random
import signal
import time

import pytest

from store import schema
from support import DEPARTMENT
from support.smtp_server import SmtpSink
from support.reliability import (addresses, duplicates, event_xml, figure, packet, post, prepare_database, recipients,
                     reliability_env, rows, wait_for)
from devtools.wecom_standin import make_members

MEMBERS = 1000
KILLS = 5
SEED = 4  # the kill points are random, but the same on every run


@pytest.fixture(params=[(1, False), (4, True)], ids=["1 connection", "4 pipelined connections"])
def sending(request):
    """(SMTP_CONNECTIONS, an SMTP server that offers PIPELINING)."""
    connections, pipelining = request.param
    with SmtpSink(pipelining=pipelining) as sink:
        yield connections, sink


@pytest.mark.slow
def test_sigkill_at_five_random_points_loses_no_member_and_repeats_at_most_one_mail_per_kill_and_connection(
        standin, sending, mysql_url, processes, crypto):
    connections, smtp_sink = sending
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    # One live worker at a time, so a 1 s lease risks no takeover of live work and keeps the restarts quick.
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="false", LEASE_SECONDS="1",
                          SMTP_CONNECTIONS=str(connections))
    _, base = processes.gunicorn(env)  # ingest only: the delivering processes are `flask worker`s
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"

    kill_points = sorted(random.Random(SEED).sample(range(1, MEMBERS - 50), KILLS))
    started = time.monotonic()
    for point in kill_points:
        worker = processes.worker(env)
        wait_for(lambda: len(smtp_sink.messages) >= point, 60, f"{point} messages at the sink", worker)
        worker.signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)
        figure("killed a worker after mail", len(smtp_sink.messages))
        # Killed mid fan-out, holding the lease: not after the work was done.
        [event] = rows(engine, schema.events)
        assert event.status == "sending" and event.lease_owner is not None
    last = processes.worker(env)
    wait_for(lambda: rows(engine, schema.events)[0].status == "done", 90, "the event to be done", last)

    got = recipients(smtp_sink)
    deliveries = rows(engine, schema.deliveries)
    figure("kill points (messages at the sink)", kill_points)
    figure("kills survived", KILLS)
    figure("messages received", sum(got.values()))
    figure("members mailed", len(got))
    figure("duplicates", duplicates(got))
    figure("fan-out with kills took (s)", round(time.monotonic() - started, 1))
    assert set(got) == addresses(MEMBERS)
    assert duplicates(got) <= KILLS * connections  # the one message in flight on each connection, per kill
    assert len(deliveries) == MEMBERS and {d.status for d in deliveries} == {"sent"}
