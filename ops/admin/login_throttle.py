"""Login throttling for /admin: failures counted per client address and over all, in the state database.

Every process on one DATABASE_URL shares the counts. A throttled attempt is refused before the token is
compared (so the right token does not get through either) and is not counted itself, which keeps the table
small under a flood. The client address is request.remote_addr: behind TRUSTED_PROXIES reverse proxies,
ProxyFix (app.py) has put the address they report there; otherwise X-Forwarded-For is ignored.
"""
from __future__ import annotations

import ipaddress
import math
import time

from store import sessions

WINDOW_SECONDS = 600
PER_CLIENT = 10  # failures per address per window
OVERALL = 100  # failures from all addresses per window: a guesser with many addresses


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
    since = now - WINDOW_SECONDS
    for limit, who in ((PER_CLIENT, client), (OVERALL, None)):
        count, oldest = sessions.login_failures_since(engine, since, who)
        if count >= limit:
            return max(1, math.ceil(oldest + WINDOW_SECONDS - now))
    return None


def failed(engine, client: str) -> None:
    """Count one wrong token from `client`."""
    sessions.record_login_failure(engine, client, keep_seconds=WINDOW_SECONDS)


def succeeded(engine, client: str) -> None:
    """The right token: this address starts afresh."""
    sessions.forget_login_failures(engine, client)
