"""Findings 7-10 of the security review (issue 14): masked tracebacks, unforgeable log lines, display names
that cannot pose as someone else, and no XML parser before the callback's signature is checked."""
from __future__ import annotations

import email
import json
import logging
from email import policy
from urllib.parse import urlencode

import pytest

import config
import logs
import mailer
import wecom
from support import DEPARTMENT, TEST_CORP_ID, TEST_SECRET, base_env, event_rows, signed_post

SMTP_PASSWORD = "smtp-authorisation-code-f00d"
DB_PASSWORD = "DbPassw0rd-c0ffee"
FORGED = "2026-01-01 00:00:00,000 INFO wecom_mailer.callback: event 99 create_user userid=ceo: recorded"
DISGUISE = "=?utf-8?b?Q0VPIDxjZW9AY29ycC5leGFtcGxlPg==?="  # decodes to: CEO <ceo@corp.example>


@pytest.fixture
def service_log(capfd):
    """What the service's own log handler writes (it writes to the stream capfd installs)."""
    yield capfd
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_wecom_mailer", False)]:
        root.removeHandler(handler)


def configured(log_format: str) -> config.Settings:
    settings = config.from_env(base_env(LOG_FORMAT=log_format, SMTP_PASSWORD=SMTP_PASSWORD,
                                        TEMPLATE_DATABASE_URL=f"mysql+pymysql://wm:{DB_PASSWORD}@127.0.0.1:1/t"))
    logs.setup(settings)
    return settings


# --- finding 7: tracebacks are masked too -------------------------------------------------------------

@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_traceback_holding_secrets_is_masked(service_log, log_format):
    configured(log_format)
    try:
        raise RuntimeError(f"535 login failed for it@corp.example/{SMTP_PASSWORD} via {DB_PASSWORD}, {TEST_SECRET}")
    except RuntimeError:
        logging.getLogger("wecom_mailer.test").exception("delivery round failed")
    err = service_log.readouterr().err
    for secret in (SMTP_PASSWORD, DB_PASSWORD, TEST_SECRET):
        assert secret not in err
    assert "RuntimeError: 535 login failed for it@corp.example/*** via ***, ***" in err
    if log_format == "json":
        (entry,) = [json.loads(line) for line in err.splitlines() if '"wecom_mailer.test"' in line]
        assert entry["message"] == "delivery round failed" and "Traceback" in entry["exc"]


def test_database_passwords_are_masked_and_never_in_repr():
    settings = config.from_env(base_env(DATABASE_URL=f"mysql+pymysql://wm:{DB_PASSWORD}@db:3306/wm"))
    assert DB_PASSWORD not in repr(settings)
    assert config.mask(f"cannot connect to wm:{DB_PASSWORD}@db", settings) == "cannot connect to wm:***@db"


# --- finding 8: values from outside cannot forge a log line ----------------------------------------------

def test_a_line_break_in_a_signed_userid_does_not_forge_a_log_line(make_app, crypto, service_log):
    app = make_app()
    userid = "evil\n" + FORGED
    xml = wecom.event_xml("create_user", userid, TEST_CORP_ID, str(DEPARTMENT))
    assert signed_post(app.test_client(), crypto, xml).data == b"success"
    lines = service_log.readouterr().err.splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")], lines
    assert any("userid=evil\\n2026-01-01" in line for line in lines), lines
    assert event_rows(app.extensions["wecom_mailer"].engine)[0].user_id == userid[:64]  # the data is kept


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_kind_of_line_break_is_escaped(service_log, log_format):
    configured(log_format)
    breaks = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x1b[2K\r"]
    for brk in breaks:
        logging.getLogger("wecom_mailer.test").warning("userid=%s", f"a{brk}{FORGED}")
    text = service_log.readouterr().err
    lines = [line for line in text.splitlines() if line]  # str.splitlines breaks at every one of them
    assert len(lines) == len(breaks), lines
    assert not [line for line in lines if line.startswith("2026-01-01")]
    if log_format == "json":
        assert [json.loads(line)["message"] for line in lines] == [f"userid=a{b}{FORGED}" for b in breaks]


def test_in_text_logs_the_traceback_lines_are_indented(service_log):
    configured("text")
    try:
        raise ValueError("bad value\n" + FORGED)
    except ValueError:
        logging.getLogger("wecom_mailer.test").exception("failed")
    lines = service_log.readouterr().err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.endswith("wecom_mailer.test: failed"))
    assert lines[first + 1] == "    Traceback (most recent call last):"
    assert all(line.startswith("    ") for line in lines[first + 1:]), lines[first:]
    assert "    " + FORGED in lines


# --- finding 9: an encoded-word in a name is shown as written, not decoded into another name ------------------

def _received_to(raw: bytes):
    parsed = email.message_from_bytes(raw, policy=policy.default)
    return parsed["To"].addresses, str(parsed["To"])


@pytest.mark.parametrize("name", [DISGUISE, "张三 " + DISGUISE, "x" + DISGUISE + "y", "=?iso-8859-1?q?CEO?=",
                                  "a=?=b", DISGUISE * 4])
def test_an_encoded_word_in_a_name_stays_literal_text(name):
    settings = config.from_env(base_env())
    item = mailer.Outgoing(1, "user0001@corp.example", name, "主题 " + DISGUISE, "body")
    built = mailer.build_message(settings, item).as_bytes()
    rendered = mailer.Renderer(settings)(item)  # the SMTP path: the To: line is made separately
    for raw in (built, rendered):
        addresses, shown = _received_to(raw)
        assert [a.addr_spec for a in addresses] == ["user0001@corp.example"], raw[:300]
        assert "ceo@corp.example" not in addresses[0].display_name and "CEO" not in shown.replace("?CEO?", "")
        assert addresses[0].display_name.replace(" ", "") == name.replace(" ", "")
    subject = email.message_from_bytes(built, policy=policy.default)["Subject"]
    assert "CEO <ceo@corp.example>" not in subject


def test_a_member_named_with_an_encoded_word_gets_mail_addressed_to_their_own_name(service, smtp_sink, crypto,
                                                                                  standin):
    from devtools.wecom_standin import make_members

    members = make_members(2, DEPARTMENT)
    members[0]["name"] = DISGUISE
    standin.set_members(DEPARTMENT, members)
    xml = wecom.event_xml("create_user", "user0002", TEST_CORP_ID, str(DEPARTMENT))
    assert signed_post(service.test_client(), crypto, xml).data == b"success"
    service.drain()
    (message,) = [m for m in smtp_sink.messages if m["X-RcptTo"] == "user0001@corp.example"]
    (address,) = message["To"].addresses
    assert address.addr_spec == "user0001@corp.example"
    assert address.display_name != "CEO <ceo@corp.example>" and "ceo@" not in str(message["To"])


# --- finding 10: no XML parser before the signature --------------------------------------------------------

def test_the_envelope_is_not_parsed_before_the_signature_is_checked(make_app, crypto, monkeypatch):
    client = make_app().test_client()
    packet = crypto.encrypt(wecom.event_xml("create_user", "user0001", TEST_CORP_ID, str(DEPARTMENT)))
    parsed = []
    real = wecom.parse_xml
    monkeypatch.setattr(wecom, "parse_xml", lambda data: parsed.append(data) or real(data))
    forged = dict(packet["query"], msg_signature="0" * 40)
    response = client.post("/wecom/callback?" + urlencode(forged), data=packet["body"], content_type="text/xml")
    assert response.status_code == 403 and parsed == []  # refused without any XML parsing
    response = client.post("/wecom/callback?" + urlencode(packet["query"]), data=packet["body"],
                           content_type="text/xml")
    assert response.data == b"success" and len(parsed) == 1  # only the decrypted, authenticated event


@pytest.mark.parametrize("event", [
    '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]><xml>&b;</xml>',
    '<!DOCTYPE xml SYSTEM "http://127.0.0.1:9/x"><xml><MsgType>event</MsgType></xml>',
    '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "b">]><xml>&a;</xml>',
], ids=["entity expansion", "external DTD", "behind a UTF-16 declaration"])
def test_an_authenticated_event_with_a_dtd_is_refused_and_records_nothing(
        make_app, crypto, event):
    app = make_app()
    packet = crypto.encrypt(event)  # signed and encrypted with the right keys: only its content is wrong
    response = app.test_client().post("/wecom/callback?" + urlencode(packet["query"]), data=packet["body"],
                                      content_type="text/xml")
    assert response.status_code == 400
    assert event_rows(app.extensions["wecom_mailer"].engine) == []


@pytest.mark.parametrize("body,reason", [
    (b"<xml><Encrypt>AAAA</Encrypt><Encrypt>BBBB</Encrypt></xml>", "more than one Encrypt element"),
    (b"<xml><Encrypt>&amp;AAAA</Encrypt></xml>", "Encrypt"),
    (b"<xml><Encrypt><x/></Encrypt></xml>", "Encrypt"),
    (b"<xml><Encrypt>AAAA</xml>", "no Encrypt element"),
    (b"<xml><Encrypt/></xml>", "no Encrypt element"),
    (b'<!DOCTYPE x [<!ENTITY a "b">]><xml><Encrypt>&a;</Encrypt></xml>', "DTD"),
    (b"<xml><Encrypt>" + b"<![CDATA[" * 20_000, "no Encrypt element"),
])
def test_envelopes_that_are_not_one_plain_encrypt_element_are_refused(body, reason):
    crypto = wecom.CallbackCrypto("TestCallbackToken123", "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR",
                                  TEST_CORP_ID)
    with pytest.raises(wecom.CallbackRejected) as info:
        crypto.open_envelope(body, "0" * 40, "1700000000", "1")
    assert reason in info.value.reason and info.value.status == 400


# --- issue 24: forwarded headers and names from outside ------------------------------------------------------

FORWARDED_VALUES = ["", "unknown", "999.1.1.1", "::::", "1.2.3.4, " * 500, "\x00", "203.0.113.9:443", "[::1]",
                    "2001:db8::1%eth0", "🙂", "a" * 5000, "127.0.0.1, 127.0.0.1, 127.0.0.1"]


@pytest.mark.parametrize("peer", ["127.0.0.1", "10.0.0.2", "198.51.100.7", "::1", "fd00::2", "not-an-address"])
def test_hostile_forwarded_headers_from_any_peer_never_get_a_5xx(make_app, peer):
    app = make_app(TRUSTED_PROXIES="2", TRUSTED_PROXY_NETWORKS="10.0.0.0/8,fd00::/8,127.0.0.0/8",
                   ADMIN_TOKEN="hardening-admin-token-Wm3Kq8Rv2Lx7")
    client = app.test_client()
    for value in FORWARDED_VALUES:
        for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded"):
            for path in ("/healthz", "/readyz", "/admin/login", "/wecom/callback"):
                response = client.get(path, headers={header: value}, environ_base={"REMOTE_ADDR": peer})
                assert response.status_code < 500, (peer, header, value[:40], path)


@pytest.mark.parametrize("name", ["]]>", "]]]]><![CDATA[", "<!DOCTYPE x>", "&lt;", "\x00\x1b\x7f", "\ud800",
                                  "名字" * 200, "\u2028\u2029", "</xml><xml>"])
def test_any_member_name_gives_a_parseable_event(name):
    import wecom

    change = wecom.parse_event(wecom.event_xml("create_user", "u1", TEST_CORP_ID, "2", 1700000000, name))
    assert (change.change_type, change.user_id, change.departments) == ("create_user", "u1", (2,))
