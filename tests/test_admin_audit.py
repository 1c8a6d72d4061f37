"""The audit log: every state-changing route of /admin and every changing command writes exactly one row
(0 actions without an audit row); /admin/audit lists and filters them; `flask audit` prints them."""
from __future__ import annotations

import io

import pytest
import sqlalchemy as sa

from store import audit, schema, suppressions, template_versions
from support.admin import post_login
from support import TEST_ADMIN_TOKEN, change_xml, signed_post
from support.admin_team import ADMIN, csrf_of, sign_in, team_env

# Every /admin endpoint that changes state, each walked below. A new one fails this test until it is added
# here with the audit row it writes.
CHANGING = {"admin.wecom_callback", "admin.login", "admin.logout", "admin.logout_everywhere", "admin.retry_event",
            "admin.retry_failed", "admin.import_addresses", "admin.template_post", "admin.template_restore",
            "admin.remove_suppression"}


@pytest.fixture
def service_env(service_env, standin):
    return {**service_env, **team_env(standin), "ADMIN_TOKEN": TEST_ADMIN_TOKEN}


@pytest.fixture
def failed_event(service, smtp_sink, crypto):
    smtp_sink.reject("user0003@corp.example", "550 5.6.0 message refused")  # failed, not a bounce
    assert signed_post(service.test_client(), crypto, change_xml("create_user", "user0003")).data == b"success"
    service.drain()
    smtp_sink.reject("user0003@corp.example", "")
    with service.engine.connect() as conn:
        return conn.execute(sa.select(schema.events.c.id)).scalar_one()


def test_the_changing_routes_are_the_ones_walked(service):
    posts = {rule.endpoint for rule in service.url_map.iter_rules()
             if rule.endpoint.startswith("admin.") and "POST" in rule.methods}
    assert posts | {"admin.wecom_callback"} == CHANGING


def test_every_changing_route_writes_exactly_one_audit_row(service, standin, failed_event):
    engine = service.engine
    walked = set()

    def once(endpoint, action, actor, act):
        before = audit.count(engine)
        response = act()
        assert response.status_code < 500, (endpoint, response.status_code)
        assert audit.count(engine) == before + 1, f"{endpoint} wrote {audit.count(engine) - before} audit rows"
        [row] = audit.entries(engine, limit=1)
        assert (row.action, row.actor) == (action, actor), endpoint
        assert row.client == "127.0.0.1"
        walked.add(endpoint)
        return response

    admin = service.test_client()
    once("admin.wecom_callback", "sign-in", ADMIN, lambda: sign_in(admin, standin, ADMIN))
    once("admin.wecom_callback", "sign-in-refused", "user0005", lambda: sign_in(service.test_client(), standin,
                                                                                 "user0005"))
    token = service.test_client()
    once("admin.login", "sign-in-refused", "token", lambda: post_login(token, "w" * 40))
    once("admin.login", "sign-in", "token", lambda: post_login(token, TEST_ADMIN_TOKEN))
    csrf = csrf_of(admin.get("/admin/").get_data(as_text=True))
    once("admin.retry_event", "retry", ADMIN,
         lambda: admin.post(f"/admin/events/{failed_event}/retry", data={"csrf_token": csrf}))
    once("admin.retry_failed", "retry", ADMIN, lambda: admin.post("/admin/retry-failed", data={"csrf_token": csrf}))
    once("admin.import_addresses", "import-addresses", ADMIN, lambda: admin.post(
        "/admin/addresses/import", data={"csrf_token": csrf, "file": (io.BytesIO(b"userid,email\nu1,u1@corp.example\n"),
                                                                       "book.csv")}))
    form = {"csrf_token": csrf, "title": "新增成员 {name}", "body": "ID：{userid}", "event": "sample"}
    before = audit.count(engine)
    assert admin.post("/admin/templates/create_user", data={**form, "op": "preview"}).status_code == 200
    assert audit.count(engine) == before  # a preview changes nothing
    once("admin.template_post", "template-save", ADMIN,
         lambda: admin.post("/admin/templates/create_user", data={**form, "op": "save"}))
    once("admin.template_post", "template-test-send", ADMIN,
         lambda: admin.post("/admin/templates/create_user", data={**form, "op": "test"}))
    original = template_versions.history(engine, "tencent-wechat", "create_user")[-1]
    once("admin.template_restore", "template-rollback", ADMIN,
         lambda: admin.post(f"/admin/templates/create_user/restore/{original.id}", data={"csrf_token": csrf}))
    with engine.begin() as conn:
        suppressions.suppress(conn, "user0004@corp.example", "5.1.1 user unknown", "admin", now=1.0)
    once("admin.remove_suppression", "suppression-remove", ADMIN, lambda: admin.post(
        "/admin/suppressions/remove", data={"csrf_token": csrf, "address": "user0004@corp.example"}))
    once("admin.logout", "sign-out", ADMIN, lambda: admin.post("/admin/logout", data={"csrf_token": csrf}))
    csrf = csrf_of(token.get("/admin/").get_data(as_text=True))
    once("admin.logout_everywhere", "sign-out-everywhere", "token",
         lambda: token.post("/admin/logout-everywhere", data={"csrf_token": csrf}))
    assert walked == CHANGING
    # Refused actions change nothing and write nothing: a bad CSRF token, a template the worker cannot render
    again = service.test_client()
    sign_in(again, standin, ADMIN)
    before = audit.count(engine)
    assert again.post(f"/admin/events/{failed_event}/retry", data={"csrf_token": "forged"}).status_code == 400
    csrf = csrf_of(again.get("/admin/").get_data(as_text=True))
    assert again.post("/admin/templates/create_user", data={**form, "csrf_token": csrf, "body": "{usrid}",
                                                            "op": "save"}).status_code == 400
    assert audit.count(engine) == before


def test_the_audit_page_is_newest_first_and_filters_by_actor_and_action(service, standin):
    for n, (actor, action) in enumerate([("lisi", "retry"), ("cli", "import-addresses"), ("lisi", "template-save")]):
        audit.record(service.engine, actor, action, target=f"t{n}", detail="<b>markup</b>\r\ninjected")
    client = service.test_client()
    sign_in(client, standin, ADMIN)
    page = client.get("/admin/audit").get_data(as_text=True)
    assert page.index('data-action="template-save"') < page.index('data-action="import-addresses"') \
        < page.index('data-action="retry"')
    assert "<b>markup</b>" not in page and "&lt;b&gt;markup&lt;/b&gt;\\r\\ninjected" in page
    only = client.get("/admin/audit?actor=lisi&action=retry").get_data(as_text=True)
    assert only.count('data-actor="lisi"') == 1 and 'data-action="template-save"' not in only
    assert client.get("/admin/audit?actor=" + "x" * 5000 + "&limit=-3").status_code == 200
    # nothing in /admin edits or deletes it
    assert not [r for r in service.url_map.iter_rules() if r.rule.startswith("/admin/audit") and
                (r.methods - {"GET", "HEAD", "OPTIONS"})]


def test_cli_commands_that_change_something_write_a_row_and_audit_prints_them(service, failed_event, tmp_path):
    runner = service.test_cli_runner()
    result = runner.invoke(args=["retry", str(failed_event)])
    assert result.exit_code == 0, result.output
    book = tmp_path / "book.csv"
    book.write_text("userid,email\nzhangsan,zhangsan@corp.example\n", encoding="utf-8")
    assert runner.invoke(args=["import-addresses", str(book)]).exit_code == 0
    assert runner.invoke(args=["init-db", "--seed-templates"]).exit_code == 0  # rows exist: writes nothing
    rows = audit.entries(service.engine)
    assert [(r.actor, r.action) for r in rows] == [("cli", "import-addresses"), ("cli", "retry")]
    audit.record(service.engine, "lisi", "retry", detail="\x1b[31mred\x1b[0m\nsecond line")
    printed = runner.invoke(args=["audit", "--since", "2020-01-01"])
    assert printed.exit_code == 0, printed.output
    lines = printed.output.splitlines()
    assert len(lines) == 3 and "  cli  " in lines[0] and "  retry  " in lines[0]  # oldest first
    assert "\x1b" not in printed.output and "\\x1b[31mred\\x1b[0m\\nsecond line" in lines[2]
    assert "No audit entries since 2999-01-01." in runner.invoke(args=["audit", "--since", "2999-01-01"]).output
    bad = runner.invoke(args=["audit", "--since", "yesterday"])
    assert bad.exit_code != 0 and "is not a date" in bad.output
