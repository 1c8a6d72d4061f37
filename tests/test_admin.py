"""/admin: login cookie, CSRF on every action, events and retries, template preview, address book import."""
from __future__ import annotations

import io
import re

import pytest
import sqlalchemy as sa

import services
from store import schema
import templates_repo
import wecom
from support import DEPARTMENT, TEST_CORP_ID, event_rows, rows, signed_post

TOKEN = "admin-token-for-tests-0123456789abcdef"
CREATED_AT = 1700000000  # 2023-11-15 06:13:20 in Asia/Shanghai


@pytest.fixture
def service_env(service_env):
    """The complete service of conftest, with /admin switched on."""
    return {**service_env, "ADMIN_TOKEN": TOKEN}


@pytest.fixture
def admin_app(make_app):
    return make_app(ADMIN_TOKEN=TOKEN)


def log_in(client) -> str:
    """Log in with the right token; return the CSRF token of the new session."""
    response = client.post("/admin/login", data={"token": TOKEN})
    assert response.status_code == 302
    return csrf_of(client.get("/admin/"))


def csrf_of(response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', response.get_data(as_text=True))
    assert match, "page has no CSRF token"
    return match.group(1)


def change(change_type="create_user", userid="user0003"):
    return wecom.event_xml(change_type, userid, TEST_CORP_ID, str(DEPARTMENT), create_time=CREATED_AT)


def delivery(engine, address):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.deliveries).where(schema.deliveries.c.address == address)).one()


@pytest.fixture
def failed_delivery(service, smtp_sink, crypto):
    """One create_user event whose delivery to user0003 failed with 550; the sink accepts it from now on."""
    # Not 5.1.1: a refusal saying the mailbox does not exist bounces and suppresses it (issue 20).
    smtp_sink.reject("user0003@corp.example", "550 5.6.0 message refused")
    assert signed_post(service.test_client(), crypto, change()).data == b"success"
    service.drain()
    smtp_sink.reject("user0003@corp.example", "")  # an empty reply: accepted again
    row = delivery(service.engine, "user0003@corp.example")
    assert row.status == "failed" and row.reason.startswith("550")
    return row


# --- access ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/login", "/admin/templates", "/admin/events/1"])
def test_without_admin_token_every_admin_url_is_404(make_app, path):
    client = make_app().test_client()
    assert client.get(path).status_code == 404
    assert client.post(path, data={"token": ""}).status_code == 404


@pytest.mark.parametrize("path", ["/admin/", "/admin/templates", "/admin/addresses", "/admin/events/1"])
def test_pages_redirect_to_login_without_the_cookie(admin_app, path):
    response = admin_app.test_client().get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/admin/login?next=")


def test_wrong_token_is_refused_and_sets_no_cookie(admin_app):
    client = admin_app.test_client()
    for token in ("wrong", "", TOKEN[:-1], TOKEN + "x", "令牌"):
        response = client.post("/admin/login", data={"token": token})
        assert response.status_code == 403
        assert "令牌不正确 Wrong token" in response.get_data(as_text=True)
        assert not response.headers.getlist("Set-Cookie")
    assert client.get("/admin/").status_code == 302


def test_login_sets_a_signed_httponly_samesite_strict_secure_cookie(admin_app):
    client = admin_app.test_client()
    response = client.post("/admin/login", data={"token": TOKEN, "next": "/admin/templates"})
    assert response.status_code == 302 and response.headers["Location"] == "/admin/templates"
    [cookie] = response.headers.getlist("Set-Cookie")
    attributes = [part.strip() for part in cookie.split(";")]
    assert "HttpOnly" in attributes and "SameSite=Strict" in attributes and "Path=/admin" in attributes
    assert "Max-Age=43200" in attributes
    assert "Secure" in attributes  # by default, whatever a proxy says or does not say
    assert TOKEN not in cookie
    assert client.get("/admin/").status_code == 200


def test_admin_cookie_secure_false_is_for_plain_http_on_this_machine(make_app):
    client = make_app(ADMIN_TOKEN=TOKEN, ADMIN_COOKIE_SECURE="false").test_client()
    response = client.post("/admin/login", data={"token": TOKEN})
    assert "Secure" not in [part.strip() for part in response.headers["Set-Cookie"].split(";")]
    assert client.get("/admin/").status_code == 200


def test_forged_or_expired_cookie_is_not_a_session(admin_app, monkeypatch):
    from ops.admin import sessions

    client = admin_app.test_client()
    log_in(client)
    good = client.get_cookie(sessions.COOKIE, path="/admin").value
    client.set_cookie(sessions.COOKIE, good[:-2] + ("AA" if not good.endswith("AA") else "BB"), path="/admin")
    assert client.get("/admin/").status_code == 302
    client.set_cookie(sessions.COOKIE, good, path="/admin")
    assert client.get("/admin/").status_code == 200
    monkeypatch.setattr(sessions, "SESSION_SECONDS", -1)  # every signature is now too old
    assert client.get("/admin/").status_code == 302


def test_login_never_redirects_off_site(admin_app):
    client = admin_app.test_client()
    for target in ("https://evil.example/", "//evil.example/admin/", "/healthz", "/admin\\..\\x"):
        response = client.post("/admin/login", data={"token": TOKEN, "next": target})
        assert response.headers["Location"] == "/admin/"


def test_logout_ends_the_session(admin_app):
    client = admin_app.test_client()
    csrf = log_in(client)
    assert client.post("/admin/logout").status_code == 400  # without CSRF: refused
    response = client.post("/admin/logout", data={"csrf_token": csrf})
    assert response.status_code == 302
    assert client.get("/admin/").status_code == 302


def test_pages_carry_no_secrets_and_forbid_scripts(admin_app):
    client = admin_app.test_client()
    login_page = client.get("/admin/login")
    log_in(client)
    settings = services.of(admin_app).settings
    for response in [login_page] + [client.get(p) for p in ("/admin/", "/admin/templates", "/admin/addresses")]:
        assert response.status_code == 200
        body = response.get_data(as_text=True)
        for secret in settings.secrets():
            assert secret not in body
        assert "<script" not in body
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["Cache-Control"] == "no-store"


# --- events and retries ------------------------------------------------------------------------

def test_events_list_shows_counts_and_filters_by_status(service, failed_delivery, crypto):
    client = service.test_client()
    log_in(client)
    signed_post(client, crypto, change("update_user", "user0001"))
    service.drain()
    page = client.get("/admin/").get_data(as_text=True)
    assert "失败 failed 1" in page and "已发送 sent 9" in page  # totals: 4 + 5 sent, 1 failed
    assert page.count('<tr id="event-') == 2
    failed_only = client.get("/admin/?delivery=failed").get_data(as_text=True)
    assert failed_only.count('<tr id="event-') == 1 and f'id="event-{failed_delivery.event_id}"' in failed_only
    assert client.get("/admin/?status=ignored").get_data(as_text=True).count('<tr id="event-') == 0


def test_event_page_shows_deliveries_with_reasons(service, failed_delivery):
    client = service.test_client()
    log_in(client)
    page = client.get(f"/admin/events/{failed_delivery.event_id}").get_data(as_text=True)
    row = re.search(rf'<tr id="delivery-{failed_delivery.id}" data-status="failed">.*?</tr>', page, re.S).group(0)
    assert "user0003@corp.example" in row and "550 5.6.0 message refused" in row and "失败 failed" in row
    assert "新增成员 ID：user0003" in page  # the message itself
    assert "重试 Retry" in page


def test_retry_without_csrf_is_refused_and_requeues_nothing(service, failed_delivery):
    client = service.test_client()
    log_in(client)
    url = f"/admin/events/{failed_delivery.event_id}/retry"
    for form in ({}, {"csrf_token": ""}, {"csrf_token": "forged"}):
        assert client.post(url, data=form).status_code == 400
    assert client.post("/admin/retry-failed").status_code == 400
    row = delivery(service.engine, "user0003@corp.example")
    assert (row.status, row.attempts, row.reason) == ("failed", 1, failed_delivery.reason)


def test_retry_with_csrf_requeues_the_failed_delivery_and_it_is_sent(service, failed_delivery, smtp_sink):
    client = service.test_client()
    csrf = log_in(client)
    response = client.post(f"/admin/events/{failed_delivery.event_id}/retry", data={"csrf_token": csrf})
    assert response.status_code == 302
    row = delivery(service.engine, "user0003@corp.example")
    assert (row.status, row.attempts) == ("retry", 0)
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "已重新排队 Requeued: 0 个事件 event(s), 1 个投递 delivery(ies)" in page
    service.drain()
    assert delivery(service.engine, "user0003@corp.example").status == "sent"
    assert "user0003@corp.example" in {m["X-RcptTo"] for m in smtp_sink.messages}


def test_retry_all_failed_resends_the_failed_deliveries_of_every_event(service, smtp_sink, crypto):
    refused = {"create_user": "user0003@corp.example", "update_user": "user0004@corp.example"}
    for change_type, address in refused.items():  # two events, each with one delivery refused for good
        smtp_sink.reject(address, "550 5.6.0 message refused")
        assert signed_post(service.test_client(), crypto, change(change_type)).data == b"success"
        service.drain()
        smtp_sink.reject(address, "")  # an empty reply: accepted again
    failed = rows(service.engine, schema.deliveries, schema.deliveries.c.status == "failed")
    assert sorted((d.event_id, d.address) for d in failed) == [(1, refused["create_user"]),
                                                              (2, refused["update_user"])]
    before = len(smtp_sink.messages)
    assert before == 8

    client = service.test_client()
    csrf = log_in(client)
    response = client.post("/admin/retry-failed", data={"csrf_token": csrf})
    assert response.status_code == 302
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "已重新排队 Requeued: 0 个事件 event(s), 2 个投递 delivery(ies)" in page
    service.drain()

    resent = sorted((m["X-RcptTo"], m["Subject"]) for m in smtp_sink.messages[before:])
    assert resent == [("user0003@corp.example", "新增成员"), ("user0004@corp.example", "更新成员")]
    again = rows(service.engine, schema.deliveries, schema.deliveries.c.id.in_([d.id for d in failed]))
    assert [d.status for d in again] == ["sent", "sent"]
    assert [e.status for e in event_rows(service.engine)] == ["done", "done"]


def test_a_session_csrf_token_is_no_good_in_another_session(admin_app):
    first, second = admin_app.test_client(), admin_app.test_client()
    csrf = log_in(first)
    log_in(second)
    assert second.post("/admin/retry-failed", data={"csrf_token": csrf}).status_code == 400


def test_event_fields_are_html_escaped(admin_app, crypto):
    client = admin_app.test_client()
    attack = "<script>alert(1)</script>"
    assert signed_post(client, crypto, change(userid=attack)).data == b"success"
    log_in(client)
    for path in ("/admin/", "/admin/events/1"):
        page = client.get(path).get_data(as_text=True)
        assert attack not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_unknown_event_is_404(admin_app):
    client = admin_app.test_client()
    log_in(client)
    assert client.get("/admin/events/999").status_code == 404


# --- templates ---------------------------------------------------------------------------------

def _template_engine(app):
    return services.of(app).template_engine


def test_template_preview_renders_the_original_rows(admin_app):
    settings = services.of(admin_app).settings
    templates_repo.seed_templates(_template_engine(admin_app), settings.template_table, settings.template_app)
    client = admin_app.test_client()
    log_in(client)
    page = client.get("/admin/templates").get_data(as_text=True)
    for change_type, title, _ in templates_repo.ORIGINAL_ROWS:
        assert f'id="template-{change_type}"' in page and title in page
    assert "新增时间：2023-11-15 06:13:20\n 新增成员 ID：zhangsan" in page  # the stored \n is a line break
    assert "删除时间：2023-11-15 06:13:20\n 删除成员 ID：zhangsan" in page
    assert "新增时间：{createtime}\\n 新增成员 ID：{userid}" in page  # and the row as stored


def test_template_render_error_is_shown_not_a_500(admin_app):
    settings = services.of(admin_app).settings
    engine = _template_engine(admin_app)
    templates_repo.seed_templates(engine, settings.template_table, settings.template_app)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {settings.template_table} SET email_body = :body "
                             "WHERE change_type = 'update_user'"), {"body": "{userid.__class__} <b>{"})
    client = admin_app.test_client()
    log_in(client)
    response = client.get("/admin/templates")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "渲染错误 Render error: template is malformed" in page
    assert "<b>" not in page and "&lt;b&gt;" in page
    assert "新增成员 ID：zhangsan" in page  # the other rows still render


def test_missing_template_table_is_explained(admin_app):
    client = admin_app.test_client()
    log_in(client)
    response = client.get("/admin/templates")
    assert response.status_code == 200
    assert "无法读取模板表 Cannot read the template table" in response.get_data(as_text=True)


# --- address book ------------------------------------------------------------------------------

def upload(client, csrf, data: bytes, name="通讯录.csv"):
    return client.post("/admin/addresses/import", data={"csrf_token": csrf, "file": (io.BytesIO(data), name)},
                       content_type="multipart/form-data")


def test_csv_upload_shows_counts_and_the_rows(admin_app):
    client = admin_app.test_client()
    csrf = log_in(client)
    first = upload(client, csrf, "帐号,邮箱\nzhangsan,zhangsan@corp.example\nlisi,lisi@corp.example\n"
                                 "wangwu,not-an-address\n".encode("utf-8"))
    assert first.status_code == 200
    page = first.get_data(as_text=True)
    assert re.search(r"新增 added <strong>2</strong> · 更新 updated <strong>0</strong>\s*"
                     r"· 拒绝 rejected <strong>1</strong>", page)
    assert "line 4: &#39;not-an-address&#39; is not an email address" in page
    second = upload(client, csrf, b"userid,email\nzhangsan,zs@corp.example\nlisi,lisi@corp.example\n")
    assert re.search(r"新增 added <strong>0</strong> · 更新 updated <strong>1</strong>",
                     second.get_data(as_text=True))
    listing = client.get("/admin/addresses").get_data(as_text=True)
    assert "zs@corp.example" in listing and "lisi@corp.example" in listing and "显示 Showing 2 / 2" in listing
    found = client.get("/admin/addresses?q=LIS").get_data(as_text=True)
    assert "lisi@corp.example" in found and "zs@corp.example" not in found


def test_csv_upload_needs_csrf_and_a_readable_file(admin_app):
    client = admin_app.test_client()
    csrf = log_in(client)
    response = client.post("/admin/addresses/import", data={"file": (io.BytesIO(b"userid,email\na,a@b.cn\n"), "a.csv")},
                           content_type="multipart/form-data")
    assert response.status_code == 400
    assert "a@b.cn" not in client.get("/admin/addresses").get_data(as_text=True)
    bad = upload(client, csrf, b"name,phone\nx,1\n", name="book.csv")
    assert bad.status_code == 400
    page = bad.get_data(as_text=True)
    assert "book.csv has no userid and email columns" in page and "upload.csv" not in page
    assert upload(client, csrf, b"", name="").status_code == 400


def test_held_deliveries_show_when_their_digest_goes(department, poster):
    from support.digests import T0, Clock, digest_worker

    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    poster("first")
    department.drain(worker)
    poster("held1", "update_user", n=1)
    department.drain(worker)
    client = department.test_client()
    log_in(client)
    page = client.get("/admin/").get_data(as_text=True)
    assert "待汇总 held" in page and "10 deliveries held for 10 recipient(s); the next digest at 2024-03-05 10:01:00" in page
    held_event = [e for e in schema_rows(department.engine) if e.user_id == "held1"][0]
    page = client.get(f"/admin/events/{held_event.id}").get_data(as_text=True)
    assert "10 个待汇总 held for digest until 2024-03-05 10:01:00" in page
    assert page.count("<td>held for digest until 2024-03-05 10:01:00</td>") == 10
    assert client.get("/admin/?status=held").get_data(as_text=True).count('id="event-') == 1


def schema_rows(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.events).order_by(schema.events.c.id)).all()
