"""/admin for a team in tests: the WeCom sign-in settings against the stand-in, and signing in through its pages."""
from __future__ import annotations

import html
import re
from urllib.parse import parse_qs, urlsplit

import requests

APP_SECRET = "test-app-secret-0123456789abcdef"
AGENT_ID = "1000002"
ADMIN = "user0002"  # a member of the stand-in's department (address user0002@corp.example) and an admin
OTHER_ADMIN = "user0004"


def team_env(standin, public_url: str = "http://127.0.0.1", **extra) -> dict[str, str]:
    """Settings that turn WeCom sign-in on, with the stand-in's QR and OAuth2 pages."""
    standin.app_secrets = (APP_SECRET,)
    pages = standin.api_base.removesuffix("/cgi-bin/")
    return {"ADMIN_USERIDS": f"{ADMIN},{OTHER_ADMIN}", "WECOM_AGENT_ID": AGENT_ID, "WECOM_APP_SECRET": APP_SECRET,
            "PUBLIC_URL": public_url, "WECOM_QR_LOGIN_URL": pages + "/wwlogin/sso/login",
            "WECOM_OAUTH_URL": pages + "/connect/oauth2/authorize", "ADMIN_COOKIE_SECURE": "false", **extra}


def start_sign_in(client) -> tuple[str, dict]:
    """GET /admin/login/wecom: the QR page's URL it redirects to, and that URL's query."""
    response = client.get("/admin/login/wecom")
    assert response.status_code == 302, response.status_code
    location = response.headers["Location"]
    return location, {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def scan(location: str) -> str:
    """What the stand-in's QR page links back to (a phone scanning the code): the callback's path and query."""
    page = requests.get(location, timeout=10)
    assert page.status_code == 200, page.text
    back = html.unescape(re.search(r'id="confirm" href="([^"]+)"', page.text).group(1))
    parts = urlsplit(back)
    return f"{parts.path}?{parts.query}"


def sign_in(client, standin, userid: str = ADMIN, openid: str = ""):
    """Sign in with WeCom as `userid` (or as an outsider's `openid`) through the stand-in; the callback's response."""
    standin.sign_in_as("" if openid else userid, openid)
    location, _ = start_sign_in(client)
    return client.get(scan(location))


def csrf_of(text: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', text)
    assert match, "page has no CSRF token"
    return match.group(1)
