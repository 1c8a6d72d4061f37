"""What the bounces tell the admin, `check` and /metrics: reports by kind, bounced deliveries, unmatched
reports, whether the sender is blocked, suppressions per department and how the pattern guesses fare."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.schema import bounce_reports, deliveries, snapshot_members, suppressions

SENDER_BLOCKED_SECONDS = 24 * 3600  # the banner stays this long after the last "sender blocked" report
PATTERN_MIN_GUESSES = 5  # fewer guesses than this say nothing about EMAIL_PATTERN


def kinds_since(engine: Engine, since: float | None = None) -> dict[str, int]:
    """Stored reports (and refusals at send time) by kind, received since `since` (None: all)."""
    query = sa.select(bounce_reports.c.kind, sa.func.count()).group_by(bounce_reports.c.kind)
    if since is not None:
        query = query.where(bounce_reports.c.received_at >= since)
    with engine.connect() as conn:
        return {kind: n for kind, n in conn.execute(query)}


def sender_blocked(engine: Engine, now: float):
    """The latest report saying our sender is blocked, when within SENDER_BLOCKED_SECONDS: (received_at,
    reason, count in that time); else None."""
    since = now - SENDER_BLOCKED_SECONDS
    with engine.connect() as conn:
        row = conn.execute(sa.select(bounce_reports.c.received_at, bounce_reports.c.reason)
                           .where(bounce_reports.c.kind == "sender_blocked", bounce_reports.c.received_at >= since)
                           .order_by(bounce_reports.c.received_at.desc()).limit(1)).first()
        if row is None:
            return None
        total = conn.execute(sa.select(sa.func.count()).select_from(bounce_reports).where(
            bounce_reports.c.kind == "sender_blocked", bounce_reports.c.received_at >= since)).scalar_one()
    return row.received_at, row.reason, total


def reports(engine: Engine, kind: str | None = None, limit: int = 50) -> list:
    """The latest stored reports (of `kind`), without their raw text."""
    query = (sa.select(bounce_reports.c.id, bounce_reports.c.received_at, bounce_reports.c.source,
                       bounce_reports.c.kind, bounce_reports.c.delivery_id, bounce_reports.c.digest_id,
                       bounce_reports.c.address, bounce_reports.c.reason, bounce_reports.c.subject)
             .order_by(bounce_reports.c.received_at.desc(), bounce_reports.c.id.desc()).limit(limit))
    if kind is not None:
        query = query.where(bounce_reports.c.kind == kind)
    with engine.connect() as conn:
        return conn.execute(query).all()


def report(engine: Engine, report_id: int):
    """One stored report with its raw text, or None."""
    with engine.connect() as conn:
        return conn.execute(sa.select(bounce_reports).where(bounce_reports.c.id == report_id)).first()


def bounced_deliveries(engine: Engine, limit: int = 100) -> list:
    """The latest bounced deliveries: id, event, member, address, reason."""
    with engine.connect() as conn:
        return conn.execute(sa.select(deliveries.c.id, deliveries.c.event_id, deliveries.c.userid,
                                      deliveries.c.name, deliveries.c.address, deliveries.c.reason,
                                      deliveries.c.address_source)
                            .where(deliveries.c.status == "bounced")
                            .order_by(deliveries.c.id.desc()).limit(limit)).all()


def suppressed_by_department(engine: Engine, department_ids) -> dict[int, int]:
    """Per watched department: how many of its members (in the member snapshot) were last mailed at an address
    that is now suppressed."""
    query = (sa.select(snapshot_members.c.department_id, sa.func.count(sa.distinct(snapshot_members.c.userid)))
             .select_from(snapshot_members.join(deliveries, deliveries.c.userid == snapshot_members.c.userid)
                          .join(suppressions, suppressions.c.address == sa.func.lower(deliveries.c.address)))
             .where(snapshot_members.c.department_id.in_(list(department_ids)))
             .group_by(snapshot_members.c.department_id))
    with engine.connect() as conn:
        found = dict(conn.execute(query).all())
    return {d: found.get(d, 0) for d in department_ids}


def pattern_guesses(engine: Engine) -> tuple[int, int]:
    """(EMAIL_PATTERN guesses mailed, of them bounced hard): distinct addresses of `pattern`-sourced deliveries."""
    guessed = sa.and_(deliveries.c.address_source == "pattern", deliveries.c.status.in_(("sent", "bounced")))
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count(sa.distinct(deliveries.c.address))).where(guessed)).scalar_one()
        bounced = conn.execute(sa.select(sa.func.count(sa.distinct(deliveries.c.address))).where(
            guessed, deliveries.c.status == "bounced")).scalar_one()
    return total, bounced


def pattern_warning(total: int, bounced: int) -> str | None:
    """`EMAIL_PATTERN looks wrong: 41 of 50 guessed addresses bounced`, when most guesses bounced."""
    if total >= PATTERN_MIN_GUESSES and bounced * 2 > total:
        return (f"EMAIL_PATTERN looks wrong: {bounced} of {total} guessed addresses bounced; fix the pattern "
                "or import the real addresses (import-addresses)")
    return None
