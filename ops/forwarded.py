"""Whose X-Forwarded-For / -Proto count: only those of a peer inside TRUSTED_PROXY_NETWORKS.

TRUSTED_PROXIES alone (a hop count) trusted the headers of anyone who could reach gunicorn: with gunicorn
reachable directly, every client chose its own address. Now a request's forwarded headers count only when
the connection itself comes from a proxy network (TRUSTED_PROXY_NETWORKS; unset: loopback only), and then
ProxyFix takes the last TRUSTED_PROXIES hops. From any other peer the headers are removed before the app
sees them. Two mistakes are each logged once per process: forwarded headers from an untrusted peer (a
proxy whose network is not listed, or a client reaching gunicorn directly), and a trusted proxy that sends
no X-Forwarded-For (a proxy declared that does not forward: every client would share its address).
"""
from __future__ import annotations

import ipaddress
import logging

from werkzeug.middleware.proxy_fix import ProxyFix

log = logging.getLogger("wecom_mailer.proxy")
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
FORWARDED = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PORT",
             "HTTP_X_FORWARDED_PREFIX", "HTTP_FORWARDED")


def _address(value: str | None):
    try:
        ip = ipaddress.ip_address((value or "").strip("[]"))
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip


class TrustedProxies:
    """WSGI middleware: ProxyFix for peers in `networks`, forwarded headers dropped for everyone else."""

    def __init__(self, app, hops: int, networks: tuple = ()):
        self.app = app
        self.networks = tuple(networks) or LOOPBACK
        self.fixed = ProxyFix(app, x_for=hops, x_proto=hops, x_host=0, x_port=0, x_prefix=0) if hops else None
        self.warned: set[str] = set()

    def trusted(self, peer: str | None) -> bool:
        """Whether the connection's own address is one of the proxies'."""
        ip = _address(peer)
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)

    def __call__(self, environ, start_response):
        peer = environ.get("REMOTE_ADDR")
        has_forwarded = any(name in environ for name in FORWARDED)
        if self.fixed is not None and self.trusted(peer):
            if "HTTP_X_FORWARDED_FOR" not in environ:
                self._once("missing", "a request from %s, inside TRUSTED_PROXY_NETWORKS, came without "
                           "X-Forwarded-For: every client behind it shares its address (configure the proxy "
                           "to set X-Forwarded-For, or set TRUSTED_PROXIES=0)", peer)
            return self.fixed(environ, start_response)
        if has_forwarded:
            for name in FORWARDED:
                environ.pop(name, None)
            self._once("untrusted", "ignored X-Forwarded-* headers from %s: not a trusted proxy (TRUSTED_PROXIES=%d, "
                       "TRUSTED_PROXY_NETWORKS=%s); if it is your reverse proxy, add its network to "
                       "TRUSTED_PROXY_NETWORKS", peer, self.fixed.x_for if self.fixed else 0,
                       ",".join(map(str, self.networks)) if self.fixed else "unset")
        return self.app(environ, start_response)

    def _once(self, kind: str, message: str, *args) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            log.warning(message, *args)
