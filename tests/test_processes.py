"""The real deployment shape: gunicorn and standalone workers as processes sharing one MariaDB."""
from __future__ import annotations

import collections
import time
from urllib.parse import urlencode

import pytest
import requests

from store import db, migrate, schema
import templates_repo
import wecom
from support import DEPARTMENT, TEST_CORP_ID, base_env, count, rows, wait_until
from devtools.wecom_standin import make_members

pytestmark = pytest.mark.slow


@pytest.fixture
def mysql_service_env(standin, smtp_sink, mysql_url, tmp_path):
    """A complete environment on MariaDB, with the original templates seeded."""
    engine = db.make_engine(mysql_url)
    migrate.upgrade(engine)
    templates_repo.seed_templates(engine, "ipaas_email_template", "tencent-wechat")
    engine.dispose()
    return base_env(WECOM_API_BASE=standin.api_base, DATABASE_URL=mysql_url, MAIL_BACKEND="smtp",
                    SMTP_HOST="127.0.0.1", SMTP_PORT=smtp_sink.port, SMTP_SECURITY="none",
                    RETRY_BACKOFF_SECONDS="0.5", LEASE_SECONDS="5")


def post_event(base: str, crypto, change_type: str, userid: str) -> requests.Response:
    xml = wecom.event_xml(change_type, userid, TEST_CORP_ID, str(DEPARTMENT))
    packet = crypto.encrypt(xml)
    return requests.post(f"{base}/wecom/callback?{urlencode(packet['query'])}", data=packet["body"], timeout=10)


def recipients(sink) -> collections.Counter:
    return collections.Counter(m["X-RcptTo"] for m in sink.messages)


@pytest.fixture
def state(mysql_service_env):
    """The state database the processes share, as the test reads it."""
    engine = db.make_engine(mysql_service_env["DATABASE_URL"])
    yield engine
    engine.dispose()


def wait_until_finished(engine, *senders, timeout: float = 60):
    """Wait until every event is done with its lease released, then stop the processes that send: each one
    finishes the message in flight and exits. From then on no mail can arrive, so counting proves absence."""
    def finished():
        events = rows(engine, schema.events)
        return events and all(e.status == "done" and e.lease_owner is None for e in events)
    wait_until(finished, timeout=timeout, what="every event done, its lease released")
    for sender in senders:
        sender.stop()
        assert sender.proc.returncode == 0, sender.log[-3000:]


def test_two_worker_processes_mail_a_300_member_department_exactly_once(
        mysql_service_env, state, standin, smtp_sink, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(300, DEPARTMENT))
    _, base = processes.gunicorn(dict(mysql_service_env, WORKER_IN_WEB="false"))
    workers = [processes.worker(mysql_service_env), processes.worker(mysql_service_env)]
    assert post_event(base, crypto, "create_user", "user0001").text == "success"
    assert smtp_sink.wait_for(300, timeout=90)
    wait_until_finished(state, *workers)
    counts = recipients(smtp_sink)
    assert set(counts) == {f"user{i:04d}@corp.example" for i in range(1, 301)}
    assert set(counts.values()) == {1}
    assert {d.status for d in rows(state, schema.deliveries)} == {"sent"}


def test_a_2000_member_department_is_answered_before_its_first_mail_and_mailed_once(
        mysql_service_env, state, standin, smtp_sink, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(2000, DEPARTMENT))
    web, base = processes.gunicorn(dict(mysql_service_env, WORKER_IN_WEB="true"))  # web process + delivery thread
    wait_until(lambda: count(state, schema.department_snapshots), timeout=30, what="the start-up snapshot")
    started = time.monotonic()
    answer = post_event(base, crypto, "update_user", "user0042")
    answered_at = time.monotonic()  # taken after the answer is read: if anything, later than it arrived
    assert answer.status_code == 200 and answer.text == "success"
    assert smtp_sink.wait_for(2000, timeout=180)
    wait_until_finished(state, web)
    arrivals = smtp_sink.arrivals
    counts = recipients(smtp_sink)
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\n2,000 members: answered in {(answered_at - started) * 1000:.1f} ms; first mail "
          f"{(arrivals[0] - answered_at) * 1000:.0f} ms after the answer; {len(counts)} mailed in "
          f"{arrivals[-1] - started:.1f} s ({len(counts) / (arrivals[-1] - started):.0f} mails/s); "
          f"duplicates {duplicates}")
    # No duration is asserted (the machine is shared); the order is: the answer waited for none of the fan-out.
    assert answered_at < arrivals[0], "a mail of the fan-out arrived before WeCom had its answer"
    assert set(counts) == {f"user{i:04d}@corp.example" for i in range(1, 2001)} and duplicates == 0
