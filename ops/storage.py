"""`check`'s line about the state database's size: the tables retention bounds, the oldest row kept, the last run."""
from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from delivery.retention import LEASE
from ops import report
from store import leases, retention


def retention_line(engine, settings) -> tuple[bool, str]:
    """RETENTION_DAYS and its last run, then each table's row count and oldest row kept; ✗ when the last
    run failed."""
    try:
        sizes = retention.table_sizes(engine)
        turn = leases.last_turn(engine, LEASE)
    except DBAPIError as exc:
        return False, f"retention: {exc.orig.__class__.__name__} reading the table sizes"
    tables = "; ".join(
        f"{size.table} {size.rows:,} row(s)" + ("" if size.oldest is None else
                                               f", oldest kept {report.local_time(size.oldest, settings.tz)}")
        for size in sizes)
    if settings.retention_days <= 0:
        return True, f"retention: off (RETENTION_DAYS=0 keeps every row, the tables grow); {tables}"
    rule = f"retention: finished events older than {settings.retention_days} day(s) are deleted hourly"
    if turn is None or turn.last_run_at is None:
        return True, f"{rule}, not run yet (the first delivery worker to start runs it); {tables}"
    when = report.local_time(turn.last_run_at, settings.tz)
    failed = (turn.last_outcome or "").startswith("failed")
    return not failed, f"{rule}, last run {when}: {turn.last_outcome or 'in progress'}; {tables}"
