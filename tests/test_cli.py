"""The `flask --app app …` commands, as an IT administrator runs them: what they print and how they exit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

import services
from store import schema
from store.migrate import head_revision
import wecom
from support import (DEPARTMENT, ROOT, TEST_AES_KEY, TEST_CORP_ID, TEST_SECRET, TEST_TOKEN, base_env, free_port,
                      signed_post)
from devtools.wecom_standin import WeComStandIn, make_members

SMTP_PASSWORD = "smtp-authorisation-code-7f3a9c"
ADMIN_TOKEN = "admin-token-5d1e8b2c4a0f9e8d7c6b5a4f3e2d1c0b"
SECRETS = (TEST_SECRET, TEST_TOKEN, TEST_AES_KEY, SMTP_PASSWORD, ADMIN_TOKEN)


def flask(*args: str, env: dict[str, str], cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`flask --app app ARGS` in a fresh process, as typed in a shell (the repository on PYTHONPATH)."""
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT),
                **env}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def output(result) -> str:
    return result.stdout + result.stderr


def event_xml(change_type: str, userid: str = "user0003") -> str:
    return wecom.event_xml(change_type, userid, TEST_CORP_ID, str(DEPARTMENT), create_time=1700000000)


def rows(engine, table):
    with engine.connect() as conn:
        return conn.execute(sa.select(table).order_by(table.c.id)).all()


# --- check --------------------------------------------------------------------------------------------

def test_check_against_a_working_setup_passes_every_line(service, service_env, tmp_path):
    """`service` has seeded the templates; the stand-in's five members all have an address."""
    result = flask("check", env=service_env, cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, output(result)
    assert len(lines) == 9 and all(line.startswith("✓ ") for line in lines), result.stdout
    assert "reachable, schema revision" in lines[0]
    assert "a row for each of create_user, update_user, delete_user" in lines[1]
    assert lines[2] == "✓ WeCom gettoken: access token obtained"
    assert lines[3] == f"✓ WeCom department {DEPARTMENT}: 5 member(s), every one with an address"
    assert lines[4].startswith("✓ SMTP 127.0.0.1:") and "no TLS" in lines[4]
    assert lines[5].startswith("✓ sending limits: none (set SMTP_MAX_PER_MINUTE / SMTP_MAX_PER_DAY")
    assert lines[6].startswith("✓ bounces in the last 7 days: 0 hard, 0 soft, 0 sender blocked, 0 delayed, "
                               "0 unmatched; 0 address(es) suppressed")
    assert lines[7] == f"✓ department {DEPARTMENT}: 0 member(s) last mailed at a suppressed address"
    assert lines[8].startswith("✓ retention: off (RETENTION_DAYS=0") and "wm_events 0 row(s)" in lines[8]


def broken_check_env(tmp_path, api_base: str) -> dict[str, str]:
    """No templates, a closed SMTP port, and every secret set so that the output can be searched for it."""
    return base_env(WECOM_API_BASE=api_base, DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}",
                    MAIL_BACKEND="smtp", SMTP_HOST="127.0.0.1", SMTP_PORT=free_port(), SMTP_SECURITY="none",
                    SMTP_USER="it@corp.example", SMTP_PASSWORD=SMTP_PASSWORD, ADMIN_TOKEN=ADMIN_TOKEN)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret value ({secret[:4]}…) is in the output"


def test_check_against_a_broken_setup_names_each_fault_and_its_fix(tmp_path):
    # WeCom knows another secret than ours: gettoken answers 40001.
    with WeComStandIn(TEST_CORP_ID, "the-secret-wecom-knows", {DEPARTMENT: make_members(5, DEPARTMENT)}) as api:
        result = flask("check", env=broken_check_env(tmp_path, api.api_base), cwd=tmp_path)
    print(f"\n$ flask --app app check   # exit {result.returncode}\n{result.stdout}{result.stderr}")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("✓ state database sqlite:///")
    assert lines[1].startswith("✗ templates ipaas_email_template (app 'tencent-wechat')")
    assert "the table does not exist" in lines[1] and "flask --app app init-db --seed-templates" in lines[1]
    assert lines[2].startswith("✗ WeCom gettoken: the secret is wrong")
    assert "errcode 40001" in lines[2] and "WECOM_CONTACT_SECRET" in lines[2]
    assert lines[3] == f"✗ WeCom department {DEPARTMENT}: not checked (needs a working gettoken)"
    assert lines[4].startswith("✗ SMTP 127.0.0.1:") and "cannot connect" in lines[4]
    assert "check SMTP_HOST and SMTP_PORT" in lines[4]
    assert "Traceback" not in output(result)
    assert_no_secret(output(result))


def test_check_counts_the_members_without_an_address(tmp_path):
    members = make_members(5, DEPARTMENT)
    members[1]["email"] = members[3]["email"] = ""  # user0002 and user0004: WeCom withholds them
    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {DEPARTMENT: members}) as api:
        env = broken_check_env(tmp_path, api.api_base)
        assert flask("init-db", "--seed-templates", env=env, cwd=tmp_path).returncode == 0
        result = flask("check", env=env, cwd=tmp_path)
        print(f"\n$ flask --app app check   # exit {result.returncode}\n{result.stdout}{result.stderr}")
        lines = result.stdout.splitlines()
        assert result.returncode == 1
        # and 2 bounce lines, then retention
        assert [line[0] for line in lines] == ["✓", "✓", "✓", "✗", "✗", "✓", "✓", "✓", "✓"]
        assert lines[3] == (f"✗ WeCom department {DEPARTMENT}: 5 member(s), 2 without an address under "
                            "EMAIL_SOURCES=wecom,directory,pattern (user0002, user0004) — import them with "
                            "`flask --app app import-addresses FILE.csv` or set EMAIL_PATTERN")
        assert_no_secret(output(result))

        # The fix the line names works: import the two addresses, and the department passes.
        csv_file = tmp_path / "addresses.csv"
        csv_file.write_text("userid,email\nuser0002,wang@corp.example\nuser0004,li@corp.example\n")
        assert flask("import-addresses", str(csv_file), env=env, cwd=tmp_path).returncode == 0
        again = flask("check", env=env, cwd=tmp_path).stdout.splitlines()
        assert again[3] == f"✓ WeCom department {DEPARTMENT}: 5 member(s), every one with an address"


def test_check_reports_a_refused_smtp_login_without_the_password(tmp_path):
    from support.smtp_server import SmtpSink

    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {DEPARTMENT: make_members(2, DEPARTMENT)}) as api, \
            SmtpSink(auth={"it@corp.example": "the-right-code"}) as sink:
        env = dict(broken_check_env(tmp_path, api.api_base), SMTP_PORT=str(sink.port))
        result = flask("check", env=env, cwd=tmp_path)
    smtp_line = result.stdout.splitlines()[4]
    assert result.returncode == 1
    assert smtp_line.startswith(f"✗ SMTP 127.0.0.1:{sink.port} (none): login as it@corp.example refused (535")
    assert_no_secret(output(result))


@pytest.mark.parametrize("rows_present, ok, says", [
    (None, False, "the table does not exist"),
    (("create_user", "update_user"), False, "no row for delete_user — add them"),
    (("create_user", "update_user", "delete_user"), True, "a row for each of create_user, update_user, delete_user"),
], ids=["no table", "a row missing", "complete"])
def test_check_template_rows(make_app, db_url, rows_present, ok, says):
    import templates_repo
    from ops import checks

    app = make_app(DATABASE_URL=db_url)
    settings, engine = services.of(app).settings, services.of(app).engine
    if rows_present is not None:
        templates_repo.seed_templates(engine, settings.template_table, settings.template_app)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM ipaas_email_template WHERE change_type NOT IN :kept")
                         .bindparams(sa.bindparam("kept", expanding=True)), {"kept": list(rows_present)})
    result_ok, line = checks.template_rows(engine, settings)
    assert result_ok is ok and says in line, line


# --- status and retry ---------------------------------------------------------------------------------

@pytest.fixture
def history(service, smtp_sink, standin, crypto):
    """Three events: one delivered, one with a delivery refused (554), one failed at WeCom (60011)."""
    client = service.test_client()
    service.drain()  # the member snapshot
    assert signed_post(client, crypto, event_xml("create_user")).data == b"success"
    service.drain()
    smtp_sink.fail_next(1, "554 5.7.1 message refused by policy")
    signed_post(client, crypto, event_xml("update_user"))
    service.drain()
    standin.script("user/list", {"errcode": 60011, "errmsg": "no privilege to access/modify contact"})
    signed_post(client, crypto, event_xml("delete_user"))
    service.drain()
    assert len(smtp_sink.messages) == 9
    return service


def cli(app, *args):
    result = app.test_cli_runner().invoke(args=list(args))
    return result.exit_code, result.output


def test_status_lists_recent_events_with_counts_and_failure_reasons(history):
    code, text = cli(history, "status")
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == ["id", "received", "change", "userid", "status", "deliveries"]
    delete, update, create = (next(line for line in lines if f" {kind} " in line)
                              for kind in ("delete_user", "update_user", "create_user"))
    assert create.split()[-3:] == ["done", "5", "sent"]
    assert update.split()[-5:] == ["done", "1", "failed,", "4", "sent"]
    assert delete.split()[-2:] == ["failed", "-"]
    assert "reason: WeCom user/list: the secret has no permission for this department" in text
    failed_line = next(line for line in lines if line.startswith("  failed delivery"))
    assert "to user0001@corp.example: 554 5.7.1 message refused by policy" in failed_line


def test_status_of_one_event_lists_its_deliveries(history):
    update_id = rows(history.engine, schema.events)[1].id
    code, text = cli(history, "status", "--event", str(update_id))
    assert code == 0
    lines = text.splitlines()
    assert len(lines) == 5
    assert [line.split()[2] for line in lines] == [f"user{i:04d}" for i in range(1, 6)]
    assert lines[0].split()[1] == "failed" and "554 5.7.1 message refused by policy" in lines[0]
    assert all(line.split()[1] == "sent" for line in lines[1:])
    assert cli(history, "status", "--event", "999")[1].strip() == \
        "event 999: no deliveries (unknown event, or not expanded yet)"


def test_retry_one_event_requeues_its_failed_delivery_and_the_worker_sends_it(history, smtp_sink):
    update_id = rows(history.engine, schema.events)[1].id
    code, text = cli(history, "retry", str(update_id))
    assert (code, text.strip()) == (0, "Requeued 0 event(s) and 1 delivery(ies).")
    refused = next(d for d in rows(history.engine, schema.deliveries) if d.userid == "user0001"
                   and d.event_id == update_id)
    assert refused.status == "retry" and refused.attempts == 0
    history.drain()
    assert smtp_sink.wait_for(10)
    assert smtp_sink.messages[-1]["X-RcptTo"] == "user0001@corp.example"
    assert {d.status for d in rows(history.engine, schema.deliveries) if d.event_id == update_id} == {"sent"}
    # Nothing failed any more in that event.
    code, text = cli(history, "retry", str(update_id))
    assert code == 1 and f"event {update_id}: nothing to retry" in text


def test_retry_failed_requeues_every_failure_and_the_worker_delivers(history, smtp_sink, standin):
    code, text = cli(history, "retry", "--failed")
    assert (code, text.strip()) == (0, "Requeued 1 event(s) and 1 delivery(ies).")
    events = rows(history.engine, schema.events)
    assert events[2].status == "pending" and events[2].reason == "requeued"
    history.drain()  # WeCom answers normally again: the delete_user event goes to all five
    assert smtp_sink.wait_for(15)
    assert [e.status for e in rows(history.engine, schema.events)] == ["done"] * 3
    assert not [d for d in rows(history.engine, schema.deliveries) if d.status != "sent"]
    assert cli(history, "retry", "--failed")[1].strip() == "Requeued 0 event(s) and 0 delivery(ies)."


@pytest.mark.parametrize("args", [[], ["7", "--failed"]], ids=["neither", "both"])
def test_retry_needs_an_event_id_or_failed_but_not_both(make_app, args):
    code, text = cli(make_app(), "retry", *args)
    assert code == 2
    assert "Usage:" in text and "give an EVENT_ID or --failed (not both)" in text


# --- import-addresses ---------------------------------------------------------------------------------

def test_import_addresses_prints_added_updated_rejected(make_app, tmp_path):
    app = make_app()
    first = tmp_path / "first.csv"
    first.write_text("帐号,邮箱\nzhangsan,zhangsan@corp.example\nlisi,lisi@corp.example\nwangwu,not-an-address\n",
                     encoding="utf-8")
    code, text = cli(app, "import-addresses", str(first))
    assert code == 0
    assert "Address book: 2 added, 0 updated, 1 rejected." in text
    assert "rejected line 4: 'not-an-address' is not an email address" in text
    second = tmp_path / "second.csv"
    second.write_text("userid,email\nlisi,li.si@corp.example\nzhaoliu,zhaoliu@corp.example\n")
    code, text = cli(app, "import-addresses", str(second))
    assert (code, text.strip()) == (0, "Address book: 1 added, 1 updated, 0 rejected.")


def test_import_addresses_refuses_a_file_without_the_columns(make_app, tmp_path):
    app = make_app()
    wrong = tmp_path / "people.csv"
    wrong.write_text("name,phone\n张三,13800000000\n", encoding="utf-8")
    code, text = cli(app, "import-addresses", str(wrong))
    assert code == 1
    assert "Error:" in text and "has no userid and email columns" in text
    assert "userid,email (headers userid/帐号/账号 and email/邮箱" in text
    assert "Traceback" not in text
    code, text = cli(app, "import-addresses", str(tmp_path / "missing.csv"))
    assert code == 2 and "does not exist" in text


# --- simulate -----------------------------------------------------------------------------------------

@pytest.fixture
def running(processes, tmp_path):
    """A real gunicorn on 127.0.0.1 and the environment of the same deployment."""
    env = base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}", MAIL_FILE_DIR=str(tmp_path / "outbox"))
    _process, base = processes.gunicorn(env)
    return env, base + "/wecom/callback"


def test_simulate_sends_an_event_the_service_accepts(running, tmp_path):
    env, url = running
    result = flask("simulate", "--url", url, "--user-id", "zhangsan", env=env, cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == "create_user userid=zhangsan → HTTP 200: success"
    status = flask("status", env=env, cwd=tmp_path)
    assert " create_user " in status.stdout and " zhangsan " in status.stdout


def test_simulate_verify_passes_the_url_check(running, tmp_path):
    env, url = running
    result = flask("simulate", "--url", url, "--verify", env=env, cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("URL check → HTTP 200: ")


def test_simulate_against_a_closed_port_says_it_cannot_connect(tmp_path):
    env = base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}")
    url = f"http://127.0.0.1:{free_port()}/wecom/callback"
    result = flask("simulate", "--url", url, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert f"Error: cannot connect to {url}: is the service running and the URL right?" in result.stderr
    assert "Traceback" not in output(result)


def test_simulate_refuses_a_url_without_scheme(tmp_path):
    env = base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}")
    result = flask("simulate", "--url", "127.0.0.1:8000/wecom/callback", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "'127.0.0.1:8000/wecom/callback' is not an http:// or https:// URL" in result.stderr


def test_simulate_against_an_untrusted_certificate_says_so(tmp_path):
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import trustme

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)  # a CA nobody trusts
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.handle_error = lambda *args: None  # the refused handshake is the point
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/wecom/callback"
        result = flask("simulate", "--url", url, env=base_env(DATABASE_URL=f"sqlite:///{tmp_path / 's.db'}"),
                       cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    print(result.stderr)
    assert result.returncode == 1
    assert f"Error: TLS with {url} failed" in result.stderr and "CERTIFICATE_VERIFY_FAILED" in result.stderr
    assert "certificate from a public CA" in result.stderr
    assert "Traceback" not in output(result)


def test_simulate_with_another_token_shows_the_refusal_and_a_hint(processes, tmp_path):
    server_env = base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'server.db'}", WECOM_CALLBACK_TOKEN="TheServersToken9")
    _process, base = processes.gunicorn(server_env)
    ours = base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}")
    result = flask("simulate", "--url", base + "/wecom/callback", env=ours, cwd=tmp_path)
    print(f"\n$ flask --app app simulate --url …   # exit {result.returncode}\n{result.stdout}{result.stderr}")
    assert result.returncode == 1
    assert result.stdout.startswith("create_user userid=zhangsan → HTTP 4")
    assert "signature" in result.stdout
    assert "(token, EncodingAESKey or corp id differ from the server's?)" in result.stderr
    assert "Traceback" not in output(result)
    assert_no_secret(output(result))


# --- init-db ------------------------------------------------------------------------------------------

def test_init_db_with_templates_is_idempotent(make_app, db_url):
    app = make_app(DATABASE_URL=db_url)
    code, text = cli(app, "init-db", "--seed-templates")
    assert code == 0
    assert text.splitlines() == [f"Initialized the state database (schema revision {head_revision()}).",
                                 "Template table ipaas_email_template: 4 row(s) added for app tencent-wechat."]
    code, text = cli(app, "init-db", "--seed-templates")
    assert code == 0
    assert text.splitlines() == [f"Initialized the state database (schema revision {head_revision()}).",
                                 "Template table ipaas_email_template: 0 row(s) added for app tencent-wechat."]
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT change_type FROM ipaas_email_template ORDER BY change_type")
                            ).scalars().all() == ["create_user", "delete_user", "digest", "update_user"]
    engine.dispose()


# --- help ---------------------------------------------------------------------------------------------

HELP = {
    "init-db": ["state tables", "--seed-templates", "three original rows"],
    "worker": ["delivery only", "SIGTERM"],
    "simulate": ["encrypted and signed", "--url", "--verify", "--change-type", "--user-id", "--department"],
    "check": ["every dependency", "one line each"],
    "status": ["Recent events", "--event", "--limit"],
    "retry": ["EVENT_ID", "--failed", "Requeue"],
    "import-addresses": ["userid,email", "帐号", "邮箱", "address book"],
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_of_each_command_says_what_it_does(make_app, command):
    code, text = cli(make_app(), command, "--help")
    assert code == 0
    text = " ".join(text.split())  # click wraps the help at the terminal width
    for words in HELP[command]:
        assert words in text, f"`flask --app app {command} --help` lacks {words!r}:\n{text}"


def test_the_command_list_names_every_command(make_app):
    code, text = cli(make_app(), "--help")
    assert code == 0
    for command in HELP:
        assert f"  {command} " in text
