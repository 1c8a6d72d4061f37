"""/admin for a team in a real browser (headless Chromium, as test_admin_browser.py): sign in through the WeCom
stand-in's QR page, edit a template with the server-rendered preview, save, roll back, send oneself a test,
and find all of it in the audit log."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

import config
import templates_repo
from devtools.ports import free_port
from store import db, schema, template_versions
from support.admin_team import ADMIN, team_env

from test_admin_browser import browser  # noqa: F401  (the fixture: Chromium, or a skip saying how to install it)

APP, TABLE = "tencent-wechat", "ipaas_email_template"


@pytest.fixture
def team_service(processes, service_env, standin):
    """gunicorn with WeCom sign-in on; the stand-in's sign-in pages on another site (localhost, not 127.0.0.1),
    as WeCom's are, so the browser's SameSite rules apply as they will in production."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    pages = standin.api_base.replace("127.0.0.1", "localhost").removesuffix("/cgi-bin/")
    env = {**service_env, **team_env(standin, public_url=base), "WORKER_IN_WEB": "true",
           "WECOM_QR_LOGIN_URL": pages + "/wwlogin/sso/login", "WECOM_OAUTH_URL": pages + "/connect/oauth2/authorize"}
    settings = config.from_env(env)
    engine = db.make_engine(settings.database_url)
    templates_repo.seed_templates(engine, TABLE, APP)
    processes.gunicorn(env, port=port)
    yield base, engine
    engine.dispose()


def test_sign_in_edit_preview_save_roll_back_test_send_and_audit(browser, team_service, standin,  # noqa: F811
                                                                  smtp_sink, tmp_path):
    from playwright.sync_api import expect

    base, engine = team_service
    standin.sign_in_as(ADMIN)
    context = browser.new_context(locale="zh-CN", viewport={"width": 390, "height": 844})  # a phone's width
    page = context.new_page()
    problems = []
    page.on("console", lambda message: problems.append(f"{message.text} at {message.location.get('url')}")
            if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        page.goto(f"{base}/admin/")
        page.get_by_role("link", name="企业微信登录 Sign in with WeCom").click()
        expect(page.get_by_text("扫码登录 stand-in")).to_be_visible()  # WeCom's QR page (the stand-in's)
        page.get_by_role("link", name="确认登录 Confirm").click()  # the phone confirms: back with a code
        expect(page.get_by_role("heading", name="事件 Events")).to_be_visible()
        expect(page.locator("#signed-in-as")).to_have_text(ADMIN)

        page.get_by_role("link", name="模板 Templates").click()
        page.locator("#template-create_user").get_by_role("link", name="编辑 Edit").click()
        expect(page.get_by_role("heading", name="编辑模板 Edit template: create_user")).to_be_visible()
        fits = "document.documentElement.scrollWidth <= window.innerWidth"  # nothing wider than the phone
        assert page.evaluate(fits), "the editor is wider than a phone's screen"
        page.get_by_label("正文 Body").fill("新成员 ID：{usrid}")
        page.get_by_role("button", name="预览 Preview").click()
        expect(page.locator(".preview-error")).to_contain_text("template placeholder {usrid} is not allowed")
        hostile = '<img src=x onerror="document.title=1">{name}<script>document.title=2</script>'
        page.get_by_label("标题 Title").fill(hostile)
        page.get_by_label("正文 Body").fill(hostile + "\n{__class__}")
        page.get_by_role("button", name="预览 Preview").click()
        expect(page.locator(".preview-error")).to_contain_text("template placeholder {__class__} is not allowed")
        expect(page.get_by_label("标题 Title")).to_have_value(hostile)  # shown as text, kept as typed
        assert page.locator("#editor img, #preview img, script").count() == 0  # no markup of ours ran
        assert page.title().startswith("编辑模板 Edit create_user")  # no handler or script changed it
        page.get_by_label("标题 Title").fill("新增成员")
        page.get_by_label("正文 Body").fill("新成员 ID：{userid}，时间 {createtime}")
        page.get_by_role("button", name="预览 Preview").click()
        expect(page.locator("#preview-body")).to_have_text("新成员 ID：zhangsan，时间 2023-11-15 06:13:20")

        page.get_by_role("button", name="保存 Save").click()
        expect(page.locator("#saved")).to_contain_text("Saved as version")
        assert templates_repo.load_template(engine, TABLE, APP, "create_user").body == "新成员 ID：{userid}，时间 {createtime}"
        original = template_versions.history(engine, APP, "create_user")[-1]
        page.get_by_role("button", name=f"恢复 Restore #{original.id}").click()
        expect(page.locator("#restored")).to_contain_text("Restored as version")
        assert templates_repo.load_template(engine, TABLE, APP, "create_user").body == original.body

        page.get_by_role("button", name="发送测试给我 Send me a test").click()
        expect(page.locator("#test-sent")).to_contain_text("user0002@corp.example")
        assert smtp_sink.wait_for(1, timeout=30), "the test mail did not arrive"
        [mail] = smtp_sink.messages
        assert mail["X-RcptTo"] == "user0002@corp.example" and mail["Subject"].startswith("[测试 Test] ")

        page.get_by_role("link", name="审计 Audit").click()
        rows = page.locator(f'#audit tr[data-actor="{ADMIN}"]')
        for action in ("sign-in", "template-save", "template-rollback", "template-test-send"):
            expect(rows.and_(page.locator(f'[data-action="{action}"]'))).to_have_count(1)
        page.screenshot(path=tmp_path / "admin-audit-phone.png", full_page=True)
        assert page.evaluate(fits), "the audit page is wider than a phone's screen"
        page.get_by_role("button", name="退出 Log out", exact=True).click()
        expect(page.get_by_role("heading", name="登录 Log in")).to_be_visible()
        page.goto(f"{base}/admin/audit")
        expect(page).to_have_url(f"{base}/admin/login?next=/admin/audit")  # signed out: the session is gone
        print(f"screenshots: {tmp_path}")
    finally:
        context.close()
    with engine.connect() as conn:
        actions = [r.action for r in conn.execute(sa.select(schema.audit_log).where(schema.audit_log.c.actor == ADMIN)
                                                   .order_by(schema.audit_log.c.id))]
    assert actions == ["sign-in", "template-save", "template-rollback", "template-test-send", "sign-out"]
    assert problems == []  # no script errors, nothing blocked by the Content-Security-Policy
