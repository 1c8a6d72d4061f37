"""/admin sign-in: the token form, sessions, sign-out, and the CSRF check every POST passes."""
from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from flask import abort, g, redirect, render_template, request, url_for

from ops import metrics
import ops.admin.login_throttle as login_throttle
import ops.admin.sessions as sessions
import ops.admin.trail as trail
from ops.admin.blueprint import bp, engine, log, settings
from store import audit

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
# Reached without a session: the login form and WeCom sign-in (ops/admin/wecom_login.py)
PUBLIC_ENDPOINTS = ("admin.login", "admin.wecom_login", "admin.wecom_callback")


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


def _client() -> str:
    """The client address failures are counted under (behind TRUSTED_PROXIES: the one they report)."""
    return login_throttle.client_key(request.remote_addr)


@bp.before_request
def require_login():
    """Every page but the login form needs a live session; every POST needs the session's CSRF token."""
    request.max_content_length = MAX_UPLOAD_BYTES
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
    """The token form; a right token opens a session. Failures are throttled per address and over all."""
    next_url = _safe_next(request.values.get("next"))
    page = {"next": next_url, "insecure": sessions.cookie_would_be_lost(), "token_on": bool(settings().admin_token),
            "wecom_on": bool(settings().admin_userids)}
    if request.method == "GET":
        if g.admin_session is not None:
            return redirect(next_url or url_for("admin.events"))
        return render_template("admin/login.html", **page)
    if not settings().admin_token:  # WeCom sign-in only: there is no token to compare
        abort(404)
    client, db = _client(), engine()
    wait = login_throttle.retry_after(db, client)
    if wait is not None:
        metrics.admin_login_failed("throttled")
        log.warning("admin login refused from %s: too many failed logins, retry in %d s", client, wait)
        return render_template("admin/login.html", throttled=wait, **page), 429, {"Retry-After": str(wait)}
    if not _same(request.form.get("token", ""), settings().admin_token):
        login_throttle.failed(db, client)
        metrics.admin_login_failed("wrong_token")
        log.warning("admin login refused from %s: wrong token", client)
        trail.record("sign-in-refused", detail="wrong ADMIN_TOKEN", actor=audit.TOKEN)
        return render_template("admin/login.html", error=True, **page), 403
    login_throttle.succeeded(db, client)
    response = redirect(next_url or url_for("admin.events"))
    sessions.start(response, client, csrf=secrets.token_urlsafe(32), actor=audit.TOKEN)
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
