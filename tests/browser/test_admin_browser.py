"""/admin in a real browser: headless Chromium (Debian's) driven by Playwright, against a real gunicorn."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
import sqlalchemy as sa

import config
from store import db, schema
import templates_repo
import wecom
from support import DEPARTMENT, TEST_CORP_ID, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TOKEN = "browser-admin-token-0123456789abcdef"
REJECTED = "user0003@corp.example"


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is missing (pip install -r requirements-dev.txt)"
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; skipped where it is absent unless REQUIRE_BROWSER=1 (CI), which fails instead."""
    missing = _missing()
    if missing:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(f"browser tests skipped: {missing} (set REQUIRE_BROWSER=1 to make this a failure)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def failed_event(processes, service_env, smtp_sink, crypto):
    """A real gunicorn with /admin on and one create_user event whose mail to user0003 failed with 550.

    The SMTP sink accepts user0003 again afterwards, so a retry can succeed.
    Returns (base URL, event id, delivery id, state engine).
    """
    env = {**service_env, "ADMIN_TOKEN": TOKEN, "WORKER_IN_WEB": "true"}
    settings = config.from_env(env)
    engine = db.make_engine(settings.database_url)
    templates_repo.seed_templates(engine, settings.template_table, settings.template_app)
    smtp_sink.reject(REJECTED, "550 5.6.0 message refused")  # 5.1.1 would bounce and suppress it
    _, base = processes.gunicorn(env)
    xml = wecom.event_xml("create_user", "user0003", TEST_CORP_ID, str(DEPARTMENT), create_time=1700000000)
    packet = crypto.encrypt(xml)
    answer = requests.post(f"{base}/wecom/callback?{urlencode(packet['query'])}", data=packet["body"],
                           headers={"Content-Type": "text/xml"}, timeout=10)
    assert answer.text == "success"

    def failed_row():
        with engine.connect() as conn:
            return conn.execute(sa.select(schema.deliveries)
                                .where(schema.deliveries.c.address == REJECTED,
                                       schema.deliveries.c.status == "failed")).first()
    row = wait_until(failed_row, timeout=30)
    assert row is not None, "the in-process worker did not record the 550 failure"
    assert smtp_sink.wait_for(4)  # the other four members got theirs
    smtp_sink.reject(REJECTED, "")  # an empty reply: accepted from now on
    yield base, row.event_id, row.id, engine
    engine.dispose()


def test_log_in_see_the_failed_delivery_retry_it_and_see_it_sent(browser, failed_event, smtp_sink, tmp_path):
    from playwright.sync_api import expect

    base, event_id, delivery_id, engine = failed_event
    context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        page.goto(f"{base}/admin/")
        expect(page).to_have_url(f"{base}/admin/login?next=/admin/")

        page.get_by_label("管理令牌 Admin token").fill("not-the-token")
        page.get_by_role("button", name="登录 Log in").click()
        expect(page.get_by_role("alert")).to_have_text("令牌不正确 Wrong token")
        problems.clear()  # Chromium logs the 403 of the refused login as a console error

        page.get_by_label("管理令牌 Admin token").fill(TOKEN)
        page.get_by_role("button", name="登录 Log in").click()
        expect(page.get_by_role("heading", name="事件 Events")).to_be_visible()
        event_row = page.locator(f"#event-{event_id}")
        expect(event_row).to_contain_text("create_user")
        expect(event_row).to_contain_text("user0003")
        expect(event_row).to_contain_text("失败 failed 1")

        event_row.get_by_role("link", name=f"#{event_id}").click()
        expect(page.get_by_role("heading", name=f"事件 Event #{event_id}")).to_be_visible()
        delivery_row = page.locator(f"#delivery-{delivery_id}")
        expect(delivery_row).to_have_attribute("data-status", "failed")
        expect(delivery_row).to_contain_text(REJECTED)
        expect(delivery_row).to_contain_text("550 5.6.0 message refused")
        page.screenshot(path=tmp_path / "admin-event-failed.png", full_page=True)

        page.get_by_role("button", name="重试 Retry").click()
        expect(page.get_by_role("status")).to_contain_text("已重新排队 Requeued: 0 个事件 event(s), 1 个投递")
        # The in-process worker of gunicorn sends it; the page refreshes itself while a delivery is due.
        expect(delivery_row).to_have_attribute("data-status", "sent", timeout=30_000)
        expect(delivery_row).to_contain_text("已发送 sent")
        expect(page.locator("#event-status")).to_have_text("完成 done", timeout=10_000)
        screenshot = tmp_path / "admin-event-sent.png"
        page.screenshot(path=screenshot, full_page=True)
        print(f"screenshots: {tmp_path}")
    finally:
        context.close()

    assert smtp_sink.wait_for(5)
    assert [m["X-RcptTo"] for m in smtp_sink.messages].count(REJECTED) == 1
    with engine.connect() as conn:
        status = conn.execute(sa.select(schema.deliveries.c.status)
                              .where(schema.deliveries.c.id == delivery_id)).scalar_one()
    assert status == "sent"
    assert problems == []  # no script errors, nothing blocked by the Content-Security-Policy
