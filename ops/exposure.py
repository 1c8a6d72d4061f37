"""Whether this service is exposed without the buffering proxy it needs: shared by `flask check` and gunicorn.

Light on purpose: gunicorn.conf.py imports it in the master process, before any worker, so it imports
nothing of the service (no metrics, no database).
"""
from __future__ import annotations

import ipaddress
import os


def bind_warning(settings, environ=None) -> str | None:
    """The warning for a public BIND with no proxy declared (also printed by gunicorn at start-up), or None."""
    environ = os.environ if environ is None else environ
    bind = environ.get("BIND") or "127.0.0.1:" + environ.get("PORT", "8000")  # as gunicorn.conf.py reads it
    if public_bind(bind) and not settings.trusted_proxies and not environ.get("FORWARDED_ALLOW_IPS"):
        return (f"BIND={bind} listens on a public address with no proxy declared (TRUSTED_PROXIES=0, "
                "FORWARDED_ALLOW_IPS unset): run gunicorn behind a buffering reverse proxy such as nginx "
                "(deploy/nginx.conf), since a few slow clients tie up all its threads, and set TRUSTED_PROXIES=1")
    return None


def loopback(host: str | None) -> bool:
    """Whether `host` is this machine only (localhost, 127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def public_bind(bind: str) -> bool:
    """Whether a gunicorn bind (host:port, [v6]:port, unix:path, fd://n) takes connections from other hosts."""
    if bind.startswith(("unix:", "fd://")):
        return False
    host = bind.rpartition(":")[0] if ":" in bind and not bind.endswith("]") else bind
    return not loopback(host or "0.0.0.0")
