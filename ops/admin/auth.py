"""/admin sign-in: the token form, sessions, sign-out, and the checks every POST passes.

Every POST is refused as cross-site (403) when the browser says it comes from another site (Sec-Fetch-Site
other than same-origin/none) or names a foreign Origin. A login POST also needs the login CSRF cookie set by
the form (pre-session, double-submit) and, with a Secure cookie, HTTPS. These refusals come before the
throttle counts anything, so no web page an employee opens can spend the admin's failure budget (issue 24).
Both ways in (this token form and WeCom sign-in) use login_refusal() and sessions.start_session().
"""
from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from flask import abort, g, make_response, redirect, render_template, request, url_for

from ops import metrics
import ops.admin.login_throttle as login_throttle
import ops.admin.sessions as sessions
import ops.admin.trail as trail
from ops.admin.blueprint import bp, engine, log, settings
from store import audit

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
# Reached without a session: the login form and WeCom sign-in (ops/admin/wecom_login.py)
PUBLIC_ENDPOINTS = ("admin.login", "admin.wecom_login", "admin.wecom_callback")
MAX_LOGIN_BYTES = 16 * 1024  # a token and a `next`: anything bigger is not a login
LOGIN_COOKIE = "wecom_mailer_login"  # the login form's CSRF token, before any session exists
LOGIN_FORM_SECONDS = 3600  # how long a login form may stay open
CROSS_SITE = "拒绝跨站请求 Refused: a cross-site request (open this page from the service itself and try again)"
NO_LOGIN_CSRF = ("登录表单已过期 The login form expired or came from elsewhere: reload the login page and try again "
                 "(cookies must be allowed)")
PLAIN_HTTP = ("拒绝明文 HTTP 登录 Refused: this login came over plain HTTP and the HTTPS-only cookie would be "
              "lost — use HTTPS (a proxy in front, with TRUSTED_PROXIES and TRUSTED_PROXY_NETWORKS)")


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _safe_next(target: str | None) -> str | None:
    """Only a path inside /admin, in printable ASCII: never an open redirect, never a header break."""
    if not target or len(target) > 2048 or not target.isascii() or not target.isprintable():
        return None
    if target.startswith("//") or "\\" in target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not (parts.path == "/admin" or parts.path.startswith("/admin/")):
        return None
    return target


def cross_site() -> str | None:
    """Why this request is refused as cross-site, or None when the browser says it comes from this site."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {site[:40]}"
    origin = request.headers.get("Origin")
    if origin is not None:
        # Host names, not ports: nginx passes `Host: $host`, which drops a non-default port the Origin keeps.
        try:
            named = urlsplit(origin.strip()).hostname if origin.isascii() else None
        except ValueError:  # e.g. an unclosed IPv6 bracket
            named = None
        here = urlsplit("//" + request.host).hostname if request.host.isascii() else None
        if not named or named != here:
            return f"Origin: {origin[:80]}"
    return None


def login_cookie_name() -> str:
    return "__Host-" + LOGIN_COOKIE if settings().admin_cookie_secure else LOGIN_COOKIE


def login_refusal() -> str | None:
    """Why this login POST is refused before its token is even counted (or None): cross-site, plain HTTP that
    would lose the Secure cookie, or no matching login CSRF cookie. For every way in."""
    if cross_site():
        return CROSS_SITE
    if sessions.cookie_would_be_lost():
        return PLAIN_HTTP
    cookie = request.cookies.get(login_cookie_name(), "")
    if not cookie or not _same(request.form.get("login_csrf", ""), cookie):
        return NO_LOGIN_CSRF
    return None


def _login_csrf() -> str:
    """The login CSRF token this browser holds, or a new one (set on the form's response)."""
    held = request.cookies.get(login_cookie_name(), "")
    return held if 32 <= len(held) <= 64 and held.isascii() and held.replace("-", "").replace("_", "").isalnum() \
        else secrets.token_urlsafe(32)


def _form(status: int = 200, headers: dict | None = None, **page):
    """The login form with its login CSRF token, the cookie set beside it."""
    token = _login_csrf()
    response = make_response(render_template("admin/login.html", login_csrf=token, **page), status)
    response.headers.extend(headers or {})
    response.set_cookie(login_cookie_name(), token, max_age=LOGIN_FORM_SECONDS, path="/",
                        secure=settings().admin_cookie_secure, httponly=True, samesite="Strict")
    return response


def _client() -> str:
    """The client address failures are counted under (behind TRUSTED_PROXIES: the one they report)."""
    return login_throttle.client_key(request.remote_addr)


@bp.before_request
def require_login():
    """Every page but the login form needs a live session; every POST needs the session's CSRF token."""
    request.max_content_length = MAX_LOGIN_BYTES if request.endpoint == "admin.login" else MAX_UPLOAD_BYTES
    if request.method == "POST" and cross_site():
        log.warning("admin POST %s refused from %s: cross-site (%s)", request.path, _client(), cross_site())
        metrics.admin_login_failed("cross_site")
        abort(403, CROSS_SITE)
    g.admin_session = sessions.current()
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if g.admin_session is None:
        wanted = _safe_next(request.full_path.rstrip("?")) if request.method == "GET" else None
        return redirect(url_for("admin.login", next=wanted))
    if request.method == "POST" and not _same(request.form.get("csrf_token", ""), g.admin_session.csrf):
        abort(400, "missing or wrong CSRF token: reload the page and try again")
    return None


@bp.route("/login", methods=["GET", "POST"])
def login():
    """The token form; a right token opens a session. Failures are throttled per address."""
    next_url = _safe_next(request.values.get("next"))
    page = {"next": next_url, "insecure": sessions.cookie_would_be_lost(), "token_on": bool(settings().admin_token),
            "wecom_on": bool(settings().admin_userids)}
    if request.method == "GET":
        if g.admin_session is not None:
            return redirect(next_url or url_for("admin.events"))
        return _form(**page)
    if not settings().admin_token:  # WeCom sign-in only: there is no token to compare
        abort(404)
    client, db = _client(), engine()
    refused = login_refusal()
    if refused is not None:  # not counted: nobody's failure budget is spent by it
        metrics.admin_login_failed("refused")
        log.warning("admin login refused from %s before the token was checked: %s", client, refused[:60])
        return _form(403, refused=refused, **page)
    wait = login_throttle.retry_after(db, client)
    if wait is not None:
        metrics.admin_login_failed("throttled")
        log.warning("admin login refused from %s: too many failed logins, retry in %d s", client, wait)
        return _form(429, {"Retry-After": str(wait)}, throttled=wait, **page)
    if not _same(request.form.get("token", ""), settings().admin_token):
        login_throttle.failed(db, client)
        metrics.admin_login_failed("wrong_token")
        log.warning("admin login refused from %s: wrong token", client)
        trail.record("sign-in-refused", detail="wrong ADMIN_TOKEN", actor=audit.TOKEN)
        return _form(403, error=True, **page)
    login_throttle.succeeded(db, client)
    response = redirect(next_url or url_for("admin.events"))
    sessions.start_session(response, client, csrf=secrets.token_urlsafe(32), actor=audit.TOKEN)
    response.delete_cookie(login_cookie_name(), path="/", secure=settings().admin_cookie_secure, httponly=True,
                           samesite="Strict")
    log.info("admin login from %s", client)
    trail.record("sign-in", detail="ADMIN_TOKEN", actor=audit.TOKEN)
    return response


@bp.post("/logout")
def logout():
    """End this browser's session: the cookie is refused from now on, wherever a copy of it is."""
    response = redirect(url_for("admin.login"))
    trail.record("sign-out")
    sessions.end(response, g.admin_session)
    log.info("admin logout from %s", _client())
    return response


@bp.post("/logout-everywhere")
def logout_everywhere():
    """End every admin session, in every browser (after a lost laptop, or a token that leaked)."""
    response = redirect(url_for("admin.login"))
    who = trail.who()  # before the session row goes
    ended = sessions.end(response, g.admin_session, everywhere=True)
    trail.record("sign-out-everywhere", detail=f"{ended} session(s) ended", actor=who)
    log.warning("admin logged out everywhere from %s: %d session(s) ended", _client(), ended)
    return response
