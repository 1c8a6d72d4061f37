"""`check` lines about the state database's size: the tables retention bounds, the oldest row kept, the last run."""
from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from delivery.retention import LEASE
from ops import report
from store import leases, retention


def retention_lines(engine, settings) -> list[tuple[bool, str]]:
    """One line per table (rows, oldest kept) and one for RETENTION_DAYS and its last run."""
    try:
        sizes = retention.table_sizes(engine)
        turn = leases.last_turn(engine, LEASE)
    except DBAPIError as exc:
        return [(False, f"retention: {exc.orig.__class__.__name__} reading the table sizes")]
    lines = []
    for size in sizes:
        oldest = ("empty" if size.oldest is None else
                  f"oldest kept {report.local_time(size.oldest, settings.tz)} ({settings.timezone})")
        lines.append((True, f"table {size.table}: {size.rows:,} row(s), {oldest}"))
    if settings.retention_days <= 0:
        lines.append((True, "retention: off (RETENTION_DAYS=0 keeps every row; the tables grow without bound)"))
        return lines
    rule = f"retention: finished events older than {settings.retention_days} day(s) are deleted hourly"
    if turn is None or turn.last_run_at is None:
        lines.append((True, f"{rule}; has not run yet (the first delivery worker to start runs it)"))
    else:
        when = report.local_time(turn.last_run_at, settings.tz)
        lines.append((not (turn.last_outcome or "").startswith("failed"),
                      f"{rule}; last run {when}: {turn.last_outcome or 'in progress'}"))
    return lines
