"""The front door: WeCom's URL check and events are verified, decrypted and recorded once; anything else is refused."""
from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from werkzeug.test import EnvironBuilder

import app as app_module
import services
import wecom
from support import TEST_AES_KEY, TEST_CORP_ID, TEST_TOKEN, event_rows, signed_post

# A copy of shared/reference/crypto-vectors.json (known answers from WeCom's sample, docs and wechatpy).
VECTORS = json.loads((Path(__file__).resolve().parent / "data" / "crypto-vectors.json").read_text())
CREATE = wecom.event_xml("create_user", "zhangsan", TEST_CORP_ID, "2,5", create_time=1700000000, name="张三")


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_known_answer_vectors_verify_and_decrypt(vector):
    crypto = wecom.CallbackCrypto(vector["token"], vector["encoding_aes_key"], vector["receive_id"], max_skew=10**10)
    args = (vector["msg_signature"], vector["timestamp"], vector["nonce"], vector["encrypted"])
    if vector["kind"] == "verify_url":
        assert crypto.verify_url(*args) == vector["plaintext"]
    else:
        crypto.check(*args)
        assert crypto.decrypt(vector["encrypted"]) == vector["plaintext"]


@pytest.mark.parametrize("vector", VECTORS["must_fail"], ids=lambda v: v["name"])
def test_must_fail_vectors_are_refused(vector):
    crypto = wecom.CallbackCrypto(vector["token"], vector["encoding_aes_key"], vector["receive_id"], max_skew=10**10)
    with pytest.raises(wecom.CallbackRejected, match="signature"):
        crypto.verify_url(vector["msg_signature"], vector["timestamp"], vector["nonce"], vector["encrypted"])


def test_url_check_answers_the_bare_echostr(client, crypto):
    packet = crypto.encrypt("1288432023552776189")
    response = client.get("/wecom/callback?" + urlencode(dict(packet["query"], echostr=packet["encrypted"])))
    assert response.status_code == 200
    assert response.data == b"1288432023552776189"


def test_event_is_recorded_once_and_a_resend_is_a_noop(app, client, crypto):
    first = signed_post(client, crypto, CREATE)
    again = signed_post(client, crypto, CREATE)  # WeCom retries with the same plaintext
    assert (first.status_code, first.data) == (200, b"success")
    assert (again.status_code, again.data) == (200, b"success")
    rows = event_rows(services.of(app).engine)
    assert len(rows) == 1
    assert (rows[0].change_type, rows[0].user_id, rows[0].departments, rows[0].status) == \
        ("create_user", "zhangsan", "2,5", "pending")
    assert rows[0].xml == CREATE


def test_other_events_are_answered_and_recorded_as_ignored(app, client, crypto):
    party = CREATE.replace("create_user", "create_party")
    assert signed_post(client, crypto, party).data == b"success"
    [row] = event_rows(services.of(app).engine)
    assert row.status == "ignored" and "create_party" in row.reason


def test_concurrent_identical_callbacks_make_one_row(app, crypto):
    packet = crypto.encrypt(CREATE)
    url = "/wecom/callback?" + urlencode(packet["query"])
    barrier = threading.Barrier(8)
    answers = []

    def send():
        client = app.test_client()
        barrier.wait()
        answers.append(client.post(url, data=packet["body"], content_type="text/xml").status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert answers == [200] * 8
    assert len(event_rows(services.of(app).engine)) == 1


def test_unreachable_state_database_answers_503_so_wecom_retries(make_app, crypto):
    app = make_app(DATABASE_URL="mysql+pymysql://nobody@127.0.0.1:1/none")
    client = app.test_client()
    assert signed_post(client, crypto, CREATE).status_code == 503
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_an_unexpected_fault_answers_500_so_wecom_retries_and_records_nothing(app, client, crypto, caplog,
                                                                             monkeypatch):
    def broken(row):
        raise RuntimeError("a bug in recording")

    monkeypatch.setattr(services.of(app).recorder, "record", broken)
    answer = signed_post(client, crypto, CREATE)
    assert (answer.status_code, answer.data) == (500, b"internal error\n")
    assert answer.content_type == "text/plain; charset=utf-8"
    assert event_rows(services.of(app).engine) == []
    [failure] = [r for r in caplog.records if r.getMessage().startswith("callback failed")]
    assert failure.exc_info and "a bug in recording" in str(failure.exc_info[1])


def test_a_new_event_wakes_the_delivery_thread_once_answered_and_a_resend_does_not(app, client, crypto,
                                                                                  monkeypatch):
    woken = []
    monkeypatch.setattr(services.of(app), "wake_worker", lambda: woken.append(len(event_rows(services.of(app).engine))))
    answer = signed_post(client, crypto, CREATE)
    assert woken == []  # not before the answer is out: the server closes it once sent
    answer.close()
    assert woken == [1]  # and the row was committed by then
    signed_post(client, crypto, CREATE).close()  # WeCom's resend: nothing new to deliver
    signed_post(client, crypto, CREATE.replace("create_user", "create_party")).close()  # recorded as ignored
    assert woken == [1]


def test_an_event_is_marked_logged_only_when_its_line_was_written(make_app, crypto):
    # The mark tells gunicorn.conf.py to leave out the access line: below INFO the event line is not written,
    # so the access line must stay, or an answered event would leave no line at all.
    def environ_after_post(app, xml):  # the server's own environ (the test client answers from a copy)
        packet = crypto.encrypt(xml)
        environ = EnvironBuilder(path="/wecom/callback", method="POST", query_string=packet["query"],
                                 data=packet["body"], content_type="text/xml").get_environ()
        answer = app.wsgi_app(environ, lambda status, headers: None)
        assert b"".join(answer) == b"success"
        answer.close()
        return environ

    assert environ_after_post(make_app(LOG_LEVEL="INFO"), CREATE).get(app_module.EVENT_LOGGED) is True
    assert app_module.EVENT_LOGGED not in environ_after_post(make_app(LOG_LEVEL="WARNING"),
                                                             CREATE.replace("zhangsan", "lisi"))


def test_other_methods_on_the_callback_path_get_405_and_record_nothing(app, client):
    for method in ("PUT", "DELETE", "PATCH"):
        answer = client.open("/wecom/callback", method=method, data=b"<xml/>")
        assert answer.status_code == 405, method
        assert "GET" in answer.headers["Allow"]
    assert event_rows(services.of(app).engine) == []


def test_readyz_answers_when_the_database_does(client):
    assert client.get("/readyz").status_code == 200


# --- hostile input: every case a 4xx, nothing recorded ------------------------------------------

OTHER_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"


def _raw_encrypt(plaintext: bytes, key: str = TEST_AES_KEY, pad_to: int = 32, bad_pad: bool = False) -> str:
    """AES-CBC by hand, for ciphertexts that wechatpy would never produce."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    raw_key = base64.b64decode(key + "=")
    pad = pad_to - len(plaintext) % pad_to
    padded = plaintext + bytes([0 if bad_pad else pad]) * pad
    encryptor = Cipher(algorithms.AES(raw_key), modes.CBC(raw_key[:16])).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


def _envelope(encrypted: str) -> bytes:
    return f"<xml><ToUserName>{TEST_CORP_ID}</ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>".encode()


def _signed(encrypted: str, body: bytes | None = None, ts: str | None = None, token: str = TEST_TOKEN):
    ts = ts or str(int(time.time()))
    query = {"msg_signature": wecom.signature(token, ts, "42", encrypted), "timestamp": ts, "nonce": "42"}
    return query, _envelope(encrypted) if body is None else body


def _payload(message: bytes, corp: str = TEST_CORP_ID) -> bytes:
    return b"0123456789abcdef" + len(message).to_bytes(4, "big") + message + corp.encode()


def _cases(crypto):
    now = int(time.time())
    good = crypto.encrypt(CREATE)
    q = good["query"]
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            '<xml><Encrypt>&lol2;</Encrypt></xml>').encode()
    external = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY ext SYSTEM "file:///etc/passwd">]>'
                '<xml><Encrypt>&ext;</Encrypt></xml>').encode()
    other_corp = _raw_encrypt(_payload(CREATE.encode(), corp="wwsomeoneelse"))
    other_key = wecom.CallbackCrypto(TEST_TOKEN, OTHER_KEY, TEST_CORP_ID).encrypt(CREATE)["encrypted"]
    truncated = base64.b64encode(base64.b64decode(good["encrypted"])[:-16]).decode()
    return {
        "missing parameters": ({}, good["body"], 400),
        "missing nonce": ({"msg_signature": q["msg_signature"], "timestamp": q["timestamp"]}, good["body"], 400),
        "wrong signature": (dict(q, msg_signature="0" * 40), good["body"], 403),
        "signature of another token": (*_signed(good["encrypted"], good["body"], token="someothertoken"), 403),
        "stale timestamp": (*_signed(good["encrypted"], good["body"], ts=str(now - 3600)), 400),
        "future timestamp": (*_signed(good["encrypted"], good["body"], ts=str(now + 3600)), 400),
        "timestamp not a number": (dict(q, timestamp="１２３"), good["body"], 400),
        "another corp id inside": (*_signed(other_corp), 400),  # after the signature: one answer for all
        "a different AES key": (*_signed(other_key), 400),
        "not XML": (q, b"this is not xml", 400),
        "empty body": (q, b"", 400),
        "no Encrypt element": (q, b"<xml><ToUserName>x</ToUserName></xml>", 400),
        "DTD entity-expansion bomb": (q, bomb, 400),
        "external entity": (q, external, 400),
        "oversized body": (q, b"<xml>" + b"A" * 300_000 + b"</xml>", 413),
        "invalid base64": (*_signed("not*base64!"), 400),
        "truncated ciphertext": (*_signed(truncated), 400),
        "ciphertext not whole blocks": (*_signed(base64.b64encode(b"x" * 33).decode()), 400),
        "bad padding": (*_signed(_raw_encrypt(_payload(CREATE.encode()), bad_pad=True)), 400),
        "valid ciphertext of garbage": (*_signed(_raw_encrypt(_payload(b"\x00garbage"))), 400),
        "valid ciphertext, member event without UserID": (
            *_signed(crypto.encrypt(CREATE.replace("<UserID>zhangsan</UserID>", ""))["encrypted"]), 400),
    }


HOSTILE = ["missing parameters", "missing nonce", "wrong signature", "signature of another token", "stale timestamp",
           "future timestamp", "timestamp not a number", "another corp id inside", "a different AES key", "not XML",
           "empty body", "no Encrypt element", "DTD entity-expansion bomb", "external entity", "oversized body",
           "invalid base64", "truncated ciphertext", "ciphertext not whole blocks", "bad padding",
           "valid ciphertext of garbage", "valid ciphertext, member event without UserID"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_callbacks_get_a_4xx_and_record_nothing(app, client, crypto, case):
    query, body, status = _cases(crypto)[case]
    response = client.post("/wecom/callback?" + urlencode(query), data=body, content_type="text/xml")
    assert response.status_code == status, response.data
    assert response.data.strip() and b"Traceback" not in response.data
    assert event_rows(services.of(app).engine) == []


def test_url_check_with_a_wrong_signature_is_refused(client, crypto):
    packet = crypto.encrypt("12345")
    query = dict(packet["query"], echostr=packet["encrypted"], msg_signature="f" * 40)
    response = client.get("/wecom/callback?" + urlencode(query))
    assert response.status_code == 403 and b"12345" not in response.data


def test_refusals_are_logged_without_secrets(app, client, crypto, caplog):
    caplog.set_level("DEBUG")
    for case in HOSTILE:
        query, body, _ = _cases(crypto)[case]
        client.post("/wecom/callback?" + urlencode(query), data=body, content_type="text/xml")
    assert "callback refused" in caplog.text
    for secret in (TEST_TOKEN, TEST_AES_KEY):
        assert secret not in caplog.text
