"""/admin sign-in with WeCom against the stand-in's QR/OAuth2 pages and auth/getuserinfo: who may sign in, the
state's rules (single use, this browser only), a fresh session, sign-out, and the name on every page."""
from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from store import audit, schema
from support.admin import post_login
from support import DEPARTMENT, TEST_ADMIN_TOKEN, TEST_CORP_ID, change_xml, signed_post
from support.admin_team import ADMIN, AGENT_ID, csrf_of, scan, sign_in, start_sign_in, team_env


@pytest.fixture
def service_env(service_env, standin):
    """The complete service with WeCom sign-in on (and the break-glass token beside it)."""
    return {**service_env, **team_env(standin), "ADMIN_TOKEN": TEST_ADMIN_TOKEN}


def signed_in_as(client) -> str | None:
    match = re.search(r'id="signed-in-as"[^>]*>([^<]*)<', client.get("/admin/").get_data(as_text=True))
    return match.group(1) if match else None


def entries(service, **filters):
    return audit.entries(service.engine, **filters)


def test_the_login_page_offers_both_ways_in(service):
    page = service.test_client().get("/admin/login").get_data(as_text=True)
    assert 'href="/admin/login/wecom"' in page and "企业微信登录 Sign in with WeCom" in page
    assert 'name="token"' in page


def test_qr_login_outside_wecom_and_oauth2_inside_it(service, standin):
    client = service.test_client()
    location, query = start_sign_in(client)
    assert location.startswith(standin.api_base.removesuffix("cgi-bin/") + "wwlogin/sso/login?")
    assert query["login_type"] == "CorpApp" and query["appid"] == TEST_CORP_ID and query["agentid"] == AGENT_ID
    assert query["redirect_uri"] == "http://127.0.0.1/admin/login/wecom/callback"
    assert re.fullmatch(r"[A-Za-z0-9]{1,128}", query["state"])
    inside = client.get("/admin/login/wecom", headers={"User-Agent": "Mozilla/5.0 wxwork/4.1.22 MicroMessenger/7.0.1"})
    target = inside.headers["Location"]
    assert target.startswith(standin.api_base.removesuffix("cgi-bin/") + "connect/oauth2/authorize?")
    assert target.endswith("#wechat_redirect") and "scope=snsapi_base" in target and "response_type=code" in target
    assert f"agentid={AGENT_ID}" in target
    # the stand-in's OAuth2 page answers 302 straight back to the callback with a code and the state
    import requests
    back = requests.get(target.split("#")[0], allow_redirects=False, timeout=10)
    assert back.status_code == 302 and back.headers["Location"].startswith(query["redirect_uri"] + "?code=")


def test_an_allow_listed_userid_signs_in_and_is_named_on_every_page_and_in_the_audit_of_a_retry(service, standin,
                                                                                                  smtp_sink, crypto):
    smtp_sink.reject("user0003@corp.example", "550 5.6.0 message refused")  # failed, not a bounce
    assert signed_post(service.test_client(), crypto, change_xml("create_user", "user0003")).data == b"success"
    service.drain()
    smtp_sink.reject("user0003@corp.example", "")
    with service.engine.connect() as conn:
        event_id = conn.execute(sa.select(schema.events.c.id)).scalar_one()
    client = service.test_client()
    response = sign_in(client, standin, ADMIN)
    assert response.status_code == 302 and urlsplit(response.headers["Location"]).path == "/admin/"
    for path in ("/admin/", f"/admin/events/{event_id}", "/admin/templates", "/admin/templates/create_user",
                 "/admin/addresses", "/admin/audit"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert re.search(rf'id="signed-in-as"[^>]*>{ADMIN}<', page.get_data(as_text=True)), path
    csrf = csrf_of(client.get("/admin/").get_data(as_text=True))
    assert client.post(f"/admin/events/{event_id}/retry", data={"csrf_token": csrf}).status_code == 302
    [retry] = entries(service, action="retry")
    assert (retry.actor, retry.target, retry.client) == (ADMIN, f"event {event_id}", "127.0.0.1")
    [signed] = entries(service, action="sign-in")
    assert (signed.actor, signed.detail) == (ADMIN, "WeCom")
    assert client.get("/admin/audit").get_data(as_text=True).count(f'data-actor="{ADMIN}"') == 2


@pytest.mark.parametrize("identity,actor,why", [
    ({"userid": "user0005"}, "user0005", "not in ADMIN_USERIDS"),  # a member, but not an admin
    ({"openid": "oAbCdEf-outsider"}, "openid:oAbCdEf-outsider", "not a member of the corp"),
])
def test_anyone_else_gets_403_and_an_audit_row(service, standin, identity, actor, why):
    client = service.test_client()
    response = sign_in(client, standin, **identity)
    assert response.status_code == 403
    assert "may not sign in" in response.get_data(as_text=True)
    [refused] = entries(service, action="sign-in-refused")
    assert (refused.actor, refused.detail) == (actor, why)
    assert client.get("/admin/").status_code == 302  # still not signed in
    with service.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.admin_sessions)).scalar_one() == 0


def test_a_replayed_a_missing_and_a_foreign_state_get_400(service, standin):
    client = service.test_client()
    standin.sign_in_as(ADMIN)
    location, query = start_sign_in(client)
    callback = scan(location)
    assert client.get(callback).status_code == 302
    other = service.test_client()  # the same URL in another browser, and the first one again
    assert other.get(callback).status_code == 400
    assert client.get(callback).status_code == 400  # replayed: the state was used up
    assert client.get("/admin/login/wecom/callback?code=abc").status_code == 400  # no state
    # a state handed to this browser, completed in another one: refused, and spent
    location, query = start_sign_in(client)
    stolen = scan(location)
    assert other.get(stolen).status_code == 400
    assert client.get(stolen).status_code == 400
    assert signed_in_as(other) is None


def test_a_code_from_another_sign_in_is_refused(service, standin):
    client = service.test_client()
    standin.sign_in_as(ADMIN)
    first = scan(start_sign_in(client)[0])
    assert client.get(first).status_code == 302
    used_code = re.search(r"code=([^&]+)", first).group(1)
    _, query = start_sign_in(client)  # a new sign-in with a fresh state, but the old (spent) code
    response = client.get(f"/admin/login/wecom/callback?code={used_code}&state={query['state']}")
    assert response.status_code == 400
    assert "WeCom refused the code" in response.get_data(as_text=True)


def test_the_code_is_never_logged(service, standin, caplog):
    caplog.set_level(logging.DEBUG)
    client = service.test_client()
    standin.sign_in_as("user0005")
    callback = scan(start_sign_in(client)[0])
    code = re.search(r"code=([^&]+)", callback).group(1)
    assert client.get(callback).status_code == 403
    assert client.get(callback).status_code == 400
    assert code not in caplog.text and "user0005" in caplog.text


def test_signing_in_again_starts_a_fresh_session_and_sign_out_revokes_it(service, standin):
    client = service.test_client()
    assert sign_in(client, standin, ADMIN).status_code == 302
    first_cookie = client.get_cookie("wecom_mailer_admin", path="/").value
    assert sign_in(client, standin, ADMIN).status_code == 302
    second_cookie = client.get_cookie("wecom_mailer_admin", path="/").value
    assert second_cookie != first_cookie
    stale = service.test_client()
    stale.set_cookie("wecom_mailer_admin", first_cookie, path="/")
    assert stale.get("/admin/").status_code == 302  # the old session id was revoked
    csrf = csrf_of(client.get("/admin/").get_data(as_text=True))
    assert client.post("/admin/logout", data={"csrf_token": csrf}).status_code == 302
    kept = service.test_client()
    kept.set_cookie("wecom_mailer_admin", second_cookie, path="/")
    assert kept.get("/admin/").status_code == 302  # a copy of the cookie is refused after sign-out
    [out] = entries(service, action="sign-out")
    assert out.actor == ADMIN


def test_a_token_session_is_named_token(service):
    client = service.test_client()
    assert post_login(client, TEST_ADMIN_TOKEN).status_code == 302
    assert signed_in_as(client) == "令牌 ADMIN_TOKEN"
    [signed] = entries(service, action="sign-in")
    assert signed.actor == audit.TOKEN


def test_wecom_sign_in_alone_mounts_admin(make_app, standin):
    app = make_app(**team_env(standin))
    client = app.test_client()
    assert client.get("/admin/login").status_code == 200
    assert 'name="token"' not in client.get("/admin/login").get_data(as_text=True)
    assert client.post("/admin/login", data={"token": "x" * 40}).status_code in (400, 404)  # no token to compare
    assert make_app().test_client().get("/admin/login/wecom").status_code == 404  # neither configured


def test_without_admin_userids_the_wecom_routes_are_404(make_app):
    client = make_app(ADMIN_TOKEN=TEST_ADMIN_TOKEN).test_client()
    assert client.get("/admin/login/wecom").status_code == 404
    assert client.get("/admin/login/wecom/callback?code=a&state=b").status_code == 404
    assert DEPARTMENT  # (the test corp is the same as everywhere)
