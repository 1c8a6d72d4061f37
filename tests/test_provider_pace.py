"""At the provider's pace: throttling answers understood whatever their code, a round that pauses instead of
hammering, SMTP_MAX_PER_DAY kept (the clock is injected: no test waits for midnight), one login for a burst."""
from __future__ import annotations

import ssl
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import trustme

import config
import mailer
import smtp_session
from delivery.limits import next_day_start
from ops import checks, report
from store import schema
from support import base_env, change_xml, delivery_rows, event_rows, signed_post
from support.smtp_server import SmtpSink

SHANGHAI = ZoneInfo("Asia/Shanghai")


# --- the replies -------------------------------------------------------------------------------------------

SETTINGS = config.from_env(base_env())


@pytest.mark.parametrize("code, text, throttled", [
    (550, "Connection frequency limited. http://service.mail.qq.com/cgi-bin/help?subtype=1&&id=20022", True),
    (550, "Sender frequency limited", True),
    (550, "Domain frequency limited", True),
    (421, "4.7.0 Too many connections from your IP", True),
    (450, "4.7.1 Error: too much mail from 10.0.0.1", True),  # Postfix anvil
    (451, "4.7.1 Rate limit exceeded, slow down", True),
    (554, "5.7.1 Sending limit reached for today's burst", True),
])
def test_a_throttling_answer_is_transient_whatever_its_code(code, text, throttled):
    result = mailer.refusal(code, text, SETTINGS)
    assert (result.ok, result.permanent, result.throttled, result.quota) == (False, False, throttled, False)
    assert result.reason == f"{code} {text}"


@pytest.mark.parametrize("code, text, permanent", [
    (550, "Mail content denied. http://service.mail.qq.com/cgi-bin/help?subtype=1&&id=20022", True),
    (550, "The mail may contain inappropriate words or content.", True),
    (550, "5.1.1 no such user", True),
    (451, "4.3.0 try again later", False),
])
def test_other_refusals_keep_their_code(code, text, permanent):
    result = mailer.refusal(code, text, SETTINGS)
    assert (result.permanent, result.throttled, result.quota) == (permanent, False, False)


def test_netease_quota_used_up_waits_for_tomorrow():
    result = mailer.refusal(554, "5.5.0 MI:STC Mail sending quota exceeded", SETTINGS)
    assert (result.ok, result.permanent, result.quota) == (False, False, True)


# --- a round against a server that says slow down -----------------------------------------------------------

def test_a_server_answering_451_to_everything_gets_three_attempts_and_one_shared_retry(service, smtp_sink, crypto):
    from prometheus_client import REGISTRY

    pauses = REGISTRY.get_sample_value("wecom_mailer_smtp_throttle_pauses_total") or 0
    smtp_sink.refuse_mail(1000, "451 4.7.1 try again later")
    service.drain()  # the member snapshot
    worker = service.make_worker()
    signed_post(service.test_client(), crypto, change_xml("create_user"))
    worker.run_once()

    assert sum(command.startswith("MAIL") for command in smtp_sink.commands) == 3  # not one per member
    rows = sorted(delivery_rows(service.engine), key=lambda r: r.id)
    tried, untried = rows[:3], rows[3:]
    assert [(r.status, r.attempts) for r in tried] == [("retry", 1)] * 3
    assert [(r.status, r.attempts) for r in untried] == [("pending", 0)] * 2
    # The untried wait with the refused ones: one time for the round, the earliest retry it scheduled.
    assert {r.next_attempt_at for r in untried} == {min(r.next_attempt_at for r in tried)}
    assert event_rows(service.engine)[0].status == "sending"
    scrape = service.test_client().get("/metrics").get_data(as_text=True)
    assert f"wecom_mailer_smtp_throttle_pauses_total {pauses + 1}" in scrape


def test_qq_frequency_limited_550s_fail_nobody_and_pause_the_round(service, smtp_sink, crypto, caplog):
    for n in range(1, 6):
        smtp_sink.reject(f"user{n:04d}@corp.example", "550 Connection frequency limited")
    signed_post(service.test_client(), crypto, change_xml("create_user"))
    service.drain()

    statuses = [r.status for r in delivery_rows(service.engine)]
    assert "failed" not in statuses and statuses.count("retry") == 3 and statuses.count("pending") == 2
    assert smtp_sink.messages == []
    assert any("the SMTP server is throttling" in r.getMessage() for r in caplog.records)

    # The provider lets us in again: the round after the pause delivers everyone, once.
    smtp_sink._rejected.clear()
    worker = service.make_worker(retry_backoff=0.01)
    worker.clock = lambda: datetime.now().timestamp() + 120
    service.drain(worker)
    assert sorted(m["X-RcptTo"] for m in smtp_sink.messages) == [f"user{n:04d}@corp.example" for n in range(1, 6)]


# --- SMTP_MAX_PER_DAY ----------------------------------------------------------------------------------------

class Clock:
    """An injectable clock, starting at 2026-12-03 21:00 in Asia/Shanghai."""

    def __init__(self):
        self.now = datetime(2026, 12, 3, 21, 0, tzinfo=SHANGHAI).timestamp()

    def __call__(self) -> float:
        return self.now


def test_a_daily_limit_of_10_sends_10_and_the_rest_the_next_day(service, standin, smtp_sink, crypto):
    from devtools.wecom_standin import make_members

    standin.set_members(2, make_members(15, 2))
    clock = Clock()
    worker = service.make_worker(smtp_max_per_day=10)
    worker.clock = clock
    signed_post(service.test_client(), crypto, change_xml("create_user"))
    service.drain(worker)

    assert len(smtp_sink.messages) == 10
    waiting = [r for r in delivery_rows(service.engine) if r.status != "sent"]
    midnight = datetime(2026, 12, 4, 0, 0, tzinfo=SHANGHAI).timestamp()
    assert len(waiting) == 5 and {r.status for r in waiting} == {"retry"}
    assert {r.reason for r in waiting} == {
        "daily limit 10 reached (SMTP_MAX_PER_DAY), resumes at 2026-12-04 00:00"}
    assert {r.next_attempt_at for r in waiting} == {midnight}
    assert {r.attempts for r in waiting} == {0}  # waiting for the quota is no attempt
    assert event_rows(service.engine)[0].status == "sending"
    status = report.status_lines(service.engine, SHANGHAI)
    assert "  5 deliveries wait for a daily sending limit; the next goes at 2026-12-04 00:00:00" in status

    clock.now = midnight + 1  # the next day
    service.drain(worker)
    assert sorted(m["X-RcptTo"] for m in smtp_sink.messages) == sorted(r["email"] for r in make_members(15, 2))
    assert event_rows(service.engine)[0].status == "done"


def test_waiting_for_the_quota_does_not_count_towards_retry_max_hours(service, standin, smtp_sink, crypto):
    from devtools.wecom_standin import make_members

    standin.set_members(2, make_members(1, 2))
    clock = Clock()
    worker = service.make_worker(smtp_max_per_day=1, retry_max_hours=1, retry_backoff=1)
    worker.clock = clock
    smtp_sink.fail_next(2, "451 4.3.0 try again later")
    signed_post(service.test_client(), crypto, change_xml("create_user"))
    service.drain(worker)  # 21:00: refused; its RETRY_MAX_HOURS clock starts
    clock.now += 2
    service.drain(worker)  # the retry finds today's one message used up: it waits three hours for midnight
    [row] = delivery_rows(service.engine)
    assert (row.status, row.attempts) == ("retry", 1) and row.reason.startswith("daily limit 1 reached")

    clock.now = next_day_start(clock.now, SHANGHAI) + 1
    service.drain(worker)  # refused again, 3 h after the first try but only seconds of it counted: no give-up
    [row] = delivery_rows(service.engine)
    assert (row.status, row.attempts, row.reason) == ("retry", 2, "451 4.3.0 try again later")

    clock.now = next_day_start(clock.now, SHANGHAI) + 1
    service.drain(worker)
    assert [(r.status, r.attempts) for r in delivery_rows(service.engine)] == [("sent", 3)]
    assert [m["X-RcptTo"] for m in smtp_sink.messages] == ["user0001@corp.example"]


def test_the_provider_quota_reply_makes_the_rest_wait_for_tomorrow(service, smtp_sink, crypto):
    smtp_sink.fail_next(1, "554 5.5.0 MI:STC quota exceeded")
    clock = Clock()
    worker = service.make_worker()
    worker.clock = clock
    signed_post(service.test_client(), crypto, change_xml("create_user"))
    service.drain(worker)

    rows = delivery_rows(service.engine)
    assert smtp_sink.messages == [] and {r.status for r in rows} == {"retry"}
    assert {r.next_attempt_at for r in rows} == {datetime(2026, 12, 4, tzinfo=SHANGHAI).timestamp()}
    assert all(r.reason.startswith("the provider's daily quota is used up (554 5.5.0 MI:STC") for r in rows)


def test_check_prints_the_limits_and_todays_use(service, smtp_sink, crypto):
    import dataclasses

    settings = dataclasses.replace(service.parts.settings, smtp_max_per_minute=15, smtp_max_per_day=100)
    worker = service.make_worker(smtp_max_per_day=100)
    signed_post(service.test_client(), crypto, change_xml("create_user"))
    service.drain(worker)

    ok, line = checks.sending_limits(settings, service.engine)
    assert ok and line.startswith("sending limits: 15/minute, 100/day (5 used today, resets at ")


# --- one connection for a burst of events --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def test_ten_events_together_log_in_once(service_env, make_app, ca, tmp_path, crypto):
    import services
    import templates_repo

    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with SmtpSink(starttls_context=server_tls, require_starttls=True, auth={"it@corp.example": "auth-code-1234"},
                  pipelining=True) as sink:
        env = dict(service_env, SMTP_PORT=str(sink.port), SMTP_SECURITY="starttls", SMTP_USER="it@corp.example",
                   SMTP_PASSWORD="auth-code-1234", SMTP_CA_FILE=str(ca_file))
        app = make_app(**env)
        parts = services.of(app)
        templates_repo.seed_templates(parts.template_engine, parts.settings.template_table,
                                      parts.settings.template_app)
        client = app.test_client()
        for n in range(10):
            assert signed_post(client, parts.crypto, change_xml("update_user", f"user{n:04d}")).data == b"success"
        worker = parts.make_worker()
        worker.ensure_snapshots()
        while worker.run_once():
            pass
        worker.smtp_pool.close()
        assert len(sink.messages) == 50  # 10 events × the stand-in's 5 members
        assert sink.connections == 1 and sink.logins == 1  # one TLS handshake, one AUTH


def test_a_kept_connection_that_the_server_dropped_is_reopened(service, smtp_sink, crypto, monkeypatch):
    monkeypatch.setattr(smtp_session, "IDLE_NOOP_SECONDS", 0.0)  # check it before every reuse
    worker = service.make_worker()
    client = service.test_client()
    signed_post(client, crypto, change_xml("create_user", "user0001"))
    service.drain(worker)
    smtp_sink.restart()  # the idle connection is gone
    signed_post(client, crypto, change_xml("create_user", "user0002"))
    service.drain(worker)

    assert len(smtp_sink.messages) == 10 and {r.status for r in delivery_rows(service.engine)} == {"sent"}
    assert smtp_sink.connections == 2


def test_bad_values_of_the_pace_settings_stop_start_up_naming_the_variable():
    for name, value in (("SMTP_PIPELINING", "maybe"), ("SMTP_MAX_PER_MINUTE", "-1"),
                        ("SMTP_MAX_PER_DAY", "lots"), ("SMTP_CA_FILE", "/missing.pem")):
        with pytest.raises(config.ConfigError) as raised:
            config.from_env(base_env(**{name: value}))
        assert str(raised.value).startswith(name), raised.value


def test_a_certificate_from_a_private_ca_needs_smtp_ca_file(ca, tmp_path):
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "corp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with SmtpSink(tls_context=server_tls) as sink:
        env = {"MAIL_BACKEND": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": sink.port, "SMTP_SECURITY": "ssl"}
        with pytest.raises(mailer.MailError) as refused:
            smtp_session.check(config.from_env(base_env(**env)))
        trusted = smtp_session.check(config.from_env(base_env(SMTP_CA_FILE=str(ca_file), **env)))
    assert "checked against the system trust store" in str(refused.value) and "SMTP_CA_FILE" in str(refused.value)
    assert trusted.startswith(f"SMTP 127.0.0.1:{sink.port} (ssl): TLSv1.")
    assert schema.send_days is not None
