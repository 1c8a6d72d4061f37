"""WeCom API faults: transient ones are retried on the backoff schedule; a permanent one fails the event visibly."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from store import schema
from support import ROOT
from support.reliability import (addresses, duplicates, event_xml, figure, packet, post, prepare_database, recipients,
                     reliability_env, rows, wait_for)

TRANSIENT_FAULTS = [
    ("sleep", 3),  # longer than WECOM_TIMEOUT_SECONDS below
    ("http", 500),
    ("http", 503),
    {"errcode": -1, "errmsg": "system busy"},
    {"errcode": 45009, "errmsg": "api freq out of limit"},
]


def flask_command(env, *args) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_timeouts_5xx_busy_and_rate_limits_are_retried_and_a_permanent_error_fails_the_event_visibly(
        standin, smtp_sink, mysql_url, processes, crypto):
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="false", RETRY_BACKOFF_SECONDS="0.05",
                          WECOM_TIMEOUT_SECONDS="2")
    _, base = processes.gunicorn(env)
    worker = processes.worker(env)
    wait_for(lambda: "member snapshot taken" in worker.log, 30, "the start-up snapshot", worker)

    standin.script("user/list", *TRANSIENT_FAULTS)
    standin.expire_tokens()  # the cached token is refused next, and then gettoken itself fails once
    standin.script("gettoken", ("http", 502))
    assert post(base, packet(crypto, event_xml("user0001"))).text == "success"
    wait_for(lambda: rows(engine, schema.events)[0].status == "done", 60, "the event to be delivered", worker)

    [event] = rows(engine, schema.events)
    figure("WeCom faults retried before delivery", event.attempts)
    assert set(recipients(smtp_sink)) == addresses(5) and duplicates(recipients(smtp_sink)) == 0
    assert event.attempts == len(TRANSIENT_FAULTS) + 1  # + the failed gettoken
    for said in ("user/list did not answer in time", "user/list answered HTTP 500", "user/list answered HTTP 503",
                 "WeCom is busy (errcode -1", "API call limit is reached (blocked for a minute or an hour) (errcode 45009", "gettoken answered HTTP 502"):
        assert said in worker.log
    # One backoff step per fault (0.05 s doubling; the log rounds the delay to whole seconds).
    assert re.findall(r"; retry (\d+) in ", worker.log) == [str(n) for n in range(1, event.attempts + 1)]

    standin.script("user/list", {"errcode": 60011, "errmsg": "no privilege to access/modify contact/party/agent"})
    assert post(base, packet(crypto, event_xml("user0002"))).text == "success"
    wait_for(lambda: rows(engine, schema.events)[-1].status == "failed", 30, "the second event to fail", worker)
    failed = rows(engine, schema.events)[-1]
    assert "60011" in failed.reason and "可见范围" in failed.reason

    status = flask_command(env, "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    [row] = [i for i, line in enumerate(lines) if line.split()[:1] == [str(failed.id)]]
    assert "failed" in lines[row].split() and "user0002" in lines[row]
    reason = lines[row + 1].strip()
    assert reason.startswith("reason: ") and "WeCom user/list: the secret has no permission" in reason
    assert "errcode 60011" in reason
    figure("flask status shows", reason)
    assert len(smtp_sink.messages) == 5  # nothing more was sent for the failed event
