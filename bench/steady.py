"""Bounded growth (issue 23): the tables under a steady load over many days, with RETENTION_DAYS on.

Weeks cannot pass in a benchmark, so days are simulated. Each simulated day, the real service (gunicorn
`app:create_app()` and a `flask worker`, both on one MariaDB database) answers the same load of signed callbacks
and delivers it through the sink, with the per-recipient digest on; once nothing is open, the run prunes as the
worker does (`delivery.retention.run`, the function its Pruner calls hourly) and counts every table's rows. Then a
day passes for the database: every timestamp of every table moves 86,400 s back (the processes' own clocks stay
where they are). With RETENTION_DAYS=D the events, deliveries and digests must level off at about D + 1 days'
worth of rows, and no other table may keep growing with the load.
"""
from __future__ import annotations

import time

import sqlalchemy as sa

from bench import harness as h

DAY = 86400
MEMBERS = 20
# Each member changes once a day, one hire joins, yesterday's leaves: 22 changes in the watched department, each
# to every member, and as many outside it. (Two changes of one person in the same second share a dedup key.)
EVENTS_PER_DAY = MEMBERS + 2
RETENTION = 5
DIGEST_WINDOW = 2  # seconds: a member's first change of a day goes alone, the others in one digest
BOUNDED = ("wm_events", "wm_deliveries", "wm_digests")


def _a_days_changes(day: int) -> list[tuple[str, int, str]]:
    """What a corp's day looks like: one hire joins the department and yesterday's leaves, its members'
    details change, and as many changes happen outside it (recorded, then ignored by scope)."""
    changes = [(f"hire{day:03d}", h.DEPARTMENT, "create_user")]
    if day:
        changes.append((f"hire{day - 1:03d}", h.DEPARTMENT, "delete_user"))
    changes += [(f"user{i:04d}", h.DEPARTMENT, "update_user") for i in range(1, MEMBERS + 1)]
    return changes + [(f"other{day:03d}x{i:03d}", h.OTHER_DEPARTMENT, "update_user") for i in range(EVENTS_PER_DAY)]


def _open_rows(engine) -> int:
    """Rows the service has not finished with (nothing may be aged or pruned before it is 0)."""
    from store import schema

    with engine.connect() as conn:
        return sum(conn.execute(sa.select(sa.func.count()).select_from(table).where(table.c.status.in_(open_))).scalar()
                   for table, open_ in ((schema.events, schema.EVENT_OPEN + ("held",)),
                                        (schema.deliveries, schema.DELIVERY_OPEN + ("held",)),
                                        (schema.digests, schema.DIGEST_OPEN)))


def _counts(engine) -> dict[str, int]:
    from store import schema

    with engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
                for t in schema.metadata.sorted_tables}


def _a_day_passes(engine) -> None:
    """Every time column of every table one day earlier (0 and NULL, 'never', stay as they are)."""
    from store import schema

    with engine.begin() as conn:
        for table in schema.metadata.sorted_tables:
            columns = [c for c in table.columns if type(c.type).__name__ == "Double"]
            if columns:
                conn.execute(table.update().values(
                    {c.name: sa.case((c > 0, c - DAY), else_=c) for c in columns}))


def _statuses(engine) -> dict[str, int]:
    from store import schema

    with engine.connect() as conn:
        return dict(conn.execute(sa.select(schema.deliveries.c.status, sa.func.count())
                                 .group_by(schema.deliveries.c.status)).all())


def section(run) -> None:
    """The `steady` rows of bench/run.py."""
    from delivery import retention
    from devtools.wecom_standin import make_members
    from store import db

    days = run.args.steady_days
    run.standin.set_members(h.DEPARTMENT, make_members(MEMBERS, h.DEPARTMENT))
    with h.database("steady") as url:
        overrides = {"RETENTION_DAYS": RETENTION, "DIGEST_WINDOW_SECONDS": DIGEST_WINDOW}
        worker = h.start_worker(url, run.standin.api_base, run.sink.port, MEMBERS, **overrides)
        env = h.service_env(url, run.standin.api_base, run.sink.port, **overrides)
        settings = h.settings_for(env)
        engine = db.make_engine(url)
        port = h.free_port()
        history, recorded, started = [], [], time.monotonic()
        try:
            with h.Service.gunicorn("app:create_app()", env, port, "steady-web"):
                for day in range(days):
                    poster = h.Poster(port)  # a new connection each day: the last one idled past keep-alive
                    for user_id, department, change in _a_days_changes(day):
                        poster.post(*h.signed(h.member_event(user_id, department, change)))
                    poster.close()
                    h.wait_for(lambda: _open_rows(engine) == 0, 120, 0.1, f"day {day + 1}'s deliveries")
                    statuses = _statuses(engine)
                    if set(statuses) - {"sent"}:
                        raise RuntimeError(f"day {day + 1}: deliveries not all sent: {statuses}")
                    recorded.append(_counts(engine))
                    pruned = retention.run(settings, engine, "bench-steady", interval=0.0)
                    history.append(_counts(engine))
                    if day % 5 == 4 or day == days - 1:
                        h.say(f"steady: day {day + 1}/{days}: " + ", ".join(
                            f"{name[3:]} {history[-1][name]:,}" for name in BOUNDED)
                            + f"; pruned {pruned.summary() if pruned else 'nothing (lease taken)'}")
                    _a_day_passes(engine)
        finally:
            worker["service"].stop()
            worker["engine"].dispose()
            engine.dispose()
    _rows(run, history, recorded, time.monotonic() - started)


def _rows(run, history: list[dict[str, int]], recorded: list[dict[str, int]], seconds: float) -> None:
    """Bounded: after the first prune that deletes a day, no table trends upward (the mean of the last third of
    the days within 10 % of the first third's) and none exceeds its size on that day by more than 20 %."""
    days = len(history)
    settled = RETENTION + 2  # the first day whose prune deletes a whole day
    plateau = history[settled - 1:]
    third = max(1, len(plateau) // 3)
    run.add("steady", f"{days} simulated days of {EVENTS_PER_DAY}+{EVENTS_PER_DAY} callbacks to {MEMBERS} members, "
            f"RETENTION_DAYS={RETENTION}", f"{seconds:.0f} s", "", None)
    sent = 0
    for name in BOUNDED:
        # Without retention every row recorded would still be there: each day's growth before its prune, summed.
        kept_without = recorded[0][name] + sum(recorded[d][name] - history[d - 1][name] for d in range(1, days))
        sent = kept_without if name == "wm_deliveries" else sent
        top = max(day[name] for day in plateau)
        early = sum(day[name] for day in plateau[:third]) / third
        late = sum(day[name] for day in plateau[-third:]) / third
        run.add("steady", f"  {name}: rows on day {settled} / day {days} (most in between)",
                f"{plateau[0][name]:,} / {plateau[-1][name]:,} ({top:,})", f"{kept_without:,} kept without",
                plateau[-1][name] / kept_without, "flat: ≤ +10 % trend, ≤ +20 % peak",
                late <= 1.1 * early and top <= 1.2 * plateau[0][name])
    growing = sorted(name for name in history[-1]
                     if name not in BOUNDED and history[-1][name] > history[settled - 1][name])
    run.add("steady", f"  other tables that grew after day {settled}", ", ".join(growing) or "none", "", None,
            "none", not growing)
    run.add("steady", "  deliveries, every one sent (a day stops the run otherwise)", f"{sent:,}", "", None)
    run.raw["steady counts by day"] = history
