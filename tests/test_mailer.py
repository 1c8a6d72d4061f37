"""mailer.py against a real SMTP server (aiosmtpd on 127.0.0.1): what arrives, and what each outcome says."""
from __future__ import annotations

import email.utils
import logging
import socket
import ssl
import threading
from email import policy
from email.parser import BytesParser

import pytest
import trustme

import config
import mailer
import smtp_session
from delivery.sending import send_batch
from support import base_env
from mailer import Outgoing, SendResult
from support.smtp_server import SmtpSink, free_port

PASSWORD = "s3cret-Auth-Code"


@pytest.fixture
def sink():
    with SmtpSink() as server:
        yield server


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def server_tls(ca):
    """A server-side TLS context with a certificate for 127.0.0.1 from the throwaway CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def client_tls(ca):
    """What ssl.create_default_context() is in production, trusting the throwaway CA instead."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def smtp_settings(port: int, **env) -> config.Settings:
    env = {"SMTP_SECURITY": "none", "SMTP_TIMEOUT_SECONDS": "5", **env}
    return config.from_env(base_env(MAIL_BACKEND="smtp", SMTP_HOST="127.0.0.1", SMTP_PORT=port, **env))


def member(n: int, **fields) -> Outgoing:
    values = {"delivery_id": n, "address": f"user{n}@corp.example", "name": f"Member {n}",
              "subject": "Welcome", "body": f"Hello member {n}"}
    return Outgoing(**{**values, **fields})


def send(settings, items, **kwargs) -> list[tuple[Outgoing, SendResult]]:
    """send_batch, returning the (item, result) pairs in the order they were recorded."""
    results = []
    send_batch(settings, items, results.extend, **kwargs)
    return results


def rcpt(message) -> str:
    return message["X-RcptTo"]


# -- messages ----------------------------------------------------------------------------


def test_a_batch_goes_over_one_connection(sink):
    results = send(smtp_settings(sink.port), [member(n) for n in range(1, 6)])

    assert [(item.delivery_id, result.ok) for item, result in results] == [(n, True) for n in range(1, 6)]
    assert [rcpt(m) for m in sink.messages] == [f"user{n}@corp.example" for n in range(1, 6)]
    assert sink.connections == 1


def test_message_is_utf8_with_date_message_id_and_the_member_as_to(sink):
    settings = smtp_settings(sink.port, MAIL_FROM="IT 部门 <it@corp.example>")
    item = member(7, address="zhangsan@corp.example", name="张三", subject="欢迎加入，张三",
                  body="你好，张三！\n欢迎加入研发部。")

    send(settings, [item])

    [message] = sink.messages
    assert message["Subject"] == "欢迎加入，张三"
    assert message.get_content().replace("\r\n", "\n") == "你好，张三！\n欢迎加入研发部。\n"
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    [to] = message["To"].addresses
    assert (to.display_name, to.addr_spec) == ("张三", "zhangsan@corp.example")
    [sender] = message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("IT 部门", "it@corp.example")
    assert message["X-MailFrom"] == "it@corp.example"
    assert email.utils.parsedate_to_datetime(message["Date"]).utcoffset() is not None
    assert message["Message-ID"].endswith("@corp.example>")
    assert message.as_bytes().isascii()  # 7-bit clean: no relay can mangle it


@pytest.mark.parametrize("name, subject", [
    ("Eve\r\nBcc: x@evil.example", "Welcome"),
    ("Eve\nBcc: x@evil.example", "Welcome"),
    ("Eve\u2028Bcc: x@evil.example", "Welcome"),
    ("Eve", "Welcome\r\nBcc: x@evil.example"),
    ("Eve", "Welcome\rBcc: x@evil.example\x00"),
    ('Eve" <x@evil.example>, "', "Welcome"),
])
def test_event_data_cannot_add_headers_or_recipients(sink, name, subject):
    results = send(smtp_settings(sink.port), [member(1, name=name, subject=subject)])

    assert results[0][1].ok
    [message] = sink.messages
    assert message["Bcc"] is None
    assert rcpt(message) == "user1@corp.example"
    assert [a.addr_spec for a in message["To"].addresses] == ["user1@corp.example"]
    assert "\n" not in str(message["Subject"]) and "\r" not in str(message["Subject"])


@pytest.mark.parametrize("address", [
    "not-an-address", "", "a@", "@corp.example", "a@b@corp.example", "a b@corp.example",
    "张三@corp.example", "x@evil.example>, y@corp.example", "x@corp.example\r\nBcc: y@evil.example",
])
def test_invalid_address_is_permanent_and_the_batch_goes_on(sink, address):
    results = send(smtp_settings(sink.port), [member(1, address=address), member(2)])

    assert results[0][1].ok is False and results[0][1].permanent
    assert results[0][1].reason.startswith("invalid address")
    assert "\n" not in results[0][1].reason
    assert results[1][1].ok
    assert [rcpt(m) for m in sink.messages] == ["user2@corp.example"]


def test_build_message_refuses_an_invalid_address():
    settings = config.from_env(base_env())
    with pytest.raises(ValueError, match="invalid address"):
        mailer.build_message(settings, member(1, address="nobody"))


# -- failures the server reports -------------------------------------------------------------


@pytest.mark.parametrize("stage, reply, permanent, throttled, connections", [
    ("RCPT", "450 4.2.1 mailbox busy", False, False, 1),
    ("RCPT", "421 4.7.0 too many connections", False, True, 2),  # the client must reconnect for the next one
    ("RCPT", "553 5.1.3 bad recipient syntax", True, False, 1),
    ("DATA", "451 4.3.0 try again later", False, False, 1),
    ("DATA", "452 4.2.2 mailbox full", False, False, 1),
    ("DATA", "421 4.3.2 service shutting down", False, False, 2),
    ("DATA", "554 5.7.1 message refused", True, False, 1),
])
def test_a_refusal_fails_that_message_only(sink, stage, reply, permanent, throttled, connections):
    if stage == "RCPT":
        sink.reject("user1@corp.example", reply)
    else:
        sink.fail_next(1, reply)

    results = send(smtp_settings(sink.port), [member(1), member(2)])

    failed = SendResult(ok=False, permanent=permanent, reason=reply, throttled=throttled)
    assert [result for _, result in results] == [failed, SendResult(ok=True)]
    assert [rcpt(m) for m in sink.messages] == ["user2@corp.example"]
    assert sink.connections == connections


def test_transient_failure_then_a_later_send_delivers_once(sink):
    settings = smtp_settings(sink.port)
    sink.fail_next(1, "451 4.3.0 try again later")

    [(_, first)] = send(settings, [member(1)])
    [(_, second)] = send(settings, [member(1)])

    assert (first.ok, first.permanent, first.reason) == (False, False, "451 4.3.0 try again later")
    assert second.ok
    assert [rcpt(m) for m in sink.messages] == ["user1@corp.example"]


def test_550_for_one_of_three_recipients(sink):
    sink.reject("user2@corp.example", "550 5.1.1 mailbox unavailable")

    results = send(smtp_settings(sink.port), [member(1), member(2), member(3)])

    outcome = {item.delivery_id: result for item, result in results}
    assert outcome[2] == SendResult(ok=False, permanent=True, reason="550 5.1.1 mailbox unavailable")
    assert outcome[1].ok and outcome[3].ok
    assert sorted(rcpt(m) for m in sink.messages) == ["user1@corp.example", "user3@corp.example"]
    assert sink.connections == 1  # RSET, then on over the same connection


# -- the connection -------------------------------------------------------------------------


def test_server_down_gives_a_transient_result_and_no_exception(sink):
    settings = smtp_settings(sink.port)
    sink.stop()

    results = send(settings, [member(1), member(2), member(3)])

    # The thread stops after a failed connect: the rest are not attempted and get no result.
    [(item, result)] = results
    assert item.delivery_id == 1
    assert (result.ok, result.permanent) == (False, False)
    assert f"127.0.0.1:{sink.port}" in result.reason and "SMTP_HOST" in result.reason


def test_dropped_connection_is_reopened_and_the_message_sent(sink):
    sink.hang_up_after_reply()  # the server closes the connection after accepting member 1

    results = send(smtp_settings(sink.port), [member(1), member(2), member(3)])

    assert [result for _, result in results] == [SendResult(ok=True)] * 3
    assert [rcpt(m) for m in sink.messages] == [f"user{n}@corp.example" for n in (1, 2, 3)]
    assert sink.connections == 2


def test_server_gone_mid_batch_fails_that_message_and_stops(sink):
    sink.hang_up_after_reply(stop_listening=True)

    results = send(smtp_settings(sink.port), [member(1), member(2), member(3)])

    assert [(r.ok, r.permanent) for _, r in results] == [(True, False), (False, False)]
    assert "cannot connect" in results[1][1].reason


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_tls_and_login(server_tls, client_tls, security):
    options = {"starttls_context": server_tls, "require_starttls": True} if security == "starttls" \
        else {"tls_context": server_tls}
    with SmtpSink(auth={"mailer@corp.example": PASSWORD}, **options) as server:
        settings = smtp_settings(server.port, SMTP_SECURITY=security, SMTP_USER="mailer@corp.example",
                                 SMTP_PASSWORD=PASSWORD, MAIL_FROM="")

        results = send(settings, [member(1), member(2)], tls_context=client_tls)
        description = smtp_session.check(settings, tls_context=client_tls)

    assert [r for _, r in results] == [SendResult(ok=True)] * 2
    assert [m["From"].addresses[0].addr_spec for m in server.messages] == ["mailer@corp.example"] * 2
    assert server.connections == 2  # one for the batch, one for check_smtp
    assert f"({security}): TLSv1." in description and "logged in as mailer@corp.example" in description
    assert PASSWORD not in description


def test_untrusted_certificate_is_refused(server_tls):
    with SmtpSink(tls_context=server_tls) as server:
        settings = smtp_settings(server.port, SMTP_SECURITY="ssl")
        [(_, result)] = send(settings, [member(1), member(2)])  # the default context: system CAs only

        assert (result.ok, result.permanent) == (False, False)
        assert "certificate" in result.reason
        assert server.messages == []


@pytest.mark.parametrize("wrong", ["wrong-password", "wrong-password-2"])
def test_login_failure_is_transient_with_a_hint_and_no_password(wrong):
    with SmtpSink(auth={"mailer@corp.example": PASSWORD}) as server:
        settings = smtp_settings(server.port, SMTP_USER="mailer@corp.example", SMTP_PASSWORD=wrong)  # 8+ characters: shorter ones stop start-up (issue 24)

        results = send(settings, [member(1), member(2)])
        with pytest.raises(mailer.MailError) as raised:
            smtp_session.check(settings)

    [(_, result)] = results  # the thread stops: member 2 is not attempted
    assert (result.ok, result.permanent) == (False, False)
    for reason in (result.reason, str(raised.value)):
        assert "535" in reason and "SMTP_USER/SMTP_PASSWORD" in reason and "授权码" in reason
        assert settings.smtp_password not in reason
    assert server.messages == []


@pytest.mark.parametrize("server_requires", ["login", "starttls"])  # and the settings offer neither
def test_a_refused_sender_is_transient_and_stops_the_thread(server_tls, server_requires):
    options = ({"auth": {"mailer@corp.example": PASSWORD}} if server_requires == "login"
               else {"starttls_context": server_tls, "require_starttls": True})
    with SmtpSink(**options) as server:
        results = send(smtp_settings(server.port), [member(1), member(2)])

    [(_, result)] = results  # a settings problem: member 2 is not attempted, member 1 is retried later
    assert (result.ok, result.permanent) == (False, False)
    assert result.reason.startswith("sender refused (530") and "MAIL_FROM" in result.reason
    assert server.messages == []


def test_four_connections_share_the_batch(sink):
    items = [member(n) for n in range(1, 41)]

    results = send(smtp_settings(sink.port, SMTP_CONNECTIONS="4"), items)

    assert sorted(item.delivery_id for item, result in results if result.ok) == list(range(1, 41))
    assert sorted(rcpt(m) for m in sink.messages) == sorted(item.address for item in items)
    assert sink.connections == 4
    assert len({m["X-Peer"] for m in sink.messages}) == 4


def test_on_result_false_stops_the_batch(sink):
    seen = []

    def first_only(outcomes):
        seen.extend(item.delivery_id for item, _ in outcomes)
        return False

    send_batch(smtp_settings(sink.port), [member(1), member(2), member(3)], first_only)

    assert seen == [1]
    assert [rcpt(m) for m in sink.messages] == ["user1@corp.example"]


def test_stop_event_set_sends_nothing(sink):
    stop = threading.Event()
    stop.set()

    assert send(smtp_settings(sink.port), [member(1)], stop=stop) == []
    assert sink.messages == [] and sink.connections == 0


def test_an_error_in_on_result_reaches_the_caller(sink):
    def failing(outcomes):
        raise RuntimeError("database is gone")

    with pytest.raises(RuntimeError, match="database is gone"):
        send_batch(smtp_settings(sink.port, SMTP_CONNECTIONS="2"), [member(n) for n in range(5)], failing)
    assert len(sink.messages) <= 2  # each thread stops after its first outcome


def test_one_log_line_per_member_with_name_and_address(caplog):
    caplog.set_level(logging.DEBUG)
    with SmtpSink(auth={"mailer@corp.example": PASSWORD}) as server:
        server.reject("user2@corp.example")
        settings = smtp_settings(server.port, SMTP_USER="mailer@corp.example", SMTP_PASSWORD=PASSWORD)

        send(settings, [member(1, name="张三"), member(2, name="李四\r\nforged line")])

    lines = [r.getMessage() for r in caplog.records if r.name == "wecom_mailer.mailer"]
    assert len(lines) == 2
    assert "张三 <user1@corp.example>" in lines[0]
    assert "李四 forged line <user2@corp.example>" in lines[1] and "550" in lines[1]
    assert all(PASSWORD not in line for line in caplog.text.splitlines())


# -- check_smtp -------------------------------------------------------------------------------


def test_check_smtp_connects_and_sends_nothing(sink):
    description = smtp_session.check(smtp_settings(sink.port))

    assert description == (f"SMTP 127.0.0.1:{sink.port} (none): no TLS, no login (SMTP_USER is empty), "
                           "no pipelining")
    assert sink.connections == 1 and sink.messages == []


def test_check_smtp_names_the_setting_to_fix_when_nothing_listens():
    with pytest.raises(mailer.MailError) as raised:
        smtp_session.check(smtp_settings(free_port()))

    assert "cannot connect" in str(raised.value) and "SMTP_HOST and SMTP_PORT" in str(raised.value)


def test_check_smtp_times_out_against_a_silent_port():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never says 220
        settings = smtp_settings(silent.getsockname()[1], SMTP_TIMEOUT_SECONDS="0.2")
        with pytest.raises(mailer.MailError, match=r"no answer within 0.2 s"):
            smtp_session.check(settings)


# -- file and console backends ------------------------------------------------------------------


def test_file_backend_writes_one_parseable_eml_per_message(tmp_path):
    outbox = tmp_path / "outbox" / "new"
    settings = config.from_env(base_env(MAIL_BACKEND="file", MAIL_FILE_DIR=str(outbox)))
    items = [member(2, name="张三", subject="欢迎"), member(10), member(3, address="bad address")]

    results = send(settings, items)

    assert [(item.delivery_id, r.ok) for item, r in results] == [(2, True), (10, True), (3, False)]
    files = sorted(p.name for p in outbox.iterdir())
    assert files == ["00000002-user2@corp.example.eml", "00000010-user10@corp.example.eml"]
    message = BytesParser(policy=policy.default).parsebytes((outbox / files[0]).read_bytes())
    assert message["Subject"] == "欢迎"
    assert message["To"].addresses[0].display_name == "张三"
    assert message.get_content().strip() == "Hello member 2"


def test_console_backend_prints_headers_and_decoded_body(capsys):
    settings = config.from_env(base_env(MAIL_BACKEND="console"))

    results = send(settings, [member(1, subject="欢迎", body="你好，张三")])

    assert results[0][1].ok
    out = capsys.readouterr().out
    assert "Subject: 欢迎" in out and "To: Member 1 <user1@corp.example>" in out
    assert "你好，张三" in out


def test_a_subject_the_email_package_cannot_encode_fails_those_messages_not_the_round(sink):
    # Python's header encoder raises UnicodeEncodeError on non-ASCII text beside a lone surrogate (and did
    # beside an encoded-word with an undecodable charset, before header_text broke every `=?`); that must
    # be a recorded failure, never an exception out of send_all.
    odd = Outgoing(1, "a@corp.example", "张三", "é \udcff", "正文")
    fine = Outgoing(2, "b@corp.example", "李四", "新增成员", "正文")
    results = send(smtp_settings(sink.port), [odd, fine])
    assert [(i.delivery_id, r.ok, r.permanent) for i, r in results] == [(1, False, True), (2, True, False)]
    assert "message cannot be built" in results[0][1].reason
    assert [m["X-RcptTo"] for m in sink.messages] == ["b@corp.example"]
