"""/admin state shared by every process: the generated signing secret, live sessions, failed logins.

A session row holds only a sha256 of its id, its client, when it was opened, when it expires (the absolute
lifetime) and when it was last used (the idle timeout); a reader of the table cannot take over a session.
"""
from __future__ import annotations

import hashlib
import secrets
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import admin_sessions, insert_ignore, login_failures, service_secrets

SIGNING_SECRET = "admin-session-signing"


def shared_secret(engine: Engine, name: str = SIGNING_SECRET) -> str:
    """The secret called `name`, generated on first use; every process reads the one that was stored first."""
    def get_or_create():
        with engine.begin() as conn:
            # INSERT IGNORE: two processes starting at once both try, the second insert is a no-op,
            # and both then read the winner's value.
            conn.execute(insert_ignore(service_secrets), {"name": name, "value": secrets.token_urlsafe(48),
                                                          "created_at": time.time()})
            return conn.execute(sa.select(service_secrets.c.value)
                                .where(service_secrets.c.name == name)).scalar_one()
    return with_retries(get_or_create)


def rotate_shared_secret(engine: Engine, name: str = SIGNING_SECRET) -> None:
    """Replace the secret called `name` with a new random one (`flask --app app rotate-secret`)."""
    def replace():
        with engine.begin() as conn:
            conn.execute(service_secrets.delete().where(service_secrets.c.name == name))
            conn.execute(service_secrets.insert(), {"name": name, "value": secrets.token_urlsafe(48),
                                                    "created_at": time.time()})
    with_retries(replace)


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def open_session(engine: Engine, client: str, lifetime: float, actor: str = "token") -> str:
    """A new session for `client`, signed in as `actor` (a WeCom userid or `token`); returns its id (only its
    digest is stored). Expired sessions go."""
    session_id, now = secrets.token_urlsafe(32), time.time()
    with engine.begin() as conn:
        conn.execute(admin_sessions.delete().where(admin_sessions.c.expires_at < now))
        conn.execute(admin_sessions.insert(), {"digest": _digest(session_id), "client": client[:64],
                                               "created_at": now, "expires_at": now + lifetime,
                                               "actor": actor[:64]})
    return session_id


def session_actor(engine: Engine, session_id: str) -> str | None:
    """Who the session is signed in as (a WeCom userid or `token`), or None when it has ended."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(admin_sessions.c.actor, admin_sessions.c.expires_at)
                           .where(admin_sessions.c.digest == _digest(session_id))).first()
    return row.actor if row is not None and row.expires_at > time.time() else None


def session_alive(engine: Engine, session_id: str, idle_seconds: float | None = None) -> bool:
    """True while the session exists (not logged out, not ended everywhere), has not expired and (with
    `idle_seconds`) was used within that time; a live session is marked used now."""
    now = time.time()
    where = [admin_sessions.c.digest == _digest(session_id), admin_sessions.c.expires_at > now]
    if idle_seconds is not None:
        # A row of the previous release has no last_seen_at: its opening time stands in.
        last_seen = sa.func.coalesce(admin_sessions.c.last_seen_at, admin_sessions.c.created_at)
        where.append(last_seen >= now - idle_seconds)
    with engine.begin() as conn:
        return conn.execute(admin_sessions.update().where(*where).values(last_seen_at=now)).rowcount == 1


def end_sessions_of(engine: Engine, actor: str) -> int:
    """End every session `actor` holds (a new sign-in ends the earlier ones); returns how many ended."""
    with engine.begin() as conn:
        return conn.execute(admin_sessions.delete().where(admin_sessions.c.actor == actor)).rowcount


def end_session(engine: Engine, session_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(admin_sessions.delete().where(admin_sessions.c.digest == _digest(session_id)))


def end_all_sessions(engine: Engine) -> int:
    """Log out everywhere: every session of every browser ends; returns how many there were."""
    with engine.begin() as conn:
        return conn.execute(admin_sessions.delete()).rowcount


def record_login_failure(engine: Engine, client: str, keep_seconds: float) -> None:
    """One failed login from `client`; failures older than `keep_seconds` are dropped on the way."""
    now = time.time()
    with engine.begin() as conn:
        conn.execute(login_failures.delete().where(login_failures.c.failed_at < now - keep_seconds))
        conn.execute(login_failures.insert(), {"client": client[:64], "failed_at": now})


def login_failures_since(engine: Engine, since: float, client: str | None = None) -> tuple[int, float | None]:
    """(failures since `since`, the time of the oldest of them): from `client`, or from anyone."""
    query = sa.select(sa.func.count(), sa.func.min(login_failures.c.failed_at)).where(
        login_failures.c.failed_at >= since)
    if client is not None:
        query = query.where(login_failures.c.client == client[:64])
    with engine.connect() as conn:
        count, oldest = conn.execute(query).one()
    return count, oldest


def forget_login_failures(engine: Engine, client: str) -> None:
    """A right token from `client`: its earlier failures no longer count against it."""
    with engine.begin() as conn:
        conn.execute(login_failures.delete().where(login_failures.c.client == client[:64]))


def clear_login_failures(engine: Engine, client: str | None = None) -> int:
    """`admin-unlock`: forget the failures of `client`, or of every address; returns how many were cleared."""
    query = login_failures.delete()
    if client is not None:
        query = query.where(login_failures.c.client == client[:64])
    with engine.begin() as conn:
        return conn.execute(query).rowcount
