"""Abuse: whatever reaches the callback endpoint, it never answers 5xx and records nothing it should not;
and the logs, even at DEBUG, never carry a secret."""
from __future__ import annotations

import base64
import collections
import logging
import os
import string
import subprocess
import sys
import time
from urllib.parse import urlencode
from xml.sax.saxutils import escape

import pytest
import requests
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import services
from store import migrate, recording, schema
import wecom
from support import ROOT, TEST_AES_KEY, TEST_CORP_ID, TEST_SECRET, TEST_TOKEN
from support.reliability import (event_xml, figure, packet, post, prepare_database, reliability_env, rows, wait_for)

PATH = "/wecom/callback"
# The same examples on every run (CI); FUZZ_EXAMPLES=5000 runs a longer, freshly random fuzz by hand.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None, database=None,
                derandomize=not os.environ.get("FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
GOOD = event_xml("fuzz0001")
BOMB = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
        '<xml><Encrypt>&b;</Encrypt></xml>')


def _well_formed(text: str) -> bool:
    try:
        wecom.parse_xml(text.encode("utf-8"))
        return True
    except wecom.CallbackRejected:
        return False


def _fresh() -> str:
    return str(int(time.time()))


# --- what the fuzzer sends ----------------------------------------------------------------------------

names = st.sampled_from(["msg_signature", "timestamp", "nonce", "echostr"]) | st.text(max_size=12)
values = (st.text(max_size=60) | st.integers(-10**13, 10**13).map(str) | st.just(_fresh())
          | st.text("0123456789abcdef", min_size=40, max_size=40))
# As a WSGI server hands the query over: raw bytes as a latin-1 string, not necessarily well encoded.
queries = (st.lists(st.tuples(names, values), max_size=6).map(urlencode)
           | st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass").decode("latin-1"))
           | st.binary(max_size=120).map(lambda b: b.decode("latin-1")))
bodies = (st.binary(max_size=4096)
          | st.text(max_size=400).map(lambda t: f"<xml><Encrypt>{t}</Encrypt></xml>".encode("utf-8", "replace"))
          | st.sampled_from([b"", b"<xml/>", BOMB.encode(), b"<xml><Encrypt></Encrypt></xml>",
                             b"<" * 300_000, b"<xml><Encrypt>" + b"A" * 300_000 + b"</Encrypt></xml>"]))
content_types = st.sampled_from(["text/xml", "application/xml", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json", ""])


def _signed(encrypted: str, timestamp: str, nonce: str) -> tuple[str, bytes]:
    """A correct signature over `encrypted`, as if the sender knew the callback token."""
    query = urlencode({"msg_signature": wecom.signature(TEST_TOKEN, timestamp, nonce, encrypted.strip()),
                       "timestamp": timestamp, "nonce": nonce})
    return query, f"<xml><Encrypt>{escape(encrypted)}</Encrypt></xml>".encode()


garbage_ciphertexts = (st.text(string.ascii_letters + string.digits + "+/=", min_size=1, max_size=300)
                       | st.binary(min_size=1, max_size=300).map(lambda b: base64.b64encode(b).decode())
                       | st.integers(1, 20).flatmap(lambda n: st.binary(min_size=16 * n, max_size=16 * n))
                       .map(lambda b: base64.b64encode(b).decode()))
nonces = st.text(string.ascii_letters + string.digits, min_size=1, max_size=20)
garbage_plaintexts = (st.text(max_size=300).filter(lambda t: not _well_formed(t))
                      | st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n])  # cut short: never well formed
                      | st.sampled_from([BOMB, '<!DOCTYPE xml SYSTEM "http://127.0.0.1:9/x"><xml/>',
                                         "<xml><UserID>a</UserID>", "\ufeff<xml>", "<xml>&lt;</xml"]))


@pytest.fixture
def fuzz_app(make_app, mysql_url, standin, smtp_sink):
    prepare_database(mysql_url).dispose()
    app = make_app(**reliability_env(standin, smtp_sink, mysql_url))
    yield app
    services.of(app).engine.dispose()


@pytest.mark.slow
def test_fuzzed_callbacks_never_get_a_5xx_and_never_leave_a_row(fuzz_app, crypto):
    client = fuzz_app.test_client()
    seen: collections.Counter = collections.Counter()

    def check(response):
        seen[response.status_code] += 1
        assert response.status_code < 500, response.data

    @FUZZ
    @given(method=st.sampled_from(["GET", "POST", "PUT"]), query=queries, body=bodies, content_type=content_types)
    def anything(method, query, body, content_type):
        check(client.open(PATH, method=method, query_string=query, data=body, content_type=content_type or None))

    @FUZZ
    @given(encrypted=garbage_ciphertexts, nonce=nonces, skew=st.sampled_from([0, 1, -299, 301, -10**6]),
           echo=st.booleans())
    def signed_garbage(encrypted, nonce, skew, echo):
        query, body = _signed(encrypted, str(int(time.time()) + skew), nonce)
        if echo:  # the URL check carries the ciphertext in the query instead
            sig = wecom.signature(TEST_TOKEN, str(int(time.time()) + skew), nonce, encrypted)
            check(client.get(f"{PATH}?{urlencode({'msg_signature': sig, 'timestamp': str(int(time.time()) + skew), 'nonce': nonce, 'echostr': encrypted})}"))
        else:
            check(client.post(f"{PATH}?{query}", data=body, content_type="text/xml"))

    other_corp = wecom.CallbackCrypto(TEST_TOKEN, TEST_AES_KEY, "wwotherCorp0000000")

    @FUZZ
    @given(plaintext=garbage_plaintexts, wrong_corp=st.booleans())
    def sealed_garbage(plaintext, wrong_corp):
        sealed = (other_corp if wrong_corp else crypto).encrypt(plaintext)
        check(client.post(f"{PATH}?{urlencode(sealed['query'])}", data=sealed["body"], content_type="text/xml"))

    for fuzz in (anything, signed_garbage, sealed_garbage):
        fuzz()
    figure("fuzz examples run", sum(seen.values()))
    figure("fuzz answers by status", dict(sorted(seen.items())))
    assert rows(services.of(fuzz_app).engine, schema.events) == []
    assert sum(seen.values()) >= 900 and set(seen) <= {400, 403, 405, 413, 200}  # 200: a decrypted echostr


# Authentic (correctly sealed) member changes with odd contents: answered, recorded whole, worked through.
xml_text = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"),
                   max_size=80)
odd_events = st.fixed_dictionaries({
    "change_type": st.sampled_from(["create_user", "update_user", "delete_user", "create_party", ""]),
    "userid": xml_text,
    "department": st.sampled_from(["2", "2,9", "9", "", "2,,x", "²", "99999999999999"]) | xml_text,
    "create_time": st.sampled_from(["1700000000", "", "-1", "9" * 12, "9" * 20, "x"]),
    "name_size": st.sampled_from([0, 5, 4000, 30000]),  # 30,000 × 3 bytes: past MySQL's 64 KB TEXT
    "extra": xml_text,
})


def _odd_xml(e: dict) -> str:
    return ("<xml><ToUserName><![CDATA[%s]]></ToUserName><CreateTime>%s</CreateTime>"
            "<MsgType>event</MsgType><Event>change_contact</Event><ChangeType>%s</ChangeType>"
            "<UserID>%s</UserID><Department>%s</Department><Name>%s</Name><Unknown>%s</Unknown></xml>"
            % (TEST_CORP_ID, e["create_time"], e["change_type"], escape(e["userid"]), escape(e["department"]),
               "名" * e["name_size"], escape(e["extra"])))


@pytest.mark.slow
def test_authentic_events_with_odd_contents_are_recorded_whole_and_never_jam_the_worker(
        fuzz_app, crypto, smtp_sink):
    client, engine = fuzz_app.test_client(), services.of(fuzz_app).engine
    answered: collections.Counter = collections.Counter()

    @settings(FUZZ, max_examples=120)
    @given(event=odd_events)
    def authentic(event):
        xml = _odd_xml(event)
        sealed = crypto.encrypt(xml)
        response = client.post(f"{PATH}?{urlencode(sealed['query'])}", data=sealed["body"], content_type="text/xml")
        answered[response.status_code] += 1
        assert response.status_code in (200, 400, 413), response.data
        if response.status_code == 200:
            with engine.connect() as conn:
                stored = conn.execute(sa.select(schema.events.c.xml)
                                      .where(schema.events.c.dedup_key == recording.dedup_key(xml))).scalar_one()
            assert stored == xml  # recorded whole, never cut short

    authentic()
    figure("authentic odd events by answer", dict(sorted(answered.items())))
    worker = services.of(fuzz_app).make_worker()
    worker.ensure_snapshots()
    for _ in range(500):  # bounded: one round per event and then some
        if not worker.run_once():
            break
    statuses = collections.Counter(e.status for e in rows(engine, schema.events))
    figure("authentic odd events by final status", dict(statuses))
    assert answered[200] > 0 and set(statuses) <= {"done", "ignored", "failed", "skipped"}


def test_a_schema_1_database_is_widened_and_its_cut_events_fail_visibly_instead_of_jamming(
        make_app, mysql_url, standin, smtp_sink, crypto):
    from support import signed_post
    from support.legacy import legacy_release

    legacy = legacy_release()
    old = legacy.make_engine(mysql_url)
    legacy.init_schema(old)
    with old.begin() as conn:  # as schema 1 left it: 64 KB TEXT columns and one event cut short there
        conn.execute(sa.text("ALTER TABLE wm_events MODIFY xml TEXT NOT NULL, MODIFY subject TEXT, MODIFY body TEXT"))
        conn.execute(sa.text("UPDATE wm_schema SET version = 1"))
        conn.execute(legacy.events.insert(), {"dedup_key": "cut", "change_type": "create_user", "user_id": "cut",
                                              "departments": "2", "xml": event_xml("cut")[:70], "status": "pending",
                                              "attempts": 0, "received_at": time.time(), "next_attempt_at": 0})
    old.dispose()
    prepare_database(mysql_url).dispose()  # what the next start-up (or `flask init-db`) does, and the templates
    app = make_app(**reliability_env(standin, smtp_sink, mysql_url))
    engine = services.of(app).engine
    with engine.connect() as conn:
        types = dict(conn.execute(sa.text(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = DATABASE() "
            "AND table_name = 'wm_events' AND column_name IN ('xml', 'subject', 'body')")).all())
    assert {name.lower(): kind for name, kind in types.items()} == dict.fromkeys(("xml", "subject", "body"),
                                                                                 "mediumtext")
    assert migrate.current_revision(engine) == migrate.head_revision()
    big = event_xml("user0001").replace("</xml>", "<Name>" + "名" * 30000 + "</Name></xml>")
    assert signed_post(app.test_client(), crypto, big).data == b"success"

    worker = services.of(app).make_worker()
    for _ in range(10):
        if not worker.run_once():
            break
    cut, whole = rows(engine, schema.events)
    assert cut.status == "failed" and cut.reason == "stored event XML does not parse: body is not XML"
    assert whole.status == "done" and whole.xml == big and len(smtp_sink.messages) == 5
    engine.dispose()


# --- secrets never reach the logs, even at DEBUG ------------------------------------------------------

SMTP_USER, SMTP_PASSWORD = "mailer@corp.example", "Smtp-Passw0rd-never-logged"


@pytest.mark.slow
def test_debug_logs_of_a_full_run_carry_no_secret(standin, mysql_url, processes, crypto):
    from support.smtp_server import SmtpSink

    engine = prepare_database(mysql_url)
    with SmtpSink(auth={SMTP_USER: SMTP_PASSWORD}) as sink:
        env = reliability_env(standin, sink, mysql_url, LOG_LEVEL="DEBUG", WORKER_IN_WEB="true",
                              SMTP_USER=SMTP_USER, SMTP_PASSWORD=SMTP_PASSWORD, MAIL_FROM=SMTP_USER)
        web, base = processes.gunicorn(env)
        worker = processes.worker(env)
        assert post(base, packet(crypto, event_xml("user0001"))).text == "success"
        wait_for(lambda: len(sink.messages) == 5, 30, "the first five mails", web, worker)
        standin.expire_tokens()  # the next listing refreshes the token: a second one is issued
        sink.fail_next(1)
        assert post(base, packet(crypto, event_xml("user0002", "update_user"))).text == "success"
        wait_for(lambda: len(sink.messages) == 10, 30, "the next five mails", web, worker)
        standin.script("user/list", {"errcode": 60020, "errmsg": "not allow to access from your ip"})
        assert post(base, packet(crypto, event_xml("user0003", "delete_user"))).text == "success"
        wait_for(lambda: rows(engine, schema.events)[-1].status == "failed", 30, "the third event to fail", web)
        bad = packet(crypto, event_xml("user0004"))
        assert requests.post(f"{base}{PATH}?{bad[0]}x", data=bad[1], timeout=10).status_code == 403
        assert requests.get(f"{base}/readyz", timeout=10).status_code == 200
        scrape = requests.get(f"{base}/metrics", timeout=10)
        assert scrape.status_code == 200 and "wecom_mailer_deliveries_total" in scrape.text
        commands = [_flask(env, *args) for args in (["status"], ["check"], ["status", "--event", "1"])]
        level = _python(env, "import app, logging; app.create_app(); print(logging.getLogger().level)")
        web.stop()
        worker.stop()
    tokens = [t for t in standin._tokens]  # every access token the stand-in issued
    assert standin.tokens_issued >= 2 and len(tokens) == standin.tokens_issued

    logs = {"gunicorn": web.log, "worker": worker.log, "/metrics": scrape.text,
            **{f"flask {' '.join(c.args[5:])}": c.stdout + c.stderr for c in commands}}
    figure("DEBUG log lines scanned", sum(text.count("\n") for text in logs.values()))
    assert level.stdout.split() == [str(logging.DEBUG)], level.stderr  # the service really ran at DEBUG
    assert "5 sent" in worker.log + web.log and "✓ SMTP" in logs["flask check"]
    secrets = {"corp secret": TEST_SECRET, "AES key": TEST_AES_KEY, "callback token": TEST_TOKEN,
               "SMTP password": SMTP_PASSWORD, **{f"access token {i}": t for i, t in enumerate(tokens)},
               "SMTP password (base64 in AUTH)": base64.b64encode(SMTP_PASSWORD.encode()).decode()}
    leaks = [f"{what} in {where}" for what, secret in secrets.items() for where, text in logs.items()
             if secret in text]
    assert leaks == []


def _flask(env, *args):
    return _python(env, "-m", "flask", "--app", "app", *args)


def _python(env, *args):
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    if args[0] != "-m":
        args = ("-c", *args)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=60)


@FUZZ
@given(name=st.text(max_size=300), userid=st.text(alphabet=string.ascii_letters + string.digits + "]>&<_-.@",
                                                  min_size=1, max_size=64))
def test_any_name_and_userid_round_trip_through_reconciliations_event_xml(name, userid):
    """Issue 24: the synthetic event is written by an XML writer; whatever a WeCom name holds, it parses, adds no
    field, and keeps the name (characters XML cannot carry become U+FFFD)."""
    change = wecom.parse_event(wecom.event_xml("create_user", userid, TEST_CORP_ID, "2", 1700000000, name))
    assert change.user_id == userid.strip() and change.departments == (2,)
    assert set(change.fields) <= {"userid", "name", "department"}
    if name.strip() and name.isprintable():
        assert change.fields["name"] == name.strip()
