"""What happened: recent events with delivery counts, one event's deliveries (reads only)."""
from __future__ import annotations

import time
from datetime import datetime, tzinfo

import sqlalchemy as sa

from ops import channel_report
from store.schema import address_book, deliveries, digests, events, leases, template_table

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def local_time(epoch: float | None, tz: tzinfo) -> str:
    """A stored time as the operator reads it: in TIMEZONE, to the second ('-' when unset)."""
    return datetime.fromtimestamp(epoch, tz).strftime(TIME_FORMAT) if epoch else "-"


def recent_events(engine, limit: int = 20, status: str | None = None,
                  delivery_status: str | None = None) -> list[dict]:
    """The newest events (optionally: with a delivery in `delivery_status`), each with delivery counts by status."""
    query = sa.select(events.c.id, events.c.change_type, events.c.user_id, events.c.status, events.c.reason,
                      events.c.received_at, events.c.attempts, events.c.next_attempt_at, events.c.source)
    if status:
        query = query.where(events.c.status == status)
    if delivery_status:
        query = query.where(sa.exists().where(deliveries.c.event_id == events.c.id,
                                              deliveries.c.status == delivery_status))
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query.order_by(events.c.id.desc()).limit(limit))]
        ids = [r["id"] for r in rows]
        counts: dict[int, dict[str, int]] = {i: {} for i in ids}
        if ids:
            for event_id, state, count in conn.execute(
                    sa.select(deliveries.c.event_id, deliveries.c.status, sa.func.count())
                    .where(deliveries.c.event_id.in_(ids)).group_by(deliveries.c.event_id, deliveries.c.status)):
                counts[event_id][state] = count
        held = dict(conn.execute(sa.select(deliveries.c.event_id, sa.func.min(deliveries.c.next_attempt_at))
                                 .where(deliveries.c.event_id.in_(ids), deliveries.c.status == "held")
                                 .group_by(deliveries.c.event_id)).all()) if ids else {}
    for row in rows:
        row["counts"] = counts[row["id"]]
        row["held_until"] = held.get(row["id"])  # when the first of its held deliveries goes (in a digest)
    return rows


def digest_summary(engine) -> dict:
    """What waits for a digest: held deliveries, for how many recipients, when the next digest is due."""
    with engine.connect() as conn:
        held = conn.execute(sa.select(sa.func.count()).select_from(deliveries)
                            .where(deliveries.c.status == "held")).scalar_one()
        recipients, next_at = conn.execute(sa.select(sa.func.count(sa.distinct(digests.c.address)),
                                                     sa.func.min(digests.c.due_at))
                                           .where(digests.c.status.in_(("collecting", "sending")))).one()
        problem = conn.execute(sa.select(digests.c.id, digests.c.reason)
                               .where(digests.c.status == "sent", digests.c.reason.is_not(None))
                               .order_by(digests.c.id.desc()).limit(1)).first()
    return {"held": held, "recipients": recipients, "next_at": next_at,
            "problem": f"digest {problem.id}: {problem.reason}" if problem else None}


def held_line(until: float | None, tz: tzinfo) -> str:
    """How an operator reads a held delivery's schedule."""
    return f"held for digest until {local_time(until, tz)}"


def event_deliveries(engine, event_id: int, status: str | None = None) -> list[dict]:
    """One event's deliveries, oldest first."""
    query = sa.select(deliveries).where(deliveries.c.event_id == event_id)
    if status:
        query = query.where(deliveries.c.status == status)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query.order_by(deliveries.c.id))]


def event_detail(engine, event_id: int) -> dict | None:
    """One event's row without its XML, or None."""
    query = sa.select(*(c for c in events.c if c.name not in ("xml", "dedup_key"))).where(events.c.id == event_id)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return None if row is None else dict(row._mapping)


def status_totals(engine) -> tuple[dict[str, int], dict[str, int]]:
    """(events by status, deliveries by status) over the whole outbox."""
    with engine.connect() as conn:
        by_event = dict(conn.execute(sa.select(events.c.status, sa.func.count()).group_by(events.c.status)).all())
        by_delivery = dict(conn.execute(sa.select(deliveries.c.status, sa.func.count())
                                        .group_by(deliveries.c.status)).all())
    return by_event, by_delivery


def template_rows(engine, table: str, app: str) -> list[dict]:
    """Every template row of `app` in the original table, by change type (only reads)."""
    t = template_table(table)
    query = (sa.select(t.c.change_type, t.c.email_title, t.c.email_body)
             .where(t.c.app == app).order_by(t.c.change_type))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def address_book_rows(engine, search: str = "", limit: int = 200) -> tuple[list[dict], int]:
    """Address-book rows whose userid contains `search` (stored lower case), and how many match in all."""
    where = []
    if search.strip():
        where.append(address_book.c.userid.contains(search.strip().lower(), autoescape=True))  # % and _ literal
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(address_book).where(*where)).scalar_one()
        rows = conn.execute(sa.select(address_book).where(*where).order_by(address_book.c.userid).limit(limit))
        return [dict(r._mapping) for r in rows], total


def limit_lines(engine, tz: tzinfo) -> list[str]:
    """Deliveries waiting for a sending limit (SMTP_MAX_PER_DAY or the provider's daily quota), if any."""
    with engine.connect() as conn:
        count, until = conn.execute(sa.select(sa.func.count(), sa.func.min(deliveries.c.next_attempt_at))
                                    .where(deliveries.c.status == "retry",
                                           deliveries.c.reason.like("%daily%"))).one()
    if not count:
        return []
    return [f"  {count} deliveries wait for a daily sending limit; the next goes at {local_time(until, tz)}"]


def reconciliation_summary(engine, days: float = 7) -> tuple[object | None, int]:
    """(the reconciliation lease row: last_run_at, runs, last_outcome; or None), and how many changes it
    found in the last `days` days that no callback had announced."""
    with engine.connect() as conn:
        turn = conn.execute(sa.select(leases).where(leases.c.name == "reconcile")).first()
        found = conn.execute(sa.select(sa.func.count()).select_from(events)
                             .where(events.c.source == "reconcile",
                                    events.c.received_at >= time.time() - days * 86400)).scalar_one()
    return turn, found


def status_lines(engine, tz: tzinfo, event_id: int | None = None, limit: int = 20) -> list[str]:
    """The text of `flask status`."""
    if event_id is not None:
        rows = event_deliveries(engine, event_id)
        if not rows:
            return [f"event {event_id}: no deliveries (unknown event, or not expanded yet)"]
        return [f"{r['id']:>8}  {r['status']:<8} {r['userid']:<20} {r['address'] or '-':<32} "
                f"attempts={r['attempts']} "
                f"{held_line(r['next_attempt_at'], tz) if r['status'] == 'held' else r['reason'] or ''}".rstrip()
                for r in rows]
    rows = recent_events(engine, limit)
    if not rows:
        return ["no events recorded yet"]
    lines = [f"{'id':>8}  {'received':<19}  {'change':<12} {'userid':<16} {'status':<8} deliveries"]
    for r in rows:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["counts"].items())) or "-"
        # reconcile: no callback ever came for it; test: a template test sent from /admin/templates
        source = f"  (source: {r['source']})" if r["source"] in ("reconcile", "test") else ""
        lines.append(f"{r['id']:>8}  {local_time(r['received_at'], tz)}  {r['change_type']:<12} {r['user_id']:<16} "
                     f"{r['status']:<8} {counts}{source}")
        if r["status"] in ("failed", "skipped") or (r["status"] == "pending" and r["attempts"]) or \
                (r["status"] == "ignored" and (r["reason"] or "").startswith("already announced")):
            lines.append(f"{'':>10}reason: {r['reason']}")
        if r["held_until"] is not None:
            lines.append(f"{'':>10}{r['counts']['held']} {held_line(r['held_until'], tz)}")
    lines.extend(limit_lines(engine, tz))
    failed = [d for r in rows if r["counts"].get("failed") for d in event_deliveries(engine, r["id"], "failed")]
    for d in failed[:20]:
        lines.append(f"  failed delivery {d['id']} (event {d['event_id']}) to {d['address']}: {d['reason']}")
    summary = digest_summary(engine)
    if summary["held"]:
        lines.append(f"digest: {summary['held']} deliveries held for {summary['recipients']} recipient(s), "
                     f"the next digest at {local_time(summary['next_at'], tz)}")
    if summary["problem"]:
        lines.append(f"digest: last problem: {summary['problem']}")
    lines.extend(channel_report.lines(engine))  # email and WeCom messages, when there are any of the latter
    return lines
