"""Four delivering processes on one MariaDB: every member gets each distinct event's mail exactly once."""
from __future__ import annotations

import collections
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from store import schema
from support import DEPARTMENT
from support.reliability import (addresses, event_xml, figure, packet, post, prepare_database, reliability_env, rows,
                     wait_for)
from devtools.wecom_standin import make_members

MEMBERS = 3
COPIES = 10
DISTINCT = 200


def _event_of(message) -> str:
    """The UserID the mail is about, read back from the rendered body."""
    return re.search(r"新增成员 ID：(\S+)", message.get_content()).group(1)


@pytest.mark.slow
def test_two_gunicorn_workers_and_two_standalone_workers_send_each_mail_exactly_once(
        standin, smtp_sink, mysql_url, processes, crypto):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    engine = prepare_database(mysql_url)
    env = reliability_env(standin, smtp_sink, mysql_url, WORKER_IN_WEB="true")
    web, base = processes.gunicorn(env, workers=2)
    workers = [processes.worker(env, name=f"worker{i}") for i in (1, 2)]

    same = packet(crypto, event_xml("copied"))
    distinct = [packet(crypto, event_xml(f"distinct{i:03d}")) for i in range(DISTINCT)]
    gate = threading.Barrier(COPIES)

    def copy(_):
        gate.wait(timeout=10)  # all ten leave together, as WeCom's retries of a slow answer would overlap
        return post(base, same)

    with ThreadPoolExecutor(COPIES) as pool:
        answers = list(pool.map(copy, range(COPIES)))
    with ThreadPoolExecutor(8) as pool, requests.Session() as session:
        answers += list(pool.map(lambda sealed: post(base, sealed, session), distinct))
    assert [(a.status_code, a.text) for a in answers] == [(200, "success")] * (COPIES + DISTINCT)

    expected = (DISTINCT + 1) * MEMBERS
    wait_for(lambda: len(smtp_sink.messages) >= expected and
             {e.status for e in rows(engine, schema.events)} == {"done"}, 120,
             f"{expected} mails and every event done", web, *workers)
    per_mail = collections.Counter((m["X-RcptTo"], _event_of(m)) for m in smtp_sink.messages)
    events = rows(engine, schema.events)
    handled = {p.log_path.name: len(re.findall(r"userid=\S+: \d+ sent", p.log)) for p in (web, *workers)}
    figure("concurrency: events handled per process log", handled)
    figure("concurrency: mails", len(smtp_sink.messages))
    assert len(events) == DISTINCT + 1
    assert len(smtp_sink.messages) == expected
    assert set(per_mail.values()) == {1}
    assert {rcpt for rcpt, _ in per_mail} == addresses(MEMBERS)
    assert {event for _, event in per_mail} == {"copied"} | {f"distinct{i:03d}" for i in range(DISTINCT)}
