"""The real deployment shape: gunicorn and standalone workers as processes sharing one MariaDB."""
from __future__ import annotations

import collections
import time
from urllib.parse import urlencode

import pytest
import requests
import sqlalchemy as sa

from store import db, migrate, schema
import templates_repo
import wecom
from support import DEPARTMENT, TEST_CORP_ID, base_env, wait_until
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


def test_two_worker_processes_mail_a_300_member_department_exactly_once(
        mysql_service_env, standin, smtp_sink, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(300, DEPARTMENT))
    _, base = processes.gunicorn(dict(mysql_service_env, WORKER_IN_WEB="false"))
    processes.worker(mysql_service_env)
    processes.worker(mysql_service_env)
    assert post_event(base, crypto, "create_user", "user0001").text == "success"
    assert smtp_sink.wait_for(300, timeout=90)
    time.sleep(1)  # a duplicate would arrive now, if either worker were to send one
    counts = recipients(smtp_sink)
    assert len(counts) == 300 and set(counts.values()) == {1}


def test_a_2000_member_department_is_answered_in_milliseconds_and_mailed_once(
        mysql_service_env, standin, smtp_sink, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(2000, DEPARTMENT))
    _, base = processes.gunicorn(dict(mysql_service_env, WORKER_IN_WEB="true"))  # web process + delivery thread
    assert wait_until(lambda: _snapshot_taken(mysql_service_env["DATABASE_URL"]), timeout=30)
    started = time.perf_counter()
    answer = post_event(base, crypto, "update_user", "user0042")
    answered_ms = (time.perf_counter() - started) * 1000
    mailed_before_answer = len(smtp_sink.messages)
    assert answer.status_code == 200 and answer.text == "success"
    assert mailed_before_answer < 2000  # the answer did not wait for the fan-out
    assert smtp_sink.wait_for(2000, timeout=180)
    elapsed = time.perf_counter() - started
    time.sleep(1)
    counts = recipients(smtp_sink)
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\n2,000 members: answered in {answered_ms:.1f} ms; {len(counts)} mailed in {elapsed:.1f} s "
          f"({len(counts) / elapsed:.0f} mails/s); duplicates {duplicates}")
    assert len(counts) == 2000 and duplicates == 0


def _snapshot_taken(url: str) -> bool:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sa.select(sa.func.count()).select_from(schema.department_snapshots)).scalar())
    finally:
        engine.dispose()
