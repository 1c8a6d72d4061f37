"""A TCP proxy on 127.0.0.1 that adds a fixed delay each way and counts round trips (tests and bench/), and can
cut the link in the middle of an answer (an IMAP server dropping the connection mid-fetch).

Round trips are counted as turns: each time the client sends again after the server has answered. A
client that waits for every SMTP reply makes four turns per message; a pipelining one makes one.
`proxy.cut_after(n)` closes the connection in flight once n more bytes came from the server.
"""
from __future__ import annotations

import heapq
import select
import socket
import threading
import time


class LatencyProxy:
    """`with LatencyProxy(("127.0.0.1", port), rtt=0.02) as proxy:` connect to proxy.port instead."""

    def __init__(self, upstream: tuple[str, int], rtt: float = 0.0):
        self.upstream = upstream
        self.one_way = rtt / 2
        self.turns = 0
        self.connections = 0
        self.cuts = 0
        self._budget: int | None = None  # server bytes still passed before the cut; None: never cut
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]

    def cut_after(self, server_bytes: int) -> None:
        """Cut the connection in flight after this many more bytes from the server (one cut, then normal)."""
        with self._lock:
            self._budget = server_bytes

    def _spend(self, data: bytes) -> tuple[bytes, bool]:
        """What of the server's `data` still goes to the client, and whether the link is cut after it."""
        with self._lock:
            if self._budget is None:
                return data, False
            if len(data) < self._budget:
                self._budget -= len(data)
                return data, False
            data, self._budget = data[:self._budget], None
            self.cuts += 1
            return data, True

    def __enter__(self) -> LatencyProxy:
        threading.Thread(target=self._accept, name="latency-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._listener.close()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        """Both directions in one thread: bytes are held `one_way` seconds, then passed on in order."""
        with client, socket.create_connection(self.upstream, timeout=10) as server:
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = {client: server, server: client}
            due: list[tuple[float, int, socket.socket, bytes]] = []  # (when, sequence, to, data)
            sequence, last_from, open_ends = 0, None, 2
            deadline = time.monotonic() + 3600  # bounded: a forgotten connection ends by itself
            while not self._closing.is_set() and time.monotonic() < deadline and (open_ends == 2 or due):
                wait = max(0.0, min(0.05, due[0][0] - time.monotonic())) if due else 0.05
                ready, _, _ = select.select([s for s in peer if open_ends == 2], [], [], wait)
                for sock in ready:
                    try:
                        data = sock.recv(65536)
                    except OSError:  # reset by one side: the connection ends for both, as on a real link
                        return
                    if not data:
                        open_ends -= 1
                        continue
                    if sock is client and last_from is server:
                        with self._lock:
                            self.turns += 1
                    last_from = sock
                    sequence += 1
                    heapq.heappush(due, (time.monotonic() + self.one_way, sequence, peer[sock], data))
                while due and due[0][0] <= time.monotonic():
                    _, _, target, data = heapq.heappop(due)
                    data, cut = self._spend(data) if target is client else (data, False)
                    try:
                        target.sendall(data)
                        if cut:
                            client.shutdown(socket.SHUT_RDWR)
                            return
                    except OSError:
                        return
