"""LOG_FORMAT=json: every line a process writes is one JSON object with level, logger and message."""
from __future__ import annotations

import json
import logging
import signal

import pytest
import requests
import sqlalchemy as sa

import templates_repo
import wecom
from support import DEPARTMENT, TEST_CORP_ID, TEST_SECRET, base_env, wait_until


def json_lines(text: str) -> list[dict]:
    """Parse each line; fail naming the first line that is not a JSON object with the three keys."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict) and {"level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


def messages(entries: list[dict], logger: str) -> list[str]:
    return [e["message"] for e in entries if e["logger"] == logger]


def test_a_gunicorn_run_logs_one_json_object_per_line(processes, standin, crypto, tmp_path):
    outbox_dir = tmp_path / "outbox"
    env = base_env(LOG_FORMAT="json", WORKER_IN_WEB="true", WECOM_API_BASE=standin.api_base,
                   DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}", MAIL_FILE_DIR=str(outbox_dir))
    engine = sa.create_engine(env["DATABASE_URL"])
    templates_repo.seed_templates(engine, "ipaas_email_template", "tencent-wechat")
    engine.dispose()
    process, base = processes.gunicorn(env, workers=2)
    packet = crypto.encrypt(wecom.event_xml("create_user", "user0003", TEST_CORP_ID, str(DEPARTMENT)))
    answer = requests.post(base + "/wecom/callback", params=packet["query"], data=packet["body"], timeout=10)
    assert answer.text == "success"
    assert requests.post(base + "/wecom/callback", data=b"<xml/>", timeout=10).status_code == 400
    assert wait_until(lambda: len(list(outbox_dir.glob("*.eml"))) == 5, timeout=30), process.log
    assert wait_until(lambda: "5 sent" in process.log, timeout=10)
    process.stop()

    entries = json_lines(process.log)
    assert messages(entries, "gunicorn.error")[0].startswith("Starting gunicorn")
    # An answered event is one line, the service's; gunicorn's access line is kept for everything else.
    access = messages(entries, "gunicorn.access")
    assert any('"POST /wecom/callback HTTP/1.1" 400 ' in m for m in access), access
    assert not any('"POST /wecom/callback?' in m for m in access), access
    assert any(m.startswith("event 1 create_user userid=user0003: recorded")
               for m in messages(entries, "wecom_mailer.callback"))
    refused = [e for e in entries if e["logger"] == "wecom_mailer.callback" and e["level"] == "WARNING"]
    assert refused and "missing query parameter(s)" in refused[0]["message"]
    assert any(m.startswith("event 1 create_user userid=user0003: 5 sent, 0 skipped")
               for m in messages(entries, "wecom_mailer.worker"))
    assert TEST_SECRET not in process.log


def test_a_worker_logs_json_up_to_its_last_line(processes, standin, tmp_path):
    env = base_env(LOG_FORMAT="json", WECOM_API_BASE=standin.api_base,
                   DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}", MAIL_FILE_DIR=str(tmp_path / "outbox"))
    worker = processes.worker(env)
    assert wait_until(lambda: "member snapshot taken" in worker.log, timeout=30), worker.log
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == 0
    entries = json_lines(worker.log)
    said = messages(entries, "wecom_mailer.worker")
    assert said[0].startswith("delivery worker ") and said[0].endswith(" started")
    assert "received signal SIGTERM: finishing the message in flight" in said
    assert said[-1].endswith(" stopped")


@pytest.fixture
def service_logging_in_capfd(capfd):
    """The service's handler writes to the stream capfd installs; drop it with that stream afterwards."""
    yield capfd
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_wecom_mailer", False)]:
        root.removeHandler(handler)


def test_a_traceback_stays_inside_its_json_line_and_secrets_are_masked(make_app, service_logging_in_capfd):
    make_app(LOG_FORMAT="json")
    log = logging.getLogger("wecom_mailer.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("round failed with secret %s", TEST_SECRET)
    (entry,) = [e for e in json_lines(service_logging_in_capfd.readouterr().err) if e["logger"] == "wecom_mailer.test"]
    assert entry["level"] == "ERROR" and entry["logger"] == "wecom_mailer.test"
    assert entry["message"] == "round failed with secret ***"
    assert "Traceback" in entry["exc"] and "RuntimeError: boom" in entry["exc"]
