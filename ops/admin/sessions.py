"""/admin sessions: a random id in a cookie signed with SECRET_KEY, valid while its row in the state database is.

The cookie is signed with SECRET_KEY (or the secret generated once into the state database), never with
ADMIN_TOKEN: a stolen cookie tells nothing about the token. Logging out deletes the row, so a copy of the
cookie kept by anyone is refused afterwards; "log out everywhere" deletes every row. A session ends after
SESSION_SECONDS, or IDLE_SECONDS unused, and when its holder signs in again (start_session). The signing
salt carries a fingerprint of ADMIN_TOKEN, so a new token also ends every session; the fingerprint is an
scrypt derivation (computed once per process), so an old cookie plus the database key is no fast offline
test of token guesses. With ADMIN_COOKIE_SECURE the cookie is `__Host-` prefixed: Secure, Path=/, no
Domain, so no other host of the domain can set or shadow it.
"""
from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass

from flask import current_app, request
from itsdangerous import BadSignature, URLSafeTimedSerializer

import config
import services
from store import audit, sessions

COOKIE = "wecom_mailer_admin"
SESSION_SECONDS = 12 * 3600
IDLE_SECONDS = 3600  # unused this long, a session ends (beside its absolute lifetime)
FINGERPRINT_SALT = b"wecom-mailer-admin-session"
REREAD_SECONDS = 5.0  # a signature failure re-reads the generated key at most this often (rotate-secret)
_KEY = "wecom_mailer_admin_signing_key"  # app.extensions: (this process's copy of the signing secret, read at)


@dataclass(frozen=True)
class AdminSession:
    """The signed-in browser: its session id (as in the cookie) and the CSRF token of its forms."""

    session_id: str
    csrf: str


def cookie_name(secure: bool | None = None) -> str:
    """The session cookie's name: `__Host-` prefixed when it is Secure."""
    secure = _secure() if secure is None else secure
    return "__Host-" + COOKIE if secure else COOKIE


@functools.lru_cache(maxsize=4)
def token_fingerprint(token: str) -> str:
    """scrypt of ADMIN_TOKEN (about 50 ms, once per process): the part of the signing salt that names it."""
    return hashlib.scrypt(token.encode("utf-8"), salt=FINGERPRINT_SALT, n=2**14, r=8, p=1, dklen=16).hex()


def signing_key(reread: bool = False) -> str:
    """SECRET_KEY, else the generated key: read once per process, and again on `reread` (a signature that
    failed: the key may have been rotated) at most once every REREAD_SECONDS, so forged cookies cost no flood
    of queries."""
    parts = services.of(current_app)
    if parts.settings.secret_key:
        return parts.settings.secret_key
    cached = current_app.extensions.get(_KEY)  # (key, monotonic time of the last re-read or None)
    if cached is None or (reread and (cached[1] is None or time.monotonic() - cached[1] >= REREAD_SECONDS)):
        cached = (sessions.shared_secret(parts.engine), time.monotonic() if reread else None)
        current_app.extensions[_KEY] = cached
        config.remember_secret(cached[0])
    return cached[0]


def _serializer(key: str | None = None) -> URLSafeTimedSerializer:
    token = services.of(current_app).settings.admin_token or ""
    salt = "wecom-mailer-admin-session/" + token_fingerprint(token)
    return URLSafeTimedSerializer(key or signing_key(), salt=salt)


def _load(raw: str):
    try:
        return _serializer().loads(raw, max_age=SESSION_SECONDS)
    except BadSignature:  # forged, older than SESSION_SECONDS, or signed with a key rotated since we read it
        before = signing_key()
        if signing_key(reread=True) == before:
            return None
        try:
            return _serializer().loads(raw, max_age=SESSION_SECONDS)
        except BadSignature:
            return None


def current() -> AdminSession | None:
    """The session the request's cookie names, if its signature holds and it has not ended, expired or idled."""
    raw = request.cookies.get(cookie_name())
    if not raw or len(raw) > 512:
        return None
    data = _load(raw)
    if not (isinstance(data, dict) and isinstance(data.get("sid"), str) and isinstance(data.get("csrf"), str)):
        return None
    if not sessions.session_alive(services.of(current_app).engine, data["sid"], idle_seconds=IDLE_SECONDS):
        return None  # logged out (here or everywhere), expired, or idle too long
    return AdminSession(data["sid"], data["csrf"])


def start_session(response, client: str, csrf: str, actor: str = audit.TOKEN) -> None:
    """Open a session for `actor` from `client` and set its cookie: every earlier session of `actor` ends.

    Both ways in (the token form and WeCom sign-in) end here, after auth.login_refusal() let them through.
    """
    engine = services.of(current_app).engine
    sessions.end_sessions_of(engine, actor)
    session_id = sessions.open_session(engine, client, SESSION_SECONDS, actor=actor)
    response.set_cookie(cookie_name(), _serializer().dumps({"sid": session_id, "csrf": csrf}),
                        max_age=SESSION_SECONDS, path="/", secure=_secure(), httponly=True, samesite="Strict")


def end(response, session: AdminSession | None, everywhere: bool = False) -> int:
    """End this session (or every session) and clear the cookie; returns how many sessions ended."""
    engine = services.of(current_app).engine
    ended = 0
    if everywhere:
        ended = sessions.end_all_sessions(engine)
    elif session is not None:
        sessions.end_session(engine, session.session_id)
        ended = 1
    response.delete_cookie(cookie_name(), path="/", secure=_secure(), httponly=True, samesite="Strict")
    return ended


def _secure() -> bool:
    return services.of(current_app).settings.admin_cookie_secure


def cookie_would_be_lost() -> bool:
    """A Secure cookie set on a plain-HTTP page never comes back (the login page says so, the POST is refused)."""
    return _secure() and not request.is_secure and request.host.split(":")[0] not in ("localhost", "127.0.0.1")
