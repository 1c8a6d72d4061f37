"""A TCP proxy on 127.0.0.1 that can cut the link in the middle of an answer (an IMAP server dropping the
connection mid-fetch): `proxy.cut_after(n)` closes both ends once n more bytes came from the server."""
from __future__ import annotations

import select
import socket
import threading
import time


class CuttingProxy:
    """`with CuttingProxy(("127.0.0.1", port)) as proxy:` connect to proxy.port instead."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
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

    def __enter__(self) -> "CuttingProxy":
        threading.Thread(target=self._accept, name="cutting-proxy", daemon=True).start()
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
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream, timeout=10) as server:
            peer = {client: server, server: client}
            deadline = time.monotonic() + 600  # bounded: a forgotten connection ends by itself
            while not self._closing.is_set() and time.monotonic() < deadline:
                ready, _, _ = select.select(list(peer), [], [], 0.1)
                for sock in ready:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if sock is server:
                        with self._lock:
                            if self._budget is not None:
                                if len(data) >= self._budget:
                                    data, self._budget = data[:self._budget], None
                                    self.cuts += 1
                                    client.sendall(data)
                                    client.shutdown(socket.SHUT_RDWR)
                                    return
                                self._budget -= len(data)
                    try:
                        peer[sock].sendall(data)
                    except OSError:
                        return
