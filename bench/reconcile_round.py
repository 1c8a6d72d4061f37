"""Issue 13 benchmark: what one reconciliation round costs for a large department, and whether it delays the
deliveries of an event that arrives while it runs (`bench/run.py --only reconcile`).

In this process, as in a `flask worker`: the delivery loop in its thread, the round in a thread of its own
(named as the service names it, so bench/instrumented.py counts its statements apart), state in MariaDB,
mail to bench/sink.py (its own process). The WeCom stand-in serves from this process too, but from
pre-serialised answers: what a listing costs here is mostly the client's share, as against real WeCom.
"""
from __future__ import annotations

import dataclasses
import statistics
import threading
import time

from bench import harness as h
from bench.harness import say
from bench import instrumented

BIG, SMALL = h.DEPARTMENT, 3  # the reconciled department; the department of the concurrent event


def reconcile(run) -> None:
    """Rows: seed round, steady round (nothing changed) against the listing alone, a round announcing
    changes, and a concurrent event's time to its last mail, alone and during a round."""
    import config
    import services
    from devtools.wecom_standin import make_members
    from ops import metrics
    from delivery import reconcile as rec
    from delivery.worker import Worker
    from store import recording
    import wecom

    size, small, repeats = run.args.reconcile_size, run.args.reconcile_event_size, max(3, run.args.repeats)
    members = make_members(size, BIG)
    run.standin.set_members(BIG, members)
    run.standin.set_members(SMALL, [dict(m, department=[SMALL]) for m in make_members(small, SMALL, prefix="evt")])
    instrumented.install()  # counts every statement of this process by thread kind
    with h.database("reconcile") as url:
        h.prepare_state(url)
        env = h.service_env(url, run.standin.api_base, run.sink.port, WECOM_DEPARTMENT_ID=f"{BIG},{SMALL}",
                            RECONCILE_SECONDS="0")  # the loop runs no round itself: this benchmark does
        settings = config.from_env(env)
        parts = services.build(settings)
        worker = Worker(settings, parts.engine, parts.engine, parts.wecom_client(), metrics.Recorder())
        client = parts.wecom_client()
        round_settings = dataclasses.replace(settings, reconcile_seconds=60.0)
        clock = [time.time()]

        def one_round() -> tuple[float, dict, object]:
            """A round on its own thread, one interval after the previous: seconds, statements, report."""
            result = {}

            def body():
                result["report"] = rec.run_round(round_settings, parts.engine, client, worker.owner, now=clock[0])
            before = dict(instrumented._counts)
            thread = threading.Thread(target=body, name="wecom-mailer-reconcile")
            started = time.perf_counter()
            thread.start()
            thread.join(300)
            seconds = time.perf_counter() - started
            clock[0] += 60.0
            after = dict(instrumented._counts)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if "reconcile" in k}
            return seconds, delta, result["report"]

        def statements(delta: dict) -> tuple[int, int]:
            stmts = sum(v for k, v in delta.items() if k.startswith("stmt."))
            return stmts, stmts + sum(v for k, v in delta.items() if not k.startswith("stmt."))

        say(f"reconcile: seeding a {size:,}-member department")
        seed_s, seed_delta, report = one_round()
        assert report and report.seeded == [BIG, SMALL], report
        listing = []
        for _ in range(repeats):
            started = time.perf_counter()
            client.list_members([BIG])
            listing.append(time.perf_counter() - started)
        steady, steady_delta = [], {}
        for _ in range(repeats):
            seconds, steady_delta, report = one_round()
            assert report.announced == [] and not report.failed, report
            steady.append(seconds)
        changed = make_members(size - 10, BIG) + make_members(10, BIG, prefix="new")  # 10 leave, 10 join
        run.standin.set_members(BIG, changed)
        one_round()  # the first listing that shows them
        change_s, change_delta, report = one_round()
        assert len(report.announced) == 20, report
        with parts.engine.begin() as conn:  # mailing 10,000 members about them is not this benchmark's concern
            conn.exec_driver_sql("UPDATE wm_events SET status = 'ignored' WHERE source = 'reconcile'")

        say(f"reconcile: a {small}-member event alone and during a round, {repeats * 2} times each")
        worker.start()
        alone, during, first_alone, first_during = [], [], [], []
        try:
            for attempt in range(repeats * 2):
                for concurrent in (False, True):
                    run.sink.reset()
                    # An update of a member of the small department (a distinct one each time: same second,
                    # same member would be the same event to the dedup key).
                    xml = h.member_event(f"evt{attempt * 2 + int(concurrent) + 1:04d}", SMALL)
                    thread = None
                    if concurrent:
                        thread = threading.Thread(target=one_round, name="bench-round-driver")
                        thread.start()
                    started = time.monotonic()
                    recording.record_event(parts.engine, xml, wecom.parse_event(xml), "pending")
                    worker.wakeup.set()
                    if not run.sink.wait(small, 60):
                        raise RuntimeError(f"the sink got {run.sink.count} of {small} mails")
                    _, _, first, last = run.sink.snapshot()
                    (during if concurrent else alone).append(last - started)
                    (first_during if concurrent else first_alone).append(first - started)
                    if thread is not None:
                        thread.join(300)
                    time.sleep(0.2)  # the event's last marks and its summary, before the next one
        finally:
            worker.shutdown()
            parts.engine.dispose()

    median = statistics.median
    stmts, trips = statements(steady_delta)
    seed_stmts, _ = statements(seed_delta)
    change_stmts, change_trips = statements(change_delta)
    run.raw["reconcile"] = {"size": size, "seed_s": seed_s, "listing_s": listing, "steady_s": steady,
                            "change_s": change_s, "steady_counts": steady_delta, "change_counts": change_delta,
                            "alone_s": alone, "during_s": during, "first_alone_s": first_alone,
                            "first_during_s": first_during}
    run.add("reconcile", f"{size:,} members: seed round (first listing)", f"{seed_s * 1000:.0f} ms",
            f"{seed_stmts} statements")
    run.add("reconcile", f"{size:,} members: steady round, median of {repeats}", f"{median(steady) * 1000:.0f} ms",
            f"listing alone {median(listing) * 1000:.0f} ms", median(steady) / median(listing))
    run.add("reconcile", "  db statements per steady round", f"{stmts}", f"round trips {trips}")
    run.add("reconcile", f"{size:,} members: round announcing 10 joins and 10 leaves", f"{change_s * 1000:.0f} ms",
            f"{change_stmts} statements, {change_trips} round trips")
    noise = max(alone) - min(alone)
    delay = median(during) - median(alone)
    run.add("reconcile", f"{small}-member event: time to the last mail, during a round (median)",
            f"{median(during) * 1000:.0f} ms", f"alone {median(alone) * 1000:.0f} ms",
            median(during) / median(alone), "delay ≤ noise (spread of alone)", delay <= noise)
    run.add("reconcile", "  delay / noise (max − min of the alone runs)", f"{delay * 1000:+.0f} ms",
            f"{noise * 1000:.0f} ms")
    run.add("reconcile", "  time to the first mail, during / alone (median)",
            f"{median(first_during) * 1000:.0f} ms", f"{median(first_alone) * 1000:.0f} ms",
            median(first_during) / median(first_alone))
