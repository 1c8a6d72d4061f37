"""Bounces as the admin meets them: the `bounces` and `suppressions` commands, /admin/suppressions with its
audited remove button and the sender-blocked banner, `check`'s lines, /metrics; and what the sender puts on
the wire (VERP, DSN parameters) and SpamAssassin's view of a demo mail with the new headers."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import config
import mailer
import smtp_session
from bounces import handle
from ops import bounce_checks
from store import audit, db, migrate, schema, suppressions
from support.admin import post_login
from support import ROOT, base_env, rows
from support.bounces import CORPUS, load

TOKEN = "admin-token-for-tests-0123456789abcdef"
VICTIM = "user0003@corp.example"


def flask(*args: str, env: dict[str, str], stdin: bytes | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=cwd or ROOT, env=full_env,
                          input=stdin, capture_output=True, timeout=60)


@pytest.fixture
def bounced(department, poster, smtp_sink):
    """user0003's delivery bounced hard (a Postfix DSN quoting its headers); returns (service, DSN bytes)."""
    poster("zhangsan")
    department.drain()
    message = [m for m in smtp_sink.messages if m["X-RcptTo"] == VICTIM][-1]
    raw = load("postfix-user-unknown.eml", rcpt=VICTIM, msgid=message["Message-ID"], report_id="cli-test")
    return department, raw


def test_bounces_command_prints_one_line_per_message_and_stdin_works(bounced, service_env, tmp_path):
    service, raw = bounced
    dsn = tmp_path / "dsn.eml"
    dsn.write_bytes(raw)
    ordinary = CORPUS / "ordinary.eml"
    result = flask("bounces", str(dsn), str(ordinary), env=service_env, cwd=tmp_path)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0, result.stderr.decode()
    assert re.fullmatch(rf"{re.escape(str(dsn))}: delivery \d+ <{VICTIM}>: hard, address suppressed: 5\.1\.1 .*User "
                        r"unknown in local recipient table", lines[0]), lines[0]
    assert lines[1] == f"{ordinary}: no delivery: ignored: not a delivery report"
    again = flask("bounces", "-", env=service_env, stdin=raw, cwd=tmp_path)  # a Postfix pipe: the same report
    assert again.stdout.decode().startswith("-: delivery ") and ", seen before: " in again.stdout.decode()
    assert len(rows(service.engine, schema.bounce_reports)) == 1


def test_suppressions_command_lists_and_removes_with_an_audit_row(bounced, service_env, tmp_path):
    service, raw = bounced
    handle.process_message(service.engine, service.parts.settings, raw)
    listed = flask("suppressions", env=service_env, cwd=tmp_path).stdout.decode()
    address, reason, since, source = listed.rstrip("\n").split("\t")
    assert (address, source) == (VICTIM, "bounce") and reason.startswith("5.1.1 <user0003@corp.example>")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", since)
    removed = flask("suppressions", "--remove", VICTIM.upper(), env=service_env, cwd=tmp_path)
    assert removed.returncode == 0 and suppressions.listing(service.engine) == []
    entries = [(e.actor, e.action, e.target) for e in rows(service.engine, schema.audit_log)]
    assert entries == [(audit.CLI, "suppression-remove", VICTIM)]
    missing = flask("suppressions", "--remove", VICTIM, env=service_env, cwd=tmp_path)
    assert missing.returncode == 1 and b"is not suppressed" in missing.stderr
    assert len(rows(service.engine, schema.audit_log)) == 1  # a refused removal changes nothing


@pytest.fixture
def admin(department, poster, smtp_sink, make_app, service_env):
    """/admin on the state of the department, whose members got one event's mail; (client, csrf, service)."""
    poster("zhangsan")
    department.drain()
    client = make_app(**{**service_env, "ADMIN_TOKEN": TOKEN}).test_client()
    assert post_login(client, TOKEN).status_code == 302
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/admin/").get_data(as_text=True)).group(1)
    return client, csrf, department


def test_admin_lists_suppressions_bounces_and_unmatched_and_removes_with_csrf(admin, smtp_sink):
    client, csrf, service = admin
    message = [m for m in smtp_sink.messages if m["X-RcptTo"] == VICTIM]
    handle.process_message(service.engine, service.parts.settings,
                           load("postfix-user-unknown.eml", rcpt=VICTIM, msgid=message[-1]["Message-ID"]))
    handle.process_message(service.engine, service.parts.settings,
                           load("postfix-user-unknown.eml", rcpt=VICTIM, msgid="<forged@corp.example>",
                                report_id="unmatched-one"))
    page = client.get("/admin/suppressions").get_data(as_text=True)
    assert VICTIM in page and "5.1.1" in page and "unmatched" in page
    assert client.get("/admin/suppressions?kind=unmatched").get_data(as_text=True).count("no VERP tag") == 1
    # no CSRF token: 400 and nothing changes
    assert client.post("/admin/suppressions/remove", data={"address": VICTIM}).status_code == 400
    assert VICTIM in {s.address for s in suppressions.listing(service.engine)}
    assert client.post("/admin/suppressions/remove", data={"address": "nobody@corp.example",
                                                           "csrf_token": csrf}).status_code == 404
    response = client.post("/admin/suppressions/remove", data={"address": VICTIM, "csrf_token": csrf})
    assert response.status_code == 302 and suppressions.listing(service.engine) == []
    entries = [(e.actor, e.action, e.target) for e in rows(service.engine, schema.audit_log)
               if e.action == "suppression-remove"]
    assert entries == [(audit.TOKEN, "suppression-remove", VICTIM)]
    report_id = rows(service.engine, schema.bounce_reports)[-1].id
    raw_page = client.get(f"/admin/bounce-reports/{report_id}")
    assert raw_page.status_code == 200 and "forged@corp.example" in raw_page.get_data(as_text=True)
    assert client.get("/admin/bounce-reports/99999999").status_code == 404


def test_a_sender_blocked_report_puts_a_banner_on_every_admin_page_and_fails_check(admin, smtp_sink):
    client, _, service = admin
    assert "sender-blocked" not in client.get("/admin/").get_data(as_text=True)
    message = [m for m in smtp_sink.messages if m["X-RcptTo"] == VICTIM][-1]
    handle.process_message(service.engine, service.parts.settings,
                           load("postfix-qq-throttled.eml", rcpt=VICTIM, msgid=message["Message-ID"]))
    for path in ("/admin/", "/admin/templates", "/admin/addresses", "/admin/suppressions"):
        page = client.get(path).get_data(as_text=True)
        assert 'id="sender-blocked"' in page and "Connection frequency limited" in page, path
    lines = bounce_checks.bounce_lines(service.engine, service.parts.settings)
    assert (False, "sender blocked") == (lines[-1][0], lines[-1][1][:14])
    assert suppressions.listing(service.engine) == []


def test_check_says_plainly_when_most_pattern_guesses_bounce(sqlite_url):
    engine = db.make_engine(sqlite_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(schema.deliveries.insert(), [
            {"event_id": 1, "userid": f"u{i}", "address": f"u{i}@corp.example", "address_source": "pattern",
             "status": "bounced" if i < 41 else "sent", "attempts": 1, "next_attempt_at": 0} for i in range(50)])
    settings = config.from_env(base_env(DATABASE_URL=sqlite_url))
    lines = bounce_checks.bounce_lines(engine, settings)
    assert (False, "EMAIL_PATTERN looks wrong: 41 of 50 guessed addresses bounced") in [
        (ok, line.split(";")[0]) for ok, line in lines]


def test_metrics_count_bounces_by_kind_and_suppressed_addresses(bounced):
    service, raw = bounced
    handle.process_message(service.engine, service.parts.settings, raw)
    handle.process_message(service.engine, service.parts.settings, load("postfix-user-unknown.eml",
                           msgid="<nothing-of-ours@corp.example>", report_id="other"))
    from ops import metrics
    metrics._readings.clear()  # a fresh reading, not one from before the reports
    text = service.test_client().get("/metrics").get_data(as_text=True)
    assert 'wecom_mailer_bounces_total{kind="hard"} 1.0' in text
    assert 'wecom_mailer_bounces_total{kind="unmatched"} 1.0' in text
    assert "wecom_mailer_suppressed_addresses 1.0" in text


# --- what goes on the wire ---------------------------------------------------------------------------------

def test_envelope_carries_verp_and_dsn_parameters_only_when_offered():
    settings = config.from_env(base_env(BOUNCE_ADDRESS="bounces@corp.example"))
    item = mailer.Outgoing(7, "a+b@corp.example", "A", "s", "b", tag="d7-abcdefghijklmnop")
    plain = smtp_session._envelope_lines(settings, item, dsn=False)
    assert plain[0] == b"MAIL FROM:<bounces+d7-abcdefghijklmnop@corp.example>\r\n"
    assert plain[1] == b"RCPT TO:<a+b@corp.example>\r\n"
    dsn = smtp_session._envelope_lines(settings, item, dsn=True)
    assert dsn[0] == b"MAIL FROM:<bounces+d7-abcdefghijklmnop@corp.example> RET=HDRS ENVID=d7-abcdefghijklmnop\r\n"
    assert dsn[1] == b"RCPT TO:<a+b@corp.example> ORCPT=rfc822;a+2Bb@corp.example\r\n"
    unset = config.from_env(base_env())
    assert smtp_session._envelope_lines(unset, item)[0] == b"MAIL FROM:<it@corp.example>\r\n"


SPAMASSASSIN_HINT = "spamassassin is not installed: apt-get install spamassassin"


def test_a_demo_mail_with_the_new_headers_scores_under_2_with_spamassassin():
    binary = shutil.which("spamassassin")
    if binary is None:
        pytest.skip(SPAMASSASSIN_HINT)
    settings = config.from_env(base_env(MAIL_FROM="通讯录通知 <notify@corp.example>",
                                        BOUNCE_ADDRESS="bounces@corp.example"))
    item = mailer.Outgoing(12, "wangwu@corp.example", "王五", "成员变更通知：张三加入了研发部",
                           "您好，\n\n张三（zhangsan）于 2026-12-07 09:12:00 加入了研发部。\n\n此邮件由系统自动发送，请勿回复。\n",
                           tag="d12-abcdefghijklmnop")
    message = b"Return-Path: <bounces+d12-abcdefghijklmnop@corp.example>\r\n" + mailer.Renderer(settings)(item)
    assert b"Auto-Submitted: auto-generated" in message
    result = subprocess.run([binary, "-t", "-L"], input=message, capture_output=True, timeout=120)
    found = re.search(rb"X-Spam-Status: \w+, score=(-?[0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr[-2000:]
    score = float(found.group(1))
    assert score < 2.0, result.stdout.decode("utf-8", "replace")[-3000:]
