"""A live worker keeps its lease while a slow message is in flight: nobody takes its event over and resends."""
from __future__ import annotations

import pytest

from store import schema
from support import DEPARTMENT
from support.reliability import (addresses, duplicates, event_xml, figure, packet, post, prepare_database, recipients,
                     reliability_env, rows, wait_for)
from support.smtp_server import SlowSink
from devtools.wecom_standin import make_members

MEMBERS = 3
LEASE_SECONDS = 2
DATA_SECONDS = 2.5  # each message takes longer than a whole lease


@pytest.mark.slow
def test_messages_slower_than_the_lease_are_not_sent_twice_by_a_second_worker(
        standin, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    with SlowSink(DATA_SECONDS) as sink:
        env = reliability_env(standin, sink, mysql_url, WORKER_IN_WEB="false", LEASE_SECONDS=LEASE_SECONDS)
        _, base = processes.gunicorn(env)
        workers = [processes.worker(env, name=f"worker{i}") for i in (1, 2)]
        assert post(base, packet(crypto, event_xml("user0001"))).text == "success"
        wait_for(lambda: rows(engine, schema.events)[0].status == "done", 60, "the event to be done", *workers)
        got = recipients(sink)
    figure("slow SMTP (2.5 s a message, 2 s lease): mails", sum(got.values()))
    assert set(got) == addresses(MEMBERS)
    assert duplicates(got) == 0
