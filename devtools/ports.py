"""Loopback ports for the stand-ins, tests and benchmarks."""
from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1.

    Every socket stays bound until all are picked: two calls to free_port() in a row may be handed the
    same port back (CI once saw Dovecot refuse its own config with "duplicate listener").
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports
