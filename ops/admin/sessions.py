"""/admin sessions: a random id in a cookie signed with SECRET_KEY, valid while its row in the state database is.

The cookie is signed with SECRET_KEY (or the secret generated once into the state database), never with
ADMIN_TOKEN: a stolen cookie tells nothing about the token. Logging out deletes the row, so a copy of the
cookie kept by anyone is refused afterwards; "log out everywhere" deletes every row. The signing salt
carries a digest of ADMIN_TOKEN, so a new token also ends every session.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from flask import current_app, request
from itsdangerous import BadSignature, URLSafeTimedSerializer

import services
from store import sessions

COOKIE = "wecom_mailer_admin"
SESSION_SECONDS = 12 * 3600
_KEY = "wecom_mailer_admin_signing_key"  # app.extensions: this process's copy of the signing secret


@dataclass(frozen=True)
class AdminSession:
    """The signed-in browser: its session id (as in the cookie) and the CSRF token of its forms."""

    session_id: str
    csrf: str


def _signing_key() -> str:
    key = current_app.extensions.get(_KEY)
    if key is None:
        parts = services.of(current_app)
        key = parts.settings.secret_key or sessions.shared_secret(parts.engine)
        current_app.extensions[_KEY] = key
    return key


def _serializer() -> URLSafeTimedSerializer:
    token = services.of(current_app).settings.admin_token or ""
    salt = "wecom-mailer-admin-session/" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]
    return URLSafeTimedSerializer(_signing_key(), salt=salt)


def current() -> AdminSession | None:
    """The session the request's cookie names, if its signature holds and it has not ended or expired."""
    raw = request.cookies.get(COOKIE)
    if not raw or len(raw) > 512:
        return None
    try:
        data = _serializer().loads(raw, max_age=SESSION_SECONDS)
    except BadSignature:  # forged, signed with another key or token, or older than SESSION_SECONDS
        return None
    if not (isinstance(data, dict) and isinstance(data.get("sid"), str) and isinstance(data.get("csrf"), str)):
        return None
    if not sessions.session_alive(services.of(current_app).engine, data["sid"]):
        return None  # logged out (here or everywhere), or expired
    return AdminSession(data["sid"], data["csrf"])


def start(response, client: str, csrf: str, actor: str = "token") -> None:
    """Open a session for `client`, signed in as `actor`, and set its cookie on `response`."""
    session_id = sessions.open_session(services.of(current_app).engine, client, SESSION_SECONDS, actor=actor)
    response.set_cookie(COOKIE, _serializer().dumps({"sid": session_id, "csrf": csrf}), max_age=SESSION_SECONDS,
                        path="/admin", secure=_secure(), httponly=True, samesite="Strict")


def end(response, session: AdminSession | None, everywhere: bool = False) -> int:
    """End this session (or every session) and clear the cookie; returns how many sessions ended."""
    engine = services.of(current_app).engine
    ended = 0
    if everywhere:
        ended = sessions.end_all_sessions(engine)
    elif session is not None:
        sessions.end_session(engine, session.session_id)
        ended = 1
    response.delete_cookie(COOKIE, path="/admin", secure=_secure(), httponly=True, samesite="Strict")
    return ended


def _secure() -> bool:
    return services.of(current_app).settings.admin_cookie_secure


def cookie_would_be_lost() -> bool:
    """A Secure cookie set on a plain-HTTP page never comes back (the login page says so)."""
    return _secure() and not request.is_secure and request.host.split(":")[0] not in ("localhost", "127.0.0.1")
