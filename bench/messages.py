"""Issue 21 benchmark rows: one event to a 10,000-member department with WECOM_MESSAGE=only, against the WeCom
stand-in behind a LatencyProxy (20 ms round trip), beside the email fan-out of the same department (the same
deployment with WECOM_MESSAGE=off, its mail going to the sink).

- message/send calls for the event (target: ⌈N / 1000⌉) and every WeCom API call the event cost;
- time from the callback's POST to the last accepted message/send call (the stand-in stamps each call when it
  has recorded it), against the time from the same POST to the last mail at the sink.
"""
from __future__ import annotations

import math
import time

import sqlalchemy as sa

from bench import harness as h

AGENT_ID, APP_SECRET = 1000002, "bench-app-secret-0123456789abcdef"
RTT = 0.02


def messages(run) -> None:
    """The rows: WECOM_MESSAGE=only, then the email fan-out of the same department, on fresh databases."""
    from devtools.latency_proxy import LatencyProxy
    from devtools.wecom_standin import make_members

    size = run.args.message_size
    run.standin.set_members(h.DEPARTMENT, make_members(size, h.DEPARTMENT))
    run.standin.enable_app(AGENT_ID, APP_SECRET)
    upstream = ("127.0.0.1", int(run.standin.api_base.split(":")[2].split("/")[0]))
    results = {}
    with LatencyProxy(upstream, rtt=RTT) as proxy:
        api_base = f"http://127.0.0.1:{proxy.port}/cgi-bin/"
        for mode in ("only", "off"):
            results[mode] = _one_event(run, api_base, size, mode)
    run.raw["messages"] = results
    only, off = results["only"], results["off"]
    calls_target = math.ceil(size / 1000)
    run.add("msgs", f"{size} members, WECOM_MESSAGE=only: message/send calls", f"{only['message_calls']}",
            f"⌈N/1000⌉ = {calls_target}", None, f"≤ {calls_target}", only["message_calls"] <= calls_target)
    run.add("msgs", "  every WeCom API call of the event (20 ms round trip)", f"{only['api_calls']}",
            f"email: {off['api_calls']}", None)
    run.add("msgs", "  callback to the last accepted message/send", f"{only['last_s']:.2f} s",
            f"email {off['last_s']:.2f} s", only["last_s"] / off["last_s"] if off["last_s"] else None)
    run.add("msgs", "  members reached once each", f"{only['reached']}", f"{size}", None, f"= {size}",
            only["reached"] == size)


def _one_event(run, api_base: str, size: int, mode: str) -> dict:
    from store import db, schema

    standin = run.standin
    with h.database(f"msg{mode}") as url:
        h.prepare_state(url)
        env = h.service_env(url, api_base, run.sink.port, WORKER_IN_WEB="true", WECOM_MESSAGE=mode,
                            WECOM_AGENT_ID=AGENT_ID, WECOM_APP_SECRET=APP_SECRET)
        port = h.free_port()
        print(f"[{time.strftime('%H:%M:%S')}] messages: {size} members, WECOM_MESSAGE={mode}, "
              f"gunicorn on :{port}", flush=True)
        with h.Service.gunicorn("app:create_app()", env, port, f"messages-{mode}"):
            engine = db.make_engine(url)
            snapshot = sa.select(schema.department_snapshots.c.member_count)
            h.wait_for(lambda: h.scalar(engine, snapshot) == size, 120, 0.1, "the member snapshot")
            time.sleep(0.5)
            calls_before, api_before = len(standin.message_calls), sum(standin.calls.values())
            delivered_before = len(standin.delivered)
            run.sink.reset()
            poster = h.Poster(port)
            started = time.monotonic()
            poster.post(*h.signed(h.member_event("user0001", h.DEPARTMENT)))
            event = sa.select(schema.events.c.status).where(schema.events.c.user_id == "user0001")
            h.wait_for(lambda: h.scalar(engine, event) == "done", 120, 0.02, "the event to finish")
            poster.close()
            calls = standin.message_calls[calls_before:]
            if mode == "only":
                last = max(c["at"] for c in calls) - started
            else:
                run.sink.wait(size, 30)
                last = run.sink.snapshot()[3] - started
            reached = len({u for u, _ in standin.delivered[delivered_before:]})
            result = {"message_calls": len(calls), "api_calls": sum(standin.calls.values()) - api_before,
                      "last_s": last, "reached": reached if mode == "only" else run.sink.count}
            engine.dispose()
    return result
