"""The digest with real processes on MariaDB: kill -9 while a digest is in flight repeats at most that one
digest; three delivering processes share a burst and each member still gets at most two mails."""
from __future__ import annotations

import re
import signal
import threading
import time
from email import policy
from email.parser import BytesParser

import pytest

from devtools.wecom_standin import make_members
from store import schema
from support import DEPARTMENT
from support.digests import changes_received, mails_by_recipient
from support.reliability import (count, event_xml, figure, packet, post, prepare_database, reliability_env, rows,
                                 wait_for)
from support.smtp_server import SmtpSink

pytestmark = pytest.mark.slow


def settled(engine) -> bool:
    """Every event finished and nothing left waiting: no open or held delivery, no open digest."""
    return ({e.status for e in rows(engine, schema.events)} == {"done"}
            and count(engine, schema.deliveries, schema.deliveries.c.status.in_(("pending", "retry", "held"))) == 0
            and count(engine, schema.digests, schema.digests.c.status.in_(("collecting", "sending"))) == 0)


class DigestGate:
    """Holds the SMTP server's reply to the `nth` digest until released: that digest is in flight (its
    content has arrived, the worker waits for the answer) for as long as the test needs."""

    def __init__(self, nth: int):
        self.nth, self.seen = nth, 0
        self.holding, self.released = threading.Event(), threading.Event()

    def __call__(self, session, envelope) -> None:
        subject = BytesParser(policy=policy.default).parsebytes(envelope.original_content)["Subject"]
        if subject.startswith("通讯录变更汇总"):
            self.seen += 1
            if self.seen == self.nth:
                self.holding.set()
                self.released.wait(timeout=30)


def test_kill9_while_a_digest_is_in_flight_repeats_at_most_that_digest_and_loses_nothing(
        standin, mysql_url, processes, crypto):
    members, held = 50, 4
    standin.set_members(DEPARTMENT, make_members(members, DEPARTMENT))
    gate = DigestGate(nth=10)
    with SmtpSink(on_data=gate) as sink:
        engine = prepare_database(mysql_url)
        env = reliability_env(standin, sink, mysql_url, WORKER_IN_WEB="false", LEASE_SECONDS="1",
                              DIGEST_WINDOW_SECONDS="3")
        _, base = processes.gunicorn(env)
        victim = processes.worker(env, name="victim")
        userids = [f"burst{i}" for i in range(held + 1)]
        for userid in userids:
            assert post(base, packet(crypto, event_xml(userid))).text == "success"
        wait_for(lambda: len(sink.messages) >= members, 30, "the first change to everyone at once", victim)
        wait_for(gate.holding.is_set, 30, "a digest in flight", victim)
        victim.signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        gate.released.set()  # the server accepts the digest in flight; its sender is gone, it never marked it
        in_flight = [d for d in rows(engine, schema.digests) if d.status == "sending"]
        figure("digests left sending by the killed worker", len(in_flight))
        assert in_flight  # killed with digests claimed, their leases running

        last = processes.worker(env, name="after")
        wait_for(lambda: settled(engine), 60, "every digest sent after the takeover", last)
        time.sleep(1)  # a duplicate would arrive now, if the survivor were to send one
        seen = changes_received(sink.messages)
        twice = {member for (member, _), n in seen.items() if n > 1}
        figure("kill -9 mid digest: mails received", len(sink.messages))
        figure("kill -9 mid digest: members who read a change twice", sorted(twice))
        assert set(seen) == {(f"user{i:04d}@corp.example", u) for i in range(1, members + 1) for u in userids}
        assert set(seen.values()) <= {1, 2} and len(twice) <= 1  # the digest in flight, nothing else
        assert {d.status for d in rows(engine, schema.deliveries)} == {"sent"}
        assert {len(m) for m in mails_by_recipient(sink.messages).values()} <= {2, 3}


def test_two_workers_and_a_web_process_share_a_burst_at_most_two_mails_each_change_once(
        standin, smtp_sink, mysql_url, processes, crypto):
    members = 10
    standin.set_members(DEPARTMENT, make_members(members, DEPARTMENT))
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="true", DIGEST_WINDOW_SECONDS="5")
    web, base = processes.gunicorn(env)  # with its delivery thread: three delivering processes
    workers = [processes.worker(env, name=f"worker{i}") for i in (1, 2)]
    wait_for(lambda: count(engine, schema.department_snapshots) == 1, 30, "the member snapshot", web, *workers)
    userids = [f"burst{i:02d}" for i in range(30)]
    started = time.monotonic()
    for n, userid in enumerate(userids):  # 30 changes within 3 s
        time.sleep(max(0.0, started + n * 0.1 - time.monotonic()))
        assert post(base, packet(crypto, event_xml(userid))).text == "success"
    wait_for(lambda: settled(engine), 60, "the burst delivered", web, *workers)
    time.sleep(1)  # a duplicate would arrive now, if any process were to send one

    mails = mails_by_recipient(smtp_sink.messages)
    seen = changes_received(smtp_sink.messages)
    figure("burst with three delivering processes: mails per member", sorted({len(m) for m in mails.values()}))
    assert len(mails) == members and max(len(m) for m in mails.values()) <= 2
    assert seen == {(f"user{i:04d}@corp.example", u): 1 for i in range(1, members + 1) for u in userids}
    handled = {p.log_path.name: len(re.findall(r"digest \d+ to \S+: \d+ change", p.log)) for p in (web, *workers)}
    figure("burst with three delivering processes: digest lines per process log", handled)
