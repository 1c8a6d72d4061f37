"""/admin's status pages and actions: events, deliveries, retries and the address book."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from flask import abort, current_app, redirect, render_template, request, url_for

import services
import ops.admin.trail as trail
from ops import channel_report, report
from ops.admin.blueprint import MAX_ID, bp, choice as _choice, engine as _engine, log
from store import addressbook, outbox
from store.schema import DELIVERY_OPEN, DELIVERY_STATUSES, EVENT_OPEN, EVENT_STATUSES

REFRESH_WITHIN_SECONDS = 60  # the event page refreshes itself while something is due this soon


@bp.get("/")
def events():
    """Recent events with delivery counts; filter by event or delivery status."""
    status = _choice(request.args.get("status"), EVENT_STATUSES)
    delivery = _choice(request.args.get("delivery"), DELIVERY_STATUSES)
    limit = min(max(request.args.get("limit", 100, type=int), 1), 500)
    rows = report.recent_events(_engine(), limit, status, delivery)
    by_event, by_delivery = report.status_totals(_engine())
    return render_template("admin/events.html", rows=rows, by_event=by_event, by_delivery=by_delivery,
                           digest=report.digest_summary(_engine()),
                           channels=channel_report.totals(_engine()),
                           channel_problems=channel_report.problems(_engine()),
                           status=status, delivery=delivery, limit=limit, requeued=_requeued(),
                           event_statuses=EVENT_STATUSES, delivery_statuses=DELIVERY_STATUSES)


@bp.get(f"/events/<int(max={MAX_ID}):event_id>")
def event(event_id: int):
    """One event: its state, the message it sends, and each delivery with reason and schedule."""
    row = report.event_detail(_engine(), event_id)
    if row is None:
        abort(404)
    status = _choice(request.args.get("status"), DELIVERY_STATUSES)
    rows = report.event_deliveries(_engine(), event_id, status)
    counts = outbox.delivery_counts(_engine(), event_id)
    held_until = min((d["next_attempt_at"] for d in rows if d["status"] == "held"), default=None)
    return render_template("admin/event.html", event=row, deliveries=rows, counts=counts, status=status,
                           delivery_statuses=DELIVERY_STATUSES, requeued=_requeued(), held_until=held_until,
                           refresh=_due_soon(row, rows), open_statuses=DELIVERY_OPEN)


def _due_soon(event: dict, deliveries: list[dict]) -> bool:
    """Refresh while the event is open and due soon: also in the moment its last delivery is marked and the
    event itself not yet done."""
    soon = time.time() + REFRESH_WITHIN_SECONDS
    if event["status"] in EVENT_OPEN and event["next_attempt_at"] <= soon:
        return True
    return any(d["status"] in (*DELIVERY_OPEN, "held") and d["next_attempt_at"] <= soon for d in deliveries)


def _requeued() -> tuple[int, int] | None:
    events_, deliveries = request.args.get("requeued_events", type=int), request.args.get("requeued", type=int)
    return None if deliveries is None else (events_ or 0, deliveries)


@bp.post(f"/events/<int(max={MAX_ID}):event_id>/retry")
def retry_event(event_id: int):
    """Requeue this event's failed deliveries (or the event itself, if it failed before any)."""
    n_events, n_deliveries = outbox.requeue(_engine(), event_id)
    _wake_worker()
    log.info("admin requeued event %s: %d event(s), %d delivery(ies)", event_id, n_events, n_deliveries)
    trail.record("retry", target=f"event {event_id}", detail=f"{n_events} event(s), {n_deliveries} delivery(ies)")
    return redirect(url_for("admin.event", event_id=event_id, requeued_events=n_events, requeued=n_deliveries))


@bp.post("/retry-failed")
def retry_failed():
    """Requeue every failed delivery and failed event."""
    n_events, n_deliveries = outbox.requeue(_engine())
    _wake_worker()
    log.info("admin requeued all failed: %d event(s), %d delivery(ies)", n_events, n_deliveries)
    trail.record("retry", target="all failed", detail=f"{n_events} event(s), {n_deliveries} delivery(ies)")
    return redirect(url_for("admin.events", requeued_events=n_events, requeued=n_deliveries))


def _wake_worker() -> None:
    services.of(current_app).wake_worker()


@bp.get("/addresses")
def addresses():
    """The address book, searchable by userid."""
    return _addresses_page()


@bp.post("/addresses/import")
def import_addresses():
    """Load an uploaded userid,email CSV into the address book and show the counts."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        return _addresses_page(error="请选择 CSV 文件 Choose a CSV file first"), 400
    shown_name = Path(upload.filename).name[:100]
    with tempfile.TemporaryDirectory(prefix="wecom-mailer-upload-") as folder:
        path = str(Path(folder) / "upload.csv")
        upload.save(path)
        try:
            result = addressbook.import_csv(_engine(), path)
        except ValueError as exc:  # the message names our temporary path: show the user's file name
            return _addresses_page(error=str(exc).replace(path, shown_name)), 400
    log.info("admin imported %s: %d added, %d updated, %d rejected", shown_name, result.added, result.updated,
             result.rejected)
    trail.record("import-addresses", target=shown_name,
                 detail=f"{result.added} added, {result.updated} updated, {result.rejected} rejected")
    return _addresses_page(result=result, file_name=shown_name)


def _addresses_page(**extra):
    search = request.args.get("q", "").strip()[:64]
    rows, total = report.address_book_rows(_engine(), search)
    return render_template("admin/addresses.html", rows=rows, total=total, q=search, **extra)
