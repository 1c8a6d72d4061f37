"""/metrics adds up every gunicorn worker's counters and reads the outbox at scrape time."""
import re
from urllib.parse import urlencode

import requests

import wecom
from support import TEST_CORP_ID, base_env


def _sample(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_counters_from_two_gunicorn_workers_add_up(processes, crypto, tmp_path):
    env = base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}", WEB_CONCURRENCY="2",
                   PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    _, base = processes.gunicorn(env, workers=2)
    for _ in range(30):  # new connections: both workers answer some of them
        assert requests.post(f"{base}/wecom/callback", data=b"<xml/>", timeout=10).status_code == 400
    for i in range(4):
        packet = crypto.encrypt(wecom.event_xml("create_user", f"user{i}", TEST_CORP_ID, "2"))
        url = f"{base}/wecom/callback?{urlencode(packet['query'])}"
        assert requests.post(url, data=packet["body"], timeout=10).text == "success"
    scrapes = [requests.get(f"{base}/metrics", timeout=10).text for _ in range(4)]
    for text in scrapes:  # whichever worker answers the scrape sees every worker's counts
        assert _sample(text, "wecom_mailer_callbacks_total", outcome="rejected") == 30
        assert _sample(text, "wecom_mailer_callbacks_total", outcome="recorded") == 4
        assert _sample(text, "wecom_mailer_callback_seconds_count") == 34
        assert _sample(text, "wecom_mailer_events", status="pending") == 4
        assert _sample(text, "wecom_mailer_state_database_up") == 1
