"""Retention (issue 23): 10^6 finished deliveries pruned while callbacks are answered. The callbacks' p99 during the
prune beside p99 without it (before and after, same rate, same service), and rows deleted per second.

The prune runs as the service runs it (store/retention.prune with delivery/retention's pause between batches),
in a thread of this process: in production it is a thread of a worker, never of the web process answering.
"""
from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from bench import harness as h

RATE = 200.0  # callbacks/s: a busy corp's morning, well under what one web process answers (BENCHMARKS.md)
DELIVERIES_PER_EVENT = 10
DAY = 86400


def _fill_old(url: str, deliveries: int) -> None:
    """`deliveries` sent deliveries of finished events 100+ days old (10 each), and a few young ones kept."""
    engine = sa.create_engine(url)
    now = time.time()
    events = deliveries // DELIVERIES_PER_EVENT
    old = now - 100 * DAY
    step = 100_000
    with engine.begin() as conn:
        for start in range(0, events, step):
            end = min(events, start + step)
            conn.execute(sa.text(
                "INSERT INTO wm_events (id, dedup_key, change_type, user_id, departments, create_time, xml, status, "
                "reason, attempts, received_at, first_attempt_at, next_attempt_at, finished_at) "
                f"SELECT seq, CONCAT('old-', seq), 'update_user', CONCAT('u', seq), '2', {int(old)} - seq, '<xml/>', "
                f"'done', '10 sent', 1, {old} - seq, {old} - seq, 0, {old} - seq + 1 FROM seq_{start + 1}_to_{end}"))
        for start in range(0, deliveries, step * 5):
            end = min(deliveries, start + step * 5)
            conn.execute(sa.text(
                "INSERT INTO wm_deliveries (event_id, userid, name, address, status, reason, attempts, "
                "first_attempt_at, next_attempt_at, sent_at) "
                f"SELECT 1 + (seq - 1) DIV {DELIVERIES_PER_EVENT}, CONCAT('m', seq), 'name', "
                f"CONCAT('m', seq, '@corp.example'), 'sent', NULL, 1, {old}, 0, {old} FROM seq_{start + 1}_to_{end}"))
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE TABLE wm_events, wm_deliveries"))
    engine.dispose()


class Requests:
    """Fresh signed callbacks for each wrk window (none is sent twice), written to files as needed."""

    def __init__(self, port: int, per_window: int, windows_per_file: int = 8):
        self.port, self.per_window, self.size = port, per_window, per_window * windows_per_file
        self.files = 0
        self.file, self.offset = None, self.size

    def take(self) -> tuple:
        """(file, first line) of the next window's requests."""
        if self.offset + self.per_window > self.size:
            self.files += 1
            self.file = h.write_requests(h.OUT / f"requests-retention-{self.port}-{self.files}.txt", self.size,
                                         f"ret{self.port}f{self.files}x")
            self.offset = 0
        taken = (self.file, self.offset)
        self.offset += self.per_window
        return taken

    def window(self, seconds: float) -> dict:
        """One wrk window at RATE; failures stop the benchmark."""
        file, first = self.take()
        result = h.wrk(self.port, file, first, self.per_window, seconds, rate=RATE)
        if result["non2xx"] or result["errors"]:
            raise RuntimeError(f"wrk saw failures during the retention benchmark: {result}")
        return result


MAX_WINDOWS = 200  # bounded: a prune that takes longer is reported on what was measured


def retention_section(run) -> None:
    """The `retention` rows of bench/run.py."""
    from store import db, retention
    from delivery.retention import PAUSE_SECONDS, YIELD_FACTOR

    deliveries = run.args.retention_rows
    seconds = run.args.load_seconds
    per_window = int(RATE * seconds * 1.3) + 100
    with h.database("retention") as url:
        h.prepare_state(url)
        started = time.monotonic()
        _fill_old(url, deliveries)
        run.add("retention", f"filled {deliveries:,} old deliveries", f"{time.monotonic() - started:.0f} s")
        env = h.service_env(url, run.standin.api_base, run.sink.port)
        port = h.free_port()
        requests = Requests(port, per_window)
        engine = db.make_engine(url)
        with h.Service.gunicorn("app:create_app()", env, port, "retention-web"):
            h.wrk(port, *requests.take(), per_window // 5, 1)  # warm-up
            before = [requests.window(seconds) for _ in range(3)]
            outcome: dict = {}

            def prune():
                outcome["pruned"] = retention.prune(engine, 90, pause=PAUSE_SECONDS, yield_factor=YIELD_FACTOR)
            thread = threading.Thread(target=prune, name="bench-prune")
            thread.start()
            during = []
            while thread.is_alive() and len(during) < MAX_WINDOWS:
                during.append(requests.window(seconds))
            thread.join()
            after = [requests.window(seconds) for _ in range(3)]
        left = h.scalar(engine, sa.select(sa.func.count()).select_from(sa.table("wm_deliveries")))
        engine.dispose()
    pruned = outcome["pruned"]
    # Like with like: the median window's p99 during the prune against the median window's without it (3 windows
    # before and 3 after, on the same service at the same rate); the worst window is shown beside.
    without = sorted(r["p99_ms"] for r in before + after)[len(before + after) // 2]
    median = sorted(r["p99_ms"] for r in during)[len(during) // 2]
    worst = max(r["p99_ms"] for r in during)
    rate_reached = min(r["rps"] for r in during)
    run.add("retention", f"callbacks p99 at {RATE:.0f}/s without pruning (median of {len(before + after)} windows)",
            f"{without:.1f} ms")
    run.add("retention", f"  p99 during the prune: median of {len(during)} windows of {seconds:g} s (worst)",
            f"{median:.1f} ms ({worst:.1f})", f"{without:.1f} ms", median / without, "≤ 2×", median <= 2 * without)
    run.add("retention", "  rate reached during the prune (slowest window)", f"{rate_reached:.0f}/s", f"{RATE:.0f}/s",
            rate_reached / RATE)
    rows = pruned.deliveries + pruned.events
    run.add("retention", f"rows deleted ({pruned.deliveries:,} deliveries + {pruned.events:,} events)",
            f"{rows / pruned.seconds:,.0f} rows/s", "", None, "", None)
    run.add("retention", f"  prune time, {pruned.batches:,} transactions; deliveries left", f"{pruned.seconds:.1f} s",
            f"{left} left", None, "all old rows gone", left == 0 and pruned.complete)
