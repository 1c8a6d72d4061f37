"""The audit row of an /admin action: who (the session's actor), from where (after TRUSTED_PROXIES), what."""
from __future__ import annotations

from flask import request

import ops.admin.login_throttle as login_throttle
from ops.admin.blueprint import actor as session_actor, engine
from store import audit


def client() -> str:
    """The client address as the login throttle sees it (behind TRUSTED_PROXIES: the one they report)."""
    return login_throttle.client_key(request.remote_addr)


def who() -> str:
    """The signed-in actor of this request ("-" when none)."""
    return session_actor() or "-"


def record(action: str, target: object = "", detail: object = "", actor: str | None = None) -> None:
    """One audit row for this request's action; `actor` only before a session exists (sign-in)."""
    audit.record(engine(), actor or who(), action, target=target, detail=detail, client=client())
