"""/admin/templates: the server-rendered preview says what the worker would record, what it could not render is
never saved, every save is a version (restorable), events record the version they were rendered from, a
test goes to oneself through the outbox, a read-only template database saves nothing, hostile input is harmless."""
from __future__ import annotations

import re
import uuid

import pytest
import sqlalchemy as sa

import templates_repo
from store import audit, schema, template_versions
from support.admin import post_login
from support import TEST_ADMIN_TOKEN, change_xml, signed_post
from support.admin_team import ADMIN, csrf_of, sign_in, team_env

APP = "tencent-wechat"
TABLE = "ipaas_email_template"


@pytest.fixture
def service_env(service_env, standin):
    return {**service_env, **team_env(standin), "ADMIN_TOKEN": TEST_ADMIN_TOKEN}


@pytest.fixture
def admin(service, standin):
    """A browser signed in with WeCom as ADMIN: (client, csrf token)."""
    client = service.test_client()
    assert sign_in(client, standin, ADMIN).status_code == 302
    return client, csrf_of(client.get("/admin/templates/create_user").get_data(as_text=True))


def stored(service, change_type="create_user"):
    return templates_repo.load_template(service.parts.template_engine, TABLE, APP, change_type)


def post(client, csrf, op, title="新增成员 {name}", body="新增时间：{createtime}\\n ID：{userid}", change_type="create_user",
         **extra):
    return client.post(f"/admin/templates/{change_type}", data={"csrf_token": csrf, "op": op, "title": title,
                                                                "body": body, **extra})


def test_the_list_flags_handled_change_types_without_a_row(service, admin):
    client, _ = admin
    with service.parts.template_engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {TABLE} WHERE change_type IN ('delete_user', 'digest')"))
    page = client.get("/admin/templates").get_data(as_text=True)
    assert 'id="missing-delete_user"' in page and 'id="missing-digest"' in page
    assert 'id="missing-create_user"' not in page and 'id="template-create_user"' in page
    assert client.get("/admin/templates/delete_user").status_code == 200  # a missing row can be created
    assert client.get("/admin/templates/no_such_type").status_code == 404
    assert client.get("/admin/templates/Bad%20Type").status_code == 404


@pytest.mark.parametrize("body,error", [
    ("ID：{usrid}", "template error: template placeholder {usrid} is not allowed"),
    ("{userid.__class__}", "template error: template placeholder {userid.__class__} is not allowed"),
    ("{a[0]}", "template error: template placeholder {a[0]} is not allowed"),
    ("{userid", "template error: template is malformed"),
])
def test_the_preview_shows_the_workers_error_and_such_a_template_cannot_be_saved(service, admin, body, error):
    client, csrf = admin
    before = stored(service)
    page = post(client, csrf, "preview", body=body)
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "渲染错误 Render error: " + error in text.replace("&#39;", "'")
    refused = post(client, csrf, "save", body=body)
    assert refused.status_code == 400 and error in refused.get_data(as_text=True).replace("&#39;", "'")
    assert stored(service) == before
    assert template_versions.history(service.engine, APP, "create_user") == []
    # the worker records the same words for the same template
    with pytest.raises(templates_repo.RenderError) as info:
        templates_repo.render(body, templates_repo.event_values(
            __import__("wecom").parse_event(change_xml("create_user", "u")), None))
    assert f"template error: {info.value}".startswith(error)


def test_a_save_is_a_version_the_next_event_is_rendered_from_it_and_a_restore_is_a_new_version(
        service, admin, smtp_sink, crypto, standin):
    client, csrf = admin
    original = stored(service)
    saved = post(client, csrf, "save", title="欢迎 {name}", body="{name} 加入了 joined\\n{createtime}")
    assert saved.status_code == 302 and "saved=" in saved.headers["Location"]
    assert stored(service) == templates_repo.EmailTemplate("欢迎 {name}", "{name} 加入了 joined\\n{createtime}")
    versions = template_versions.history(service.engine, APP, "create_user")
    assert [(v.action, v.saved_by) for v in versions] == [("save", ADMIN), ("original", "-")]
    assert (versions[1].title, versions[1].body) == (original.title, original.body)
    page = client.get(saved.headers["Location"]).get_data(as_text=True)
    assert f"Saved as version #{versions[0].id}" in page and f'id="version-{versions[1].id}"' in page

    service.drain()  # the member snapshot
    assert signed_post(service.test_client(), crypto, change_xml("create_user", "user0003")).data == b"success"
    service.drain()
    assert smtp_sink.wait_for(5)
    assert {m["Subject"] for m in smtp_sink.messages} == {"欢迎 赵敏"}
    with service.engine.connect() as conn:
        event = conn.execute(sa.select(schema.events).where(schema.events.c.source == "callback")).one()
    assert event.template_version == versions[0].id  # what people received, and from which version
    shown = client.get(f"/admin/events/{event.id}").get_data(as_text=True)
    assert re.search(rf'id="template-version"><a [^>]*>#{versions[0].id}</a>', shown)

    restored = client.post(f"/admin/templates/create_user/restore/{versions[1].id}", data={"csrf_token": csrf})
    assert restored.status_code == 302
    assert stored(service) == original
    newest = template_versions.history(service.engine, APP, "create_user")[0]
    assert (newest.action, newest.restored_from, newest.saved_by) == ("rollback", versions[1].id, ADMIN)
    assert client.post(f"/admin/templates/delete_user/restore/{versions[1].id}",
                       data={"csrf_token": csrf}).status_code == 404  # a version of another type


def test_the_preview_can_use_one_of_the_latest_real_events(service, admin, crypto):
    client, csrf = admin
    service.drain()
    assert signed_post(service.test_client(), crypto, change_xml("create_user", "user0004")).data == b"success"
    with service.engine.connect() as conn:
        event_id = conn.execute(sa.select(schema.events.c.id)).scalar_one()
    page = post(client, csrf, "preview", body="ID：{userid}", event=str(event_id)).get_data(as_text=True)
    assert f'<option value="{event_id}" selected>' in page
    assert re.search(r'id="preview-body">ID：user0004<', page)
    sample = post(client, csrf, "preview", body="ID：{userid}", event="sample").get_data(as_text=True)
    assert re.search(r'id="preview-body">ID：zhangsan<', sample)


def test_a_test_goes_to_the_signed_in_person_through_the_outbox_marked_as_a_test(service, admin, smtp_sink):
    client, csrf = admin
    service.drain()
    response = post(client, csrf, "test", title="试一下 {name}", body="ID：{userid}")
    assert response.status_code == 200
    assert "Test queued to user0002@corp.example" in response.get_data(as_text=True)
    assert stored(service).title != "试一下 {name}"  # a test saves nothing
    service.drain()
    assert smtp_sink.wait_for(1)
    [mail] = smtp_sink.messages
    assert mail["X-RcptTo"] == "user0002@corp.example" and mail["Subject"] == "[测试 Test] 试一下 张三"
    with service.engine.connect() as conn:
        event = conn.execute(sa.select(schema.events)).one()
    assert (event.source, event.status) == ("test", "done")
    assert 'class="badge source-test"' in client.get("/admin/").get_data(as_text=True)
    status = service.test_cli_runner().invoke(args=["status"]).output
    assert "(source: test)" in status
    [row] = audit.entries(service.engine, action="template-test-send")
    assert row.actor == ADMIN and "user0002@corp.example" in row.detail
    # a token session has no address of its own
    token = service.test_client()
    post_login(token, TEST_ADMIN_TOKEN)
    refused = post(token, csrf_of(token.get("/admin/").get_data(as_text=True)), "test")
    assert refused.status_code == 400 and "sign in with WeCom" in refused.get_data(as_text=True)


HOSTILE = [
    {"title": "<script>alert(1)</script>{name}", "body": "<img src=x onerror=alert(1)>{userid}"},
    {"title": "a\r\nBcc: victim@corp.example", "body": "ok"},
    {"title": "t", "body": "x" * 100_000},
    {"title": "t", "body": "{__class__}"},
    {"title": "{userid.__class__.__mro__}", "body": "b"},
    {"title": "t", "body": "{0}{}"},
    {"title": "t", "body": "{userid!r}"},
    {"title": "t", "body": "{userid:>99999999}"},
    {"title": "t", "body": "nul\x00byte"},
    {"title": "t" * 300, "body": "b"},
    {"title": "</textarea><script>x()</script>", "body": "</textarea></pre><script>x()</script>{name}"},
    {"title": "t", "body": "b", "event": "<script>", "op": "save"},
    {"title": "t", "body": "b", "op": "<b>drop</b>"},
]


@pytest.mark.parametrize("fields", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_input_in_every_field_is_harmless(service, admin, fields):
    client, csrf = admin
    for op in ("preview", "save", "test"):
        data = {"csrf_token": csrf, "op": op, "event": "sample", **fields}
        response = client.post("/admin/templates/create_user", data=data)
        assert response.status_code < 500, (op, response.status_code)
        page = response.get_data(as_text=True)
        assert "<script>" not in page and "<img src=x" not in page
        row = stored(service)  # whatever was saved, the worker renders
        templates_repo.render_email(row, __import__("wecom").parse_event(change_xml("create_user", "u")), None)
        assert "\r" not in row.title and "\n" not in row.title and len(row.body.encode()) <= 60_000
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    before = stored(service)
    for token in ("", "forged"):  # every form is CSRF-checked
        assert post(client, token, "save", title="CSRF {name}").status_code == 400
    assert stored(service) == before
    assert client.post("/admin/templates/create_user/restore/99999999999999999999",
                       data={"csrf_token": csrf}).status_code == 404
    assert client.get("/admin/login/wecom/callback?state=" + "A" * 5000 + "&code=" + "c" * 5000).status_code == 400


def test_a_read_only_template_database_is_explained_and_nothing_is_saved(mysql_server_url, standin, smtp_sink,
                                                                         tmp_path):
    import app as app_module
    from support import base_env

    name, user, password = "wmtest_" + uuid.uuid4().hex[:12], "wm_ro_" + uuid.uuid4().hex[:8], "ro-" + uuid.uuid4().hex
    root = sa.create_engine(mysql_server_url)
    with root.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
        conn.execute(sa.text(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'"))
        conn.execute(sa.text(f"CREATE USER '{user}'@'localhost' IDENTIFIED BY '{password}'"))
        conn.execute(sa.text(f"GRANT SELECT ON `{name}`.* TO '{user}'@'127.0.0.1'"))
        conn.execute(sa.text(f"GRANT SELECT ON `{name}`.* TO '{user}'@'localhost'"))
    base = sa.engine.make_url(mysql_server_url)
    state_url = base.set(database=name).render_as_string(hide_password=False)
    read_only = base.set(database=name, username=user, password=password, host="127.0.0.1").render_as_string(
        hide_password=False)
    try:
        templates_repo.seed_templates(sa.create_engine(state_url), TABLE, APP)
        env = base_env(WECOM_API_BASE=standin.api_base, DATABASE_URL=state_url, TEMPLATE_DATABASE_URL=read_only,
                       MAIL_BACKEND="smtp", SMTP_HOST="127.0.0.1", SMTP_PORT=smtp_sink.port, SMTP_SECURITY="none",
                       **team_env(standin))
        flask_app = app_module.create_app(env)
        client = flask_app.test_client()
        assert sign_in(client, standin, ADMIN).status_code == 302
        page = client.get("/admin/templates/create_user").get_data(as_text=True)
        assert 'id="read-only"' in page and "模板数据库只读" in page and "1142" in page
        assert "UPDATE ipaas_email_template SET email_title = " in page
        csrf = csrf_of(page)
        before = audit.count(sa.create_engine(state_url))
        response = post(client, csrf, "save", title="新标题 {name}", body="it's {userid}\\n")
        assert response.status_code == 403
        text = response.get_data(as_text=True)
        assert "nothing was saved" in text
        assert "UPDATE ipaas_email_template SET email_title = &#39;新标题 {name}&#39;" in text
        assert "email_body = &#39;it&#39;&#39;s {userid}\\\\n&#39;" in text  # quotes doubled, backslash escaped
        assert password not in text
        state = sa.create_engine(state_url)
        assert templates_repo.load_template(state, TABLE, APP, "create_user").title == "新增成员"
        assert template_versions.history(state, APP, "create_user") == []
        assert audit.count(state) == before
    finally:
        with root.begin() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'127.0.0.1'"))
            conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'localhost'"))
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        root.dispose()


def test_the_digest_template_is_previewed_with_its_own_placeholders(service, admin):
    client, csrf = admin
    page = post(client, csrf, "preview", change_type="digest", title="{count} 项变更 changes",
                body="{first_time} – {last_time}\\n{changes}").get_data(as_text=True)
    assert re.search(r'id="preview-subject">2 项变更 changes<', page)
    assert "新增成员" in page and "更新成员" in page  # each change rendered by its own stored template
    wrong = post(client, csrf, "save", change_type="digest", title="{count}", body="{userid}")
    assert wrong.status_code == 400 and "template placeholder {userid} is not allowed" in wrong.get_data(as_text=True)
