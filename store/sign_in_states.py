"""WeCom sign-in in progress: each `state` sent to WeCom, bound to the visitor's pre-session cookie, taken once.

Only digests are stored: a copy of this table lets nobody complete a sign-in. Every process on one
DATABASE_URL shares it, so WeCom may send the visitor back to any of them.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import sign_in_states

STATE_LENGTH = 32  # WeCom allows letters and digits, at most 128 bytes
STATE_ALPHABET = string.ascii_letters + string.digits
LIFETIME_SECONDS = 600  # a QR code is scanned within minutes; WeCom's code itself lives 5 minutes

# Why a callback's state is refused (the page says it; the log line names it)
MISSING, UNKNOWN, FOREIGN, EXPIRED = "missing", "unknown or already used", "started in another browser", "expired"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()


def new_visitor() -> str:
    """A fresh pre-session id for the visitor's cookie."""
    return secrets.token_urlsafe(32)


def begin(engine: Engine, visitor: str, now: float | None = None) -> str:
    """A new random state for `visitor`'s sign-in; expired ones are dropped on the way."""
    now = time.time() if now is None else now
    state = "".join(secrets.choice(STATE_ALPHABET) for _ in range(STATE_LENGTH))

    def write():
        with engine.begin() as conn:
            conn.execute(sign_in_states.delete().where(sign_in_states.c.expires_at < now))
            conn.execute(sign_in_states.insert(), {"state_digest": _digest(state), "visitor_digest": _digest(visitor),
                                                   "created_at": now, "expires_at": now + LIFETIME_SECONDS})
    with_retries(write)
    return state


def take(engine: Engine, state: str | None, visitor: str | None, now: float | None = None) -> str | None:
    """Use `state` up (whoever presents it): None when it was `visitor`'s and still valid, else why not."""
    if not state or len(state) > 128 or not all(c in STATE_ALPHABET for c in state):
        return MISSING if not state else UNKNOWN
    now = time.time() if now is None else now
    key = _digest(state)

    def pop():
        with engine.begin() as conn:
            row = conn.execute(sa.select(sign_in_states).where(sign_in_states.c.state_digest == key)
                               .with_for_update()).first()
            if row is None:
                return None
            # Deleted even when presented by another browser: a state seen twice is spent either way.
            taken = conn.execute(sign_in_states.delete().where(sign_in_states.c.state_digest == key)).rowcount
            return row if taken == 1 else None
    row = with_retries(pop)
    if row is None:
        return UNKNOWN
    if not hmac.compare_digest(row.visitor_digest, _digest(visitor or "")):
        return FOREIGN
    if row.expires_at < now:
        return EXPIRED
    return None
