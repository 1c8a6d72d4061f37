"""The callback's edges (issue 24, "Also"): what is checked before the body is read, refusals logged as one
summary line per reason per minute, and one answer for every failure after the signature check."""
from __future__ import annotations

import base64
import io
import logging
import re
import time
from urllib.parse import urlencode

import pytest

import wecom
from support import TEST_AES_KEY, TEST_CORP_ID, TEST_TOKEN, event_rows

CREATE = wecom.event_xml("create_user", "zhangsan", TEST_CORP_ID, "2", create_time=1700000000)


class CountingStream(io.BytesIO):
    """A request body that counts how often it is read."""

    reads = 0

    def read(self, *args):
        self.reads += 1
        return super().read(*args)


def _query(crypto, **overrides):
    return dict(crypto.encrypt(CREATE)["query"], **overrides)


# --- before the body is read ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,reason", [
    ({"timestamp": "1700000000"}, b"timestamp outside the replay window"),
    ({"timestamp": str(int(time.time()) + 3600)}, b"timestamp outside the replay window"),
    ({"timestamp": "12e5"}, b"timestamp is not a number"),
    ({"msg_signature": "not-a-sha1"}, b"msg_signature is not 40 hexadecimal digits"),
    ({"msg_signature": "0" * 39}, b"msg_signature is not 40 hexadecimal digits"),
    ({"msg_signature": "g" * 40}, b"msg_signature is not 40 hexadecimal digits"),
], ids=["stale", "future", "not a number", "not hex", "39 digits", "40 non-hex"])
def test_a_stale_or_misshapen_query_is_refused_before_the_body_is_read(app, crypto, overrides, reason):
    body = CountingStream(b"<xml>" + b"A" * 300_000 + b"</xml>")  # over CALLBACK_MAX_BODY_BYTES too
    response = app.test_client().post("/wecom/callback?" + urlencode(_query(crypto, **overrides)),
                                      input_stream=body, content_length=len(body.getvalue()),
                                      content_type="text/xml")
    # Before: the body was read first, so this was 413 "body too large" (or the stale check came after it).
    assert (response.status_code, response.data.strip()) == (400, reason)
    assert body.reads == 0
    assert event_rows(app.extensions["wecom_mailer"].engine) == []


def test_a_fresh_well_shaped_query_still_gets_its_body_checked(app, crypto):
    body = b"<xml>" + b"A" * 300_000 + b"</xml>"
    response = app.test_client().post("/wecom/callback?" + urlencode(_query(crypto)), data=body,
                                      content_type="text/xml")
    assert response.status_code == 413


def test_the_url_check_refuses_a_misshapen_signature_the_same_way(app, crypto):
    packet = crypto.encrypt("12345")
    query = dict(packet["query"], echostr=packet["encrypted"], msg_signature="xyz")
    response = app.test_client().get("/wecom/callback?" + urlencode(query))
    assert (response.status_code, response.data.strip()) == (400, b"msg_signature is not 40 hexadecimal digits")


# --- one answer after the signature check (no padding oracle) ------------------------------------------------

def _raw_encrypt(plaintext: bytes, bad_pad: bool = False) -> str:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = base64.b64decode(TEST_AES_KEY + "=")
    pad = 32 - len(plaintext) % 32
    padded = plaintext + bytes([0 if bad_pad else pad]) * pad
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


def _payload(message: bytes, corp: str = TEST_CORP_ID) -> bytes:
    return b"0123456789abcdef" + len(message).to_bytes(4, "big") + message + corp.encode()


def _signed_post(client, encrypted: str):
    ts, nonce = str(int(time.time())), "42"
    query = {"msg_signature": wecom.signature(TEST_TOKEN, ts, nonce, encrypted), "timestamp": ts, "nonce": nonce}
    body = f"<xml><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>".encode()
    return client.post("/wecom/callback?" + urlencode(query), data=body, content_type="text/xml")


AUTHENTICATED_FAILURES = {
    "bad padding": lambda: _raw_encrypt(_payload(CREATE.encode()), bad_pad=True),
    "another corp id": lambda: _raw_encrypt(_payload(CREATE.encode(), corp="wwsomeoneelse")),
    "length field too long": lambda: _raw_encrypt(b"0123456789abcdef" + (10**6).to_bytes(4, "big") + b"x" * 40),
    "not UTF-8": lambda: _raw_encrypt(_payload(b"\xff\xfe<xml/>")),
    "invalid base64": lambda: "not*base64!",
    "not whole blocks": lambda: base64.b64encode(b"x" * 33).decode(),
    "not XML": lambda: _raw_encrypt(_payload(b"\x00garbage")),
    "a DTD": lambda: _raw_encrypt(_payload(b'<!DOCTYPE x [<!ENTITY a "b">]><xml>&a;</xml>')),
    "member change without UserID": lambda: _raw_encrypt(_payload(
        re.sub(r"<UserID>.*?</UserID>", "", CREATE).encode())),
}


def test_every_failure_after_the_signature_check_gets_one_status_and_text(app, crypto, caplog):
    caplog.set_level(logging.INFO)
    client = app.test_client()
    answers = {name: _signed_post(client, make()) for name, make in AUTHENTICATED_FAILURES.items()}
    seen = {(r.status_code, r.data) for r in answers.values()}
    # Before: padding, corp id, base64, blocks, XML and UserID each had their own text (and the corp id 403).
    assert seen == {(400, b"callback cannot be decrypted or read\n")}, answers
    assert event_rows(app.extensions["wecom_mailer"].engine) == []
    # The operator still learns which: the log line keeps the cause.
    assert "message is for another corp id" in caplog.text and "without UserID" in caplog.text


def test_failures_before_the_signature_check_keep_their_own_reason(app, crypto):
    packet = crypto.encrypt(CREATE)
    forged = dict(packet["query"], msg_signature="0" * 40)
    response = app.test_client().post("/wecom/callback?" + urlencode(forged), data=packet["body"],
                                      content_type="text/xml")
    assert (response.status_code, response.data) == (403, b"signature mismatch\n")


# --- refusals: one summary line per reason per minute ----------------------------------------------------------

def test_a_flood_of_refusals_logs_one_line_per_reason_per_minute(app, crypto, caplog):
    caplog.set_level(logging.INFO)
    client = app.test_client()
    forged = dict(crypto.encrypt(CREATE)["query"], msg_signature="0" * 40)
    stale = dict(crypto.encrypt(CREATE)["query"], timestamp="1700000000")
    for _ in range(50):
        client.post("/wecom/callback?" + urlencode(forged), data=b"<xml><Encrypt>AAAA</Encrypt></xml>",
                    content_type="text/xml")
        client.post("/wecom/callback?" + urlencode(stale), data=b"", content_type="text/xml")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # Before: 100 lines, one per request.
    assert len(lines) == 2 and any("signature mismatch" in x for x in lines) and \
        any("replay window" in x for x in lines)


def test_the_summary_counts_what_was_not_logged_and_names_the_addresses():
    from ops.refusals import RefusalLog

    clock = [1000.0]
    lines: list[str] = []
    refusals = RefusalLog(lines.append, window=60.0, clock=lambda: clock[0], timer=False)
    for i in range(30):
        refusals.refused(403, "signature mismatch", f"192.0.2.{i % 3}")
    refusals.refused(400, "empty body", "192.0.2.9")
    assert len(lines) == 2  # the first of each reason, at once
    clock[0] += 59
    refusals.flush()
    assert len(lines) == 2  # the minute is not over
    clock[0] += 1
    refusals.flush()
    assert len(lines) == 3  # one summary for the reason that had more; none for the one that had not
    assert "29 more" in lines[2] and "signature mismatch" in lines[2] and "3 address(es)" in lines[2]
    refusals.refused(403, "signature mismatch", "192.0.2.1")  # inside the next minute: counted, not logged
    assert len(lines) == 3
    clock[0] += 60
    refusals.flush()
    assert "1 more" in lines[3]
    clock[0] += 60
    refusals.flush()  # a quiet minute: nothing to say, and the next refusal is logged at once
    refusals.refused(403, "signature mismatch", "192.0.2.1")
    assert len(lines) == 5 and "in the last" not in lines[4] and "from 192.0.2.1" in lines[4]


def test_the_first_refusal_of_a_reason_names_the_client_address(make_app, crypto, caplog):
    caplog.set_level(logging.INFO)
    app = make_app()
    query = dict(crypto.encrypt(CREATE)["query"], msg_signature="0" * 40)
    app.test_client().post("/wecom/callback?" + urlencode(query), data=b"<xml><Encrypt>AAAA</Encrypt></xml>",
                           content_type="text/xml", environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert "192.0.2.7" in caplog.text and TEST_TOKEN not in caplog.text
