"""Group commit or a plain INSERT per callback? The same service with another recorder, side by side.

`bench.recording_modes:create_app()` is `app:create_app()` whose callbacks' recorder is chosen
by BENCH_RECORDER: `plain` (each callback checks a connection out of the autocommit pool, one committed INSERT,
checks it back in: the obvious design), `writers=N` (store/recording.GroupCommit with always up to N writes
in flight per process; 1 is group commit proper) or `adaptive` (GroupCommit as shipped: one write in flight
while writes are fast, up to recording.WRITERS while they are slow). `section(run)` measures each against
the others at 1, 4, 16 and 64 wrk connections, with MariaDB at 0 ms and 20 ms (devtools/latency_proxy.py) away.
"""
from __future__ import annotations

import contextlib
import os
import time

from sqlalchemy.engine import make_url

RECORDERS = tuple(os.environ.get("BENCH_RECORDERS", "writers=1,writers=4,writers=16,plain").split(","))
CONNECTIONS = (1, 4, 16, 64)


class PlainCommit:
    """One committed INSERT per callback on a pooled autocommit connection, checked out and in each time."""

    def __init__(self, engine, observe=lambda rows: None):
        self.engine, self.observe = engine, observe

    def record(self, row: dict) -> tuple[int, bool]:
        """(event id, created), as GroupCommit.record."""
        from sqlalchemy.exc import DBAPIError

        from store.db import StateUnavailable, autocommit_engine
        from store.event_writes import write_rows

        stamp = row["received_at"] = time.time()
        try:
            with autocommit_engine(self.engine).connect() as conn:
                outcome = write_rows(conn, [row], stamp)[0]
        except DBAPIError as exc:
            raise StateUnavailable(exc.orig.__class__.__name__) from exc
        self.observe(1)
        return outcome


def create_app():
    """The service, its recorder replaced as BENCH_RECORDER says."""
    import app as service_app
    import services
    from ops import metrics
    from store.recording import GroupCommit

    flask_app = service_app.create_app()
    parts = services.of(flask_app)
    choice = os.environ.get("BENCH_RECORDER", "writers=1")
    if choice == "plain":
        parts.recorder = PlainCommit(parts.engine, observe=metrics.callback_batch)
    elif choice == "adaptive":  # the shipped GroupCommit: one write in flight, more while writes are slow
        parts.recorder = GroupCommit(parts.engine, observe=metrics.callback_batch)
    else:  # writers=N: always N in flight (slow_seconds=0: every write counts as slow)
        writers = int(choice.partition("=")[2])
        parts.recorder = GroupCommit(parts.engine, observe=metrics.callback_batch, writers=writers, slow_seconds=0)
    return flask_app


def section(run) -> None:
    """Every recorder at every connection count, database near and far, in alternation, best of rounds."""
    from bench import harness as h
    from devtools.latency_proxy import LatencyProxy

    args = run.args
    server = make_url(h.mysql_server_url())
    results: dict = {}
    cases = [tuple(float(n) for n in case.split(":")) for case in
             os.environ.get("BENCH_RECORDING_CASES", "").split(",") if case]  # "rtt_ms:connections,…"
    for rtt in (0.0, 0.02):
        if cases and not any(c_rtt / 1000 == rtt for c_rtt, _ in cases):
            continue
        with contextlib.ExitStack() as stack:
            proxy = None
            if rtt:
                proxy = stack.enter_context(LatencyProxy((server.host, server.port or 3306), rtt=rtt))
            targets = {}
            for recorder in RECORDERS:
                url = stack.enter_context(h.database(f"rec{len(targets)}"))
                h.prepare_state(url)
                if proxy is not None:
                    url = make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
                env = h.service_env(url, run.standin.api_base, run.sink.port, BENCH_RECORDER=recorder)
                port = h.free_port()
                service = stack.enter_context(h.Service.gunicorn("bench.recording_modes:create_app()", env, port,
                                                                 f"recording-{recorder}-{port}"))
                targets[recorder] = (service, port)
            for connections in CONNECTIONS:
                if cases and (rtt * 1000, connections) not in cases:
                    continue
                threads = min(2, connections)
                for attempt in range(args.repeats):
                    line = []
                    for recorder, (service, port) in targets.items():
                        # Enough distinct callbacks for the run (a thread that runs out stops), no more: each is
                        # signed beforehand, in this process, on the same two cores.
                        count = (min(args.requests, max(5000, connections * 2500)) if rtt == 0 else
                                 min(10_000, max(1000, connections * 400)))
                        file = h.write_requests(h.OUT / f"requests-rec-{port}.txt", count,
                                                f"m{port}c{connections}r{attempt}x")
                        result = h.wrk(port, file, 0, count, args.load_seconds, connections=connections,
                                       threads=threads)
                        file.unlink()
                        key = (rtt, connections, recorder)
                        results.setdefault(key, []).append(result)
                        line.append(f"{recorder} {result['rps']:.0f}/s p99 {result['p99_ms']:.0f} ms"
                                    + (f" NON-2XX {result['non2xx']}" if result["non2xx"] else ""))
                    h.say(f"recording, db {rtt * 1000:.0f} ms away, {connections} connections, round {attempt + 1}: "
                        + ", ".join(line) + f"; load {os.getloadavg()[0]:.1f}")
    run.raw["recording modes"] = {f"{rtt * 1000:.0f}ms c{c} {r}": v for (rtt, c, r), v in results.items()}
    for rtt in (0.0, 0.02):
        for connections in CONNECTIONS:
            if (rtt, connections, RECORDERS[0]) not in results:
                continue
            best = {r: max(results[(rtt, connections, r)], key=lambda x: x["rps"]) for r in RECORDERS}
            base = best.get("plain") or best[RECORDERS[0]]
            for recorder in RECORDERS:
                got = best[recorder]
                run.add("recording", f"db {rtt * 1000:.0f} ms, {connections} conn: {recorder} (p99)",
                        f"{got['rps']:.0f}/s ({got['p99_ms']:.0f} ms)",
                        f"{'plain' if 'plain' in best else RECORDERS[0]} {base['rps']:.0f}/s ({base['p99_ms']:.0f} ms)",
                        got["rps"] / base["rps"])
