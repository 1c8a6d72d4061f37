"""The state database goes away: callbacks answer 503 (WeCom retries), and the retries are recorded once each.

These tests start their own mariadbd on another port with its own data directory and stop it; the shared
server on 3306 is never touched.
"""
from __future__ import annotations

import collections
import re
import threading
import time

import pytest
import requests

from store import db, schema
from support import DEPARTMENT
from support.reliability import (event_xml, figure, packet, post, prepare_database, private_mariadb, reliability_env,  # noqa: F401
                     rows, wait_for)
from devtools.wecom_standin import make_members

MEMBERS = 2
OUTAGE_SECONDS = 5


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


@pytest.mark.slow
def test_database_crash_during_ingest_answers_503_and_the_retries_are_recorded_once_each(
        private_mariadb, standin, smtp_sink, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    private_mariadb.start()
    prepare_database(private_mariadb.url).dispose()
    web, base = processes.gunicorn(reliability_env(standin, smtp_sink, private_mariadb.url, WORKER_IN_WEB="true"))
    sealed = [packet(crypto, event_xml(f"outage{i:03d}")) for i in range(60)]
    answers: dict[int, int] = {}

    def ingest():  # WeCom keeps calling while the database dies
        with requests.Session() as session:
            for i, one in enumerate(sealed):
                answers[i] = post(base, one, session).status_code
                time.sleep(0.05)  # pacing, part of the scenario: WeCom's callbacks arrive over time, not at once

    sender = threading.Thread(target=ingest)
    sender.start()
    wait_for(lambda: len(answers) >= 20, 30, "20 callbacks answered", web)
    private_mariadb.crash()
    down_at = time.monotonic()
    wait_for(lambda: _status(f"{base}/readyz") == 503, 10, "/readyz to answer 503", web)
    assert _status(f"{base}/healthz") == 200
    sender.join(timeout=60)
    assert not sender.is_alive()
    # Part of the scenario, not a wait for a condition: the database stays down for OUTAGE_SECONDS.
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
    assert _status(f"{base}/readyz") == 503
    private_mariadb.start()
    figure("database outage survived (s)", round(time.monotonic() - down_at, 1))
    wait_for(lambda: _status(f"{base}/readyz") == 200, 30, "/readyz to answer 200 again", web)

    outcome = collections.Counter(answers.values())
    figure("answers during the database outage", dict(outcome))
    assert set(outcome) == {200, 503} and outcome[503] >= 10
    first_503 = min(i for i, status in answers.items() if status == 503)
    assert all(answers[i] == 503 for i in range(first_503, len(sealed)))
    assert "state database unavailable, answered 503 so WeCom retries" in web.log

    # WeCom retries every callback it sent (the answered ones too, as if their answers had been lost).
    with requests.Session() as session:
        again = [post(base, one, session) for one in sealed]
    assert [(a.status_code, a.text) for a in again] == [(200, "success")] * len(sealed)

    engine = db.make_engine(private_mariadb.url)
    try:
        events = rows(engine, schema.events)
        assert sorted(e.user_id for e in events) == [f"outage{i:03d}" for i in range(len(sealed))]
        for event in events:  # no half-written event: each row is complete and parses
            assert event.xml.startswith("<xml>") and event.change_type == "create_user" and event.received_at
        wait_for(lambda: {e.status for e in rows(engine, schema.events)} == {"done"}, 90,
                 "every event to be delivered after the outage", web)
        deliveries = rows(engine, schema.deliveries)
        assert len(deliveries) == len(sealed) * MEMBERS and {d.status for d in deliveries} == {"sent"}
        mails = collections.Counter((m["X-RcptTo"], re.search(r"ID：(\S+)", m.get_content()).group(1))
                                    for m in smtp_sink.messages)
        assert len(mails) == len(sealed) * MEMBERS
        # A delivery that was sent as the database died cannot be marked: at most that one mail repeats.
        assert sum(mails.values()) - len(mails) <= 1
        figure("database outage: duplicate mails", sum(mails.values()) - len(mails))
    finally:
        engine.dispose()


@pytest.mark.slow
def test_service_started_before_its_database_serves_once_the_database_is_up(
        private_mariadb, standin, smtp_sink, processes, crypto):
    web, base = processes.gunicorn(reliability_env(standin, smtp_sink, private_mariadb.url, WORKER_IN_WEB="true"))
    sealed = packet(crypto, event_xml("early"))
    assert _status(f"{base}/readyz") == 503
    assert post(base, sealed).status_code == 503

    private_mariadb.start()  # an empty server: the service must create its own tables now
    engine = db.make_engine(private_mariadb.url)
    try:
        import templates_repo
        templates_repo.seed_templates(engine, "ipaas_email_template", "tencent-wechat")
        wait_for(lambda: _status(f"{base}/readyz") == 200, 30, "/readyz to answer 200", web)
        answer = post(base, sealed)
        assert (answer.status_code, answer.text) == (200, "success"), web.log[-3000:]
        wait_for(lambda: [e.status for e in rows(engine, schema.events)] == ["done"], 30, "the event done", web)
        assert sorted(m["X-RcptTo"] for m in smtp_sink.messages) == [f"user{i:04d}@corp.example" for i in range(1, 6)]
    finally:
        engine.dispose()
