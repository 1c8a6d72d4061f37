"""SMTP_MAX_PER_MINUTE is one budget for every process on the database: two workers together never hand the
server more than the limit in any 60-second window, and every member still gets each mail once."""
from __future__ import annotations

import collections

import pytest

from devtools.wecom_standin import make_members
from store import schema
from support import DEPARTMENT
from support.reliability import event_xml, figure, packet, post, prepare_database, reliability_env, rows, wait_for

LIMIT = 30
MEMBERS = 15
CHANGES = ("create_user", "update_user", "delete_user")  # three events: both workers get work


@pytest.mark.slow
def test_two_workers_share_one_per_minute_budget(standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="false", SMTP_MAX_PER_MINUTE=str(LIMIT))
    _, base = processes.gunicorn(env)
    workers = [processes.worker(env, name=f"worker{n}") for n in (1, 2)]
    for n, change in enumerate(CHANGES):
        assert post(base, packet(crypto, event_xml(f"user{n + 1:04d}", change))).text == "success"

    total = MEMBERS * len(CHANGES)
    wait_for(lambda: len(smtp_sink.messages) >= total, 150, f"{total} mails", *workers)
    wait_for(lambda: {e.status for e in rows(engine, schema.events)} == {"done"}, 30, "every event done", *workers)

    arrivals = smtp_sink.arrivals
    busiest = max(sum(1 for t in arrivals if start <= t < start + 60) for start in arrivals)
    received = collections.Counter((m["X-RcptTo"], m["Subject"]) for m in smtp_sink.messages)
    figure("mails in the busiest 60 s window", busiest)
    figure("first to last mail (s)", round(arrivals[-1] - arrivals[0], 1))
    figure("events handled per worker", [w.log.count(" sent, ") for w in workers])
    assert busiest <= LIMIT
    assert len(received) == total and set(received.values()) == {1}
