"""Login throttling for /admin: failures counted per client address, in the state database.

Every process on one DATABASE_URL shares the counts. A throttled attempt is refused before the token is
compared (so the right token does not get through from that address either) and is not counted itself,
which keeps the table small under a flood. The client address is request.remote_addr: behind
TRUSTED_PROXIES reverse proxies in TRUSTED_PROXY_NETWORKS, the address they report (ops/forwarded.py).

There is no overall lock: a 32-character token is not guessable by volume, so a cap over all addresses
protected nothing and let anyone lock the administrator out (issue 24). Failures from all addresses
together above OVERALL_ALERT in the window are a warning in the log and the alert on
wecom_mailer_admin_login_failures_total; `flask --app app admin-unlock` clears the counters.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import time

from store import sessions

log = logging.getLogger("wecom_mailer.admin")
WINDOW_SECONDS = 600
PER_CLIENT = 10  # failures per address per window
OVERALL_ALERT = 100  # failures from all addresses per window: logged as a warning (an alert, never a lock)
ALERT_EVERY_SECONDS = 60  # at most one such warning per process per minute
_last_alert: dict[str, float] = {}  # state database URL → when this process last warned about it


def client_key(address: str | None) -> str:
    """The address failures are counted under: IPv4 as is, IPv6 by its /64 (one host is given a whole /64)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return (address or "unknown")[:64]
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def retry_after(engine, client: str) -> int | None:
    """Seconds until `client` may try again, or None when it may try now."""
    now = time.time()
    count, oldest = sessions.login_failures_since(engine, now - WINDOW_SECONDS, client)
    if count >= PER_CLIENT:
        # Backoff: the address waits until its oldest failure in the window leaves it.
        return max(1, math.ceil(oldest + WINDOW_SECONDS - now))
    return None


def failed(engine, client: str) -> None:
    """Count one wrong token from `client`; many from all addresses together raise a warning."""
    sessions.record_login_failure(engine, client, keep_seconds=WINDOW_SECONDS)
    now, where = time.time(), str(engine.url)
    if now - _last_alert.get(where, 0.0) < ALERT_EVERY_SECONDS:
        return
    count, _ = sessions.login_failures_since(engine, now - WINDOW_SECONDS)
    if count >= OVERALL_ALERT:
        _last_alert[where] = now
        log.warning("%d failed admin logins from all addresses in %d minutes: someone is guessing (not locked: "
                    "the right token still gets in from an address that has not failed)", count,
                    WINDOW_SECONDS // 60)


def succeeded(engine, client: str) -> None:
    """The right token: this address starts afresh."""
    sessions.forget_login_failures(engine, client)
