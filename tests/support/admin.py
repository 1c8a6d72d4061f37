"""Signing in to /admin as a browser does: the login form first (its login CSRF cookie and field), then the POST."""
from __future__ import annotations

import re


def login_form_token(client, **kwargs) -> str:
    """GET /admin/login and return the form's login CSRF field (its cookie stays in `client`)."""
    page = client.get("/admin/login", **kwargs).get_data(as_text=True)
    match = re.search(r'name="login_csrf" value="([^"]+)"', page)
    return match.group(1) if match else ""


def post_login(client, token: str, data: dict | None = None, **kwargs):
    """The login form posted with `token`, as a browser on this site would (same-origin)."""
    form = {"token": token, "login_csrf": login_form_token(client, **kwargs), **(data or {})}
    headers = {"Sec-Fetch-Site": "same-origin", **kwargs.pop("headers", {})}
    return client.post("/admin/login", data=form, headers=headers, **kwargs)


def csrf_of(page_text: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page_text)
    assert match, "page has no CSRF token"
    return match.group(1)


def session_cookies(response) -> list[str]:
    """The Set-Cookie headers of `response` for the session cookie (not the login form's CSRF cookie)."""
    return [c for c in response.headers.getlist("Set-Cookie") if c.split("=", 1)[0].endswith("wecom_mailer_admin")]
