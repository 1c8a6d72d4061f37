"""A lean SMTP server for benchmarks: aiosmtpd accepting everything, counting, keeping nothing.

It runs as its own process (`python -m bench.sink --port P --stats FILE`: its own interpreter and GIL,
as a real relay would be) and reports through a small memory-mapped file: messages accepted,
connections greeted, and the monotonic time of the first and the last message (CLOCK_MONOTONIC is
system-wide, so the parent compares it with its own clock). The sink is the only writer while mail
flows; the parent zeroes the file between runs.
"""
from __future__ import annotations

import argparse
import logging
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

COUNT, CONNECTIONS, FIRST, LAST = range(4)
LAYOUT = struct.Struct("<4d")


class _Stats:
    """Four doubles in a shared file."""

    def __init__(self, path: str):
        with open(path, "r+b") as file:
            self.map = mmap.mmap(file.fileno(), LAYOUT.size)

    def read(self) -> list[float]:
        return list(LAYOUT.unpack_from(self.map))

    def write(self, values) -> None:
        LAYOUT.pack_into(self.map, 0, *values)


class _AcceptAll:
    """aiosmtpd handler: every recipient and every message is accepted, nothing is parsed or kept."""

    def __init__(self, stats: _Stats, pipelining: bool = False):
        self.stats = stats
        self.pipelining = pipelining

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        values = self.stats.read()
        values[CONNECTIONS] += 1
        self.stats.write(values)
        if self.pipelining:  # aiosmtpd reads pipelined commands; it advertises them only when told to
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server, session, envelope):
        now = time.monotonic()
        values = self.stats.read()
        if values[COUNT] == 0:
            values[FIRST] = now
        values[COUNT] += 1
        values[LAST] = now
        self.stats.write(values)
        return "250 2.0.0 OK"


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark SMTP sink on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--pipelining", action="store_true", help="advertise PIPELINING (RFC 2920) in EHLO")
    args = parser.parse_args()
    from aiosmtpd.controller import Controller

    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    controller = Controller(_AcceptAll(_Stats(args.stats), args.pipelining), hostname="127.0.0.1", port=args.port,
                            server_hostname="bench-sink.test")  # no getfqdn() DNS lookup per connection
    controller.start()
    print("ready", flush=True)
    stop.wait(3600)  # bounded: a forgotten sink ends by itself
    controller.stop()


class Sink:
    """Start with `with Sink() as sink:`; `reset()` before a run, `wait(n)` for n messages, `rate()` after."""

    def __init__(self, pipelining: bool = False):
        from devtools.ports import free_port  # imported here: the sink process itself needs only aiosmtpd

        self.port = free_port()
        self.pipelining = pipelining
        fd, self._path = tempfile.mkstemp(prefix="wmbench-sink-")
        os.write(fd, bytes(LAYOUT.size))
        os.close(fd)
        self._stats = _Stats(self._path)
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "Sink":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        args = [sys.executable, "-m", "bench.sink", "--port", str(self.port), "--stats", self._path]
        self._process = subprocess.Popen(args + (["--pipelining"] if self.pipelining else []), cwd=root,
                                         stdout=subprocess.PIPE, text=True)
        if self._process.stdout.readline().strip() != "ready":
            raise RuntimeError("the benchmark SMTP sink did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        os.unlink(self._path)

    @property
    def pid(self) -> int:
        return self._process.pid

    def reset(self) -> None:
        """Zero the counters; call only while no mail is flowing."""
        self._stats.write([0.0] * 4)

    def snapshot(self) -> tuple[int, int, float, float]:
        values = self._stats.read()
        return int(values[COUNT]), int(values[CONNECTIONS]), values[FIRST], values[LAST]

    @property
    def count(self) -> int:
        return self.snapshot()[0]

    def wait(self, count: int, timeout: float) -> bool:
        """Wait (bounded) until `count` messages have arrived."""
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def rate(self) -> float:
        """Messages per second from the first to the last message accepted."""
        count, _, first, last = self.snapshot()
        return (count - 1) / (last - first) if count > 1 and last > first else 0.0


if __name__ == "__main__":
    main()
