"""Issue 12 benchmark rows: the digest (DIGEST_WINDOW_SECONDS) against window 0 in the same run.

- burst: 200 changes into a 50-member department, recorded at once, delivered by one `flask worker`:
  mails sent with the window 0 (every change to every member: 10,000) and with the window on (expected: 50
  at once, then one digest per member when the window ends: 100).
- isolated: one change at a time, each member's window long over (so every mail goes at once, through
  the whole digest path: recipient rows locked and reserved, windows pushed after the round), against
  window 0, for a small and a large department: the delivery path's time, CPU and database statements
  per change. The extra cost per change must stay within the noise of window 0.
"""
from __future__ import annotations

import time

import sqlalchemy as sa

from bench import harness as h
from bench.harness import say

BURST_CHANGES, BURST_MEMBERS = 200, 50


def _stop(worker: dict) -> None:
    worker["service"].stop()
    worker["engine"].dispose()


def _record(engine, userid: str) -> int:
    import wecom
    from store import recording

    xml = h.member_event(userid, h.DEPARTMENT)
    return recording.record_event(engine, xml, wecom.parse_event(xml), "pending")[0]


def _progress(engine) -> tuple[int, int]:
    """(events not yet expanded, events not yet done)."""
    from store import schema

    with engine.connect() as conn:
        by_status = dict(conn.execute(sa.select(schema.events.c.status, sa.func.count())
                                      .group_by(schema.events.c.status)).all())
    return by_status.get("pending", 0), sum(n for status, n in by_status.items() if status != "done")


def digest(run) -> None:
    from devtools.wecom_standin import make_members

    window = 10 if run.args.quick else 60
    run.standin.set_members(h.DEPARTMENT, make_members(BURST_MEMBERS, h.DEPARTMENT))
    burst: dict[int, dict] = {}
    for seconds in (0, window):
        with h.database(f"digest{seconds}") as url:
            worker = h.start_worker(url, run.standin.api_base, run.sink.port, BURST_MEMBERS,
                                    DIGEST_WINDOW_SECONDS=seconds)
            try:
                say(f"digest: {BURST_CHANGES} changes into {BURST_MEMBERS} members, window {seconds} s")
                run.sink.reset()
                started = time.monotonic()
                for i in range(BURST_CHANGES):
                    _record(worker["engine"], f"burst{i:04d}")
                recorded = time.monotonic() - started
                marks: dict[str, float] = {}

                def watch() -> bool:
                    unexpanded, unfinished = _progress(worker["engine"])
                    now = time.monotonic()
                    if seconds and "in_window" not in marks and now > started + seconds * 0.9:
                        marks["in_window"] = run.sink.count  # just before the first window ends
                    if not unexpanded:
                        marks.setdefault("expanded_s", now - started)
                    return not unfinished
                h.wait_for(watch, seconds * 10 + 120, 0.1, "the burst delivered")
                burst[seconds] = {"mails": run.sink.count, "in_window": marks.get("in_window"),
                                  "recorded_s": recorded, "expanded_s": marks["expanded_s"],
                                  "settled_s": time.monotonic() - started}
            finally:
                _stop(worker)
    run.raw["digest burst"] = burst
    expected = BURST_CHANGES * BURST_MEMBERS
    run.add("digest", f"{BURST_CHANGES} changes → {BURST_MEMBERS} members: mails, window 0",
            f"{burst[0]['mails']:,}", f"expected {expected:,}", None, "= 10,000", burst[0]["mails"] == expected)
    on = burst[window]
    # The worker expands the recorded changes one by one; a window that ends before the last one is
    # expanded lets one digest per member go, and what comes after waits for the next window.
    later_windows = int(on["expanded_s"] // window)
    allowed = BURST_MEMBERS * (2 + later_windows)
    run.add("digest", f"  mails, DIGEST_WINDOW_SECONDS={window}", f"{on['mails']:,}",
            f"window 0: {burst[0]['mails']:,}", on["mails"] / burst[0]["mails"],
            f"≤ {2 * BURST_MEMBERS} + {BURST_MEMBERS} per later window = {allowed}", on["mails"] <= allowed)
    run.add("digest", f"  of them within the first {window * 0.9:.0f} s (at once)", f"{on['in_window']}",
            f"{BURST_MEMBERS} members", None, f"≤ {2 * BURST_MEMBERS}", on["in_window"] <= 2 * BURST_MEMBERS)
    run.add("digest", "  burst recorded / all expanded / all delivered after",
            f"{on['recorded_s']:.1f} / {on['expanded_s']:.1f} / {on['settled_s']:.1f} s",
            f"window 0: {burst[0]['expanded_s']:.1f} / {burst[0]['settled_s']:.1f} s")
    for size in run.args.digest_sizes:
        _isolated(run, size)


def _isolated(run, size: int) -> None:
    """One change at a time through Worker.run_once() in this process (claim, expand, send, mark, settle,
    the digest check), every member's window over (the worker's clock moves on between changes): window 0
    against the digest path, best of --repeats after a warm-up. The SMTP sink and MariaDB run elsewhere."""
    import services
    from devtools.wecom_standin import make_members

    run.standin.set_members(h.DEPARTMENT, make_members(size, h.DEPARTMENT))
    best: dict[str, dict] = {}
    with h.database(f"iso{size}a") as url0, h.database(f"iso{size}b") as url1:
        workers = {}
        for label, url, window in (("window 0", url0, 0), ("digest on", url1, 60)):
            h.prepare_state(url)
            parts = services.build(h.settings_for(h.service_env(url, run.standin.api_base, run.sink.port,
                                                                DIGEST_WINDOW_SECONDS=window)))
            worker = parts.make_worker()
            shift = [0.0]
            worker.clock = lambda shift=shift: time.time() + shift[0]
            worker.ensure_snapshots()
            statements = [0]
            sa.event.listen(parts.engine, "before_cursor_execute",
                            lambda *args, counter=statements: counter.__setitem__(0, counter[0] + 1))
            workers[label] = (worker, shift, statements, parts)
        try:
            for attempt in range(run.args.repeats + 1):  # the first round of each is a warm-up
                say(f"digest: isolated change, {size} members, round {attempt + 1} of {run.args.repeats + 1}")
                for label, (worker, shift, statements, parts) in workers.items():
                    shift[0] += 3600  # an hour later: every member's window is long over
                    _record(parts.engine, f"iso{attempt}")
                    run.sink.reset()
                    counted, cpu, started = statements[0], time.process_time(), time.perf_counter()
                    if not worker.run_once():
                        raise RuntimeError(f"the worker found no event ({label})")
                    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
                    if not run.sink.wait(size, 30):
                        raise RuntimeError(f"the sink got {run.sink.count} of {size} mails ({label})")
                    measured = {"ms": elapsed * 1000, "cpu_ms": cpu * 1000, "statements": statements[0] - counted}
                    if attempt and measured["ms"] < best.get(label, {}).get("ms", 1e12):
                        best[label] = measured
        finally:
            for worker, _, _, parts in workers.values():
                worker.shutdown()
                parts.engine.dispose()
    run.raw[f"digest isolated {size}"] = best
    off, on = best["window 0"], best["digest on"]
    ratio = on["ms"] / off["ms"]
    run.add("digest", f"isolated change, {size} members: delivery path (claim to done), digest on",
            f"{on['ms']:.1f} ms", f"window 0: {off['ms']:.1f} ms", ratio, "within noise (≤ 1.15)", ratio <= 1.15)
    run.add("digest", "  the same as mails/s", f"{size / on['ms'] * 1000:.0f}/s",
            f"window 0: {size / off['ms'] * 1000:.0f}/s", off["ms"] / on["ms"])
    run.add("digest", "  extra per change: CPU of the delivering thread(s)", f"{on['cpu_ms'] - off['cpu_ms']:+.1f} ms",
            f"window 0: {off['cpu_ms']:.1f} ms", on["cpu_ms"] / off["cpu_ms"] if off["cpu_ms"] else None)
    run.add("digest", "  extra per change: db statements", f"{on['statements'] - off['statements']:+d}",
            f"window 0: {off['statements']}", on["statements"] / off["statements"] if off["statements"] else None)
