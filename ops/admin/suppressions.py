"""/admin/suppressions: suppressed addresses (with a remove button), bounced deliveries, unmatched reports,
one stored report's text; and the banner on every admin page while the sender is blocked."""
from __future__ import annotations

import time

from flask import abort, redirect, render_template, request, url_for
from sqlalchemy.exc import DBAPIError

from ops.admin.blueprint import MAX_ID, bp, engine as _engine, log
import ops.admin.trail as trail
from store import bounce_stats, suppressions
from store.schema import BOUNCE_KINDS

WEEK = 7 * 86400


@bp.context_processor
def sender_blocked_banner():
    """`sender_blocked` for base.html: (when, reason, count) while the sender is blocked, else None."""
    try:
        return {"sender_blocked": bounce_stats.sender_blocked(_engine(), time.time())}
    except DBAPIError:  # the page itself says the database is down; the banner is not worth a second error
        return {"sender_blocked": None}


@bp.get("/suppressions")
def suppressions_page():
    """Suppressed addresses, bounced deliveries and unmatched reports."""
    kind = request.args.get("kind") if request.args.get("kind") in BOUNCE_KINDS else "unmatched"
    return render_template("admin/suppressions.html", suppressed=suppressions.listing(_engine(), 500),
                           bounced=bounce_stats.bounced_deliveries(_engine()), kind=kind,
                           reports=bounce_stats.reports(_engine(), kind, 100), kinds=BOUNCE_KINDS,
                           week=bounce_stats.kinds_since(_engine(), time.time() - WEEK),
                           removed=request.args.get("removed", "")[:320])


@bp.post("/suppressions/remove")
def remove_suppression():
    """Lift one suppression: the address is mailed again from the next event on (audited)."""
    address = suppressions.normal(request.form.get("address", ""))[:320]
    if not address or not suppressions.remove(_engine(), address):
        abort(404, "no such suppressed address")
    trail.record("suppression-remove", target=address)
    log.info("admin lifted the suppression of %s", address)
    return redirect(url_for("admin.suppressions_page", removed=address))


@bp.get(f"/bounce-reports/<int(max={MAX_ID}):report_id>")
def bounce_report(report_id: int):
    """One stored report as received (cut at 256 KB), shown as text."""
    row = bounce_stats.report(_engine(), report_id)
    if row is None:
        abort(404)
    return render_template("admin/bounce_report.html", report=row)
