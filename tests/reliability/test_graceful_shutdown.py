"""SIGTERM during a 2,000-member fan-out, as Kubernetes sends it on a rolling update or a drain, with another
process running beside the one told to stop: the message in flight on the connection finishes and is marked,
the connection says QUIT, the lease is released at once (LEASE_SECONDS is 300 here: a takeover that waited
for it would take minutes), the other process goes on; 0 duplicates, 0 lost. A web process with delivery
threads (WORKER_IN_WEB=true) also answers every callback it accepted and takes no new ones."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from devtools.wecom_standin import make_members
from store import schema
from support import DEPARTMENT
from support.reliability import (addresses, duplicates, event_xml, figure, packet, post, prepare_database, recipients,
                                 reliability_env, rows, wait_for)

MEMBERS = 2000
LEASE_SECONDS = 300


def _owner_pid(engine) -> int | None:
    """The pid in the lease owner of the (one) event being sent: host:pid:nonce."""
    [event] = rows(engine, schema.events, schema.events.c.change_type == "create_user")
    return int(event.lease_owner.split(":")[1]) if event.lease_owner else None


def _parent(pid: int) -> int:
    """The parent pid of a process (Linux /proc): the gunicorn arbiter of a gunicorn worker."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _fan_out(engine, sink) -> dict:
    """Every address mailed, once: the counts, per connection (X-Peer) with its arrival times."""
    [event] = rows(engine, schema.events, schema.events.c.change_type == "create_user")
    sent = [d for d in rows(engine, schema.deliveries) if d.status == "sent"]
    got = recipients(sink)
    return {"event": event, "sent": len(sent), "got": got}


def _takeover(sink, signalled_at: float, signalled_peers: set[str]) -> tuple[float, float]:
    """(the gap between the signalled process's last mail and the other process's first, seconds from the
    signal to that first mail): how long the recipients saw no mail going out."""
    mine = [at for message, at in zip(sink.messages, sink.arrivals) if message["X-Peer"] in signalled_peers]
    theirs = [at for message, at in zip(sink.messages, sink.arrivals) if message["X-Peer"] not in signalled_peers]
    assert theirs, "no mail came from the other process"
    assert max(mine) <= min(theirs), "the two processes sent at the same time: the lease was not exclusive"
    return min(theirs) - max(mine), min(theirs) - signalled_at


def _check_the_stop(sink, signalled_at: float, process, what: str) -> tuple[set[str], float]:
    """The signalled process exits cleanly; its connections said QUIT. Returns (its peers, when it exited)."""
    assert process.proc.wait(timeout=60) == 0, process.log[-3000:]
    exited_at = time.monotonic()
    peers = {m["X-Peer"] for m, at in zip(sink.messages, sink.arrivals) if at <= signalled_at}
    assert peers and peers <= set(sink.quits), f"{what}: a connection closed without QUIT ({peers} vs {sink.quits})"
    figure(f"{what}: SIGTERM to exit", f"{exited_at - signalled_at:.2f} s")
    return peers, exited_at


@pytest.mark.slow
def test_sigterm_to_a_worker_mid_fan_out_hands_over_at_once_with_every_member_mailed_once(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="false", LEASE_SECONDS=LEASE_SECONDS)
    _, base = processes.gunicorn(env)
    workers = [processes.worker(env, name="a"), processes.worker(env, name="b")]
    for worker in workers:
        wait_for(lambda w=worker: "delivery worker" in w.log and "started" in w.log, 60, "the workers to start",
                 worker)
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"

    wait_for(lambda: len(smtp_sink.messages) >= MEMBERS // 4, 120, "a quarter of the fan-out", *workers)
    pid = _owner_pid(engine)
    [sender] = [w for w in workers if w.proc.pid == pid]
    [other] = [w for w in workers if w is not sender]
    sender.signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    peers, _ = _check_the_stop(smtp_sink, signalled_at, sender, "worker")
    assert "finishing the message in flight" in sender.log
    assert other.proc.poll() is None

    wait_for(lambda: _fan_out(engine, smtp_sink)["event"].status == "done", 180, "the other worker to finish", other)
    result = _fan_out(engine, smtp_sink)
    takeover, after_signal = _takeover(smtp_sink, signalled_at, peers)
    figure("worker SIGTERM: mails before the stop", sum(1 for m in smtp_sink.messages if m["X-Peer"] in peers))
    figure("worker SIGTERM: takeover (its last mail to the other's first; from the signal)",
           f"{takeover:.2f} s; {after_signal:.2f} s")
    assert set(result["got"]) == addresses(MEMBERS), "lost: some members got nothing"
    assert duplicates(result["got"]) == 0 and result["sent"] == MEMBERS
    # Generous (the target is < 2 s, the figure above says what it was): far under the 300 s lease, so the
    # lease was released, not waited out.
    assert takeover < LEASE_SECONDS / 10


class CallbackStream:
    """Posts callbacks (not member changes: recorded as ignored, nothing to mail) one after another to a
    service, as WeCom would during a shutdown; keeps each one's outcome."""

    def __init__(self, base: str, crypto):
        self.base, self.crypto = base, crypto
        self.answered: list[str] = []  # userids answered `success`
        self.refused = 0  # connection refused or reset: WeCom retries these
        self.other: list[str] = []  # any other answer: must stay empty
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        session = requests.Session()
        while not self.stop.is_set() and n < 5000:
            n += 1
            userid = f"party{n:05d}"
            try:
                answer = post(self.base, packet(self.crypto, event_xml(userid, "create_party")), session=session,
                              timeout=10)
            except requests.ConnectionError:
                self.refused += 1
                session = requests.Session()
                self.stop.wait(0.02)
                continue
            if answer.status_code == 200 and answer.text == "success":
                self.answered.append(userid)
            else:
                self.other.append(f"{answer.status_code} {answer.text[:80]}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)


@pytest.mark.slow
def test_sigterm_to_a_web_process_with_delivery_threads_answers_what_it_accepted_and_hands_over(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="true", LEASE_SECONDS=LEASE_SECONDS)
    webs = [processes.gunicorn(env), processes.gunicorn(env)]
    assert post(webs[0][1], packet(crypto, event_xml("user0001"))).text == "success"

    wait_for(lambda: len(smtp_sink.messages) >= MEMBERS // 4, 120, "a quarter of the fan-out", *(w for w, _ in webs))
    arbiter = _parent(_owner_pid(engine))
    [(sender, base)] = [(w, b) for w, b in webs if w.proc.pid == arbiter]
    [(other, _)] = [(w, b) for w, b in webs if w is not sender]
    with CallbackStream(base, crypto) as stream:
        wait_for(lambda: len(stream.answered) >= 5, 30, "callbacks being answered", sender)
        sender.signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        peers, _ = _check_the_stop(smtp_sink, signalled_at, sender, "gunicorn")
        wait_for(lambda: stream.refused >= 3, 30, "new callbacks to be refused once it stopped")
    assert other.proc.poll() is None

    # Every callback it answered `success` is recorded; none got another answer (no 5xx, no half answer).
    assert not stream.other, stream.other[:5]
    recorded = {e.user_id for e in rows(engine, schema.events, schema.events.c.change_type == "create_party")}
    assert set(stream.answered) <= recorded and stream.answered
    figure("gunicorn SIGTERM: callbacks answered / refused during the stop", f"{len(stream.answered)} / "
           f"{stream.refused}")

    wait_for(lambda: _fan_out(engine, smtp_sink)["event"].status == "done", 180, "the other instance to finish",
             other)
    result = _fan_out(engine, smtp_sink)
    takeover, after_signal = _takeover(smtp_sink, signalled_at, peers)
    figure("gunicorn SIGTERM: takeover (its last mail to the other's first; from the signal)",
           f"{takeover:.2f} s; {after_signal:.2f} s")
    assert set(result["got"]) == addresses(MEMBERS), "lost: some members got nothing"
    assert duplicates(result["got"]) == 0 and result["sent"] == MEMBERS
    assert takeover < LEASE_SECONDS / 10
