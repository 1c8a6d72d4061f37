"""From a recorded event to delivery rows: scope → template → members → addresses → one row per recipient."""
from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError

import templates_repo
import wecom
import wecom_api
from delivery import announced, digest
from store import addressbook, outbox
from store.snapshots import load_snapshots

log = logging.getLogger("wecom_mailer.worker")


def expand(worker, row) -> bool:
    """Decide scope, render, list members and write deliveries; False when the event ends here."""
    settings = worker.settings
    try:
        change = wecom.parse_event(row.xml)
    except wecom.CallbackRejected as exc:  # e.g. XML cut short by schema 1's 64 KB column: it never will parse
        return worker.finish(row, "failed", f"stored event XML does not parse: {exc.reason}")
    touched = touched_departments(worker, change, row)
    # One announcement per change: a callback marks the announced membership, and notifies no department
    # where reconciliation announced the same change first.
    touched, already = announced.record_callback(worker, row, change, touched)
    if not touched:
        return worker.finish(row, "ignored", announced.ignored_reason(already, settings.tz))
    try:
        template = templates_repo.load_template(worker.template_engine, settings.template_table,
                                                settings.template_app, change.change_type)
    except DBAPIError as exc:
        return worker.postpone(row, f"template database unavailable ({exc.orig.__class__.__name__})")
    if template is None:
        return worker.finish(row, "skipped", f"no template for change_type {change.change_type!r} "
                                             f"(app {settings.template_app!r} in {settings.template_table})")
    try:
        members_by_department = worker.client.list_members(touched, settings.fetch_child)
    except wecom_api.WeComError as exc:
        if exc.permanent:
            return worker.finish(row, "failed", str(exc))
        return worker.postpone(row, str(exc))
    worker.refresh_snapshots(members_by_department)
    members = list({m.userid: m for ms in members_by_department.values() for m in ms}.values())
    name_fallback = next((m.name for m in members if m.userid == change.user_id), "")
    try:
        subject, body = templates_repo.render_email(template, change, settings.tz, name_fallback)
    except templates_repo.RenderError as exc:
        return worker.finish(row, "failed", f"template error: {exc}")
    try:
        chosen = addressbook.choose(settings, worker.engine, members)
    except DBAPIError as exc:
        return worker.postpone(row, f"address book unavailable ({exc.orig.__class__.__name__})")
    # Skipped with `no address` or `address suppressed: …` (the WeCom message fallback keys on both).
    rows = [{"userid": c.member.userid[:64], "name": c.member.name[:255], "address": c.address,
             "address_source": c.source, "status": "pending" if c.address else "skipped", "reason": c.reason}
            for c in chosen]
    # With the digest on, each recipient's row goes at once or is held, decided in the same transaction.
    if not outbox.expand_event(worker.engine, row.id, worker.owner, subject, body, rows, now=worker.clock(),
                               hold=digest.hold_for(worker)):
        log.warning("event %s: lease lost while expanding; another worker has it", row.id)
        return False
    return True


def touched_departments(worker, change, row) -> list[int]:
    """The watched departments this change concerns (NOTIFY_SCOPE), from the event and the snapshot."""
    watched = worker.settings.department_ids
    if not change.is_member_change:
        return []
    if worker.settings.notify_scope == "corp":
        return list(watched)
    if row.source == "reconcile":  # exactly the departments whose listings confirmed it
        return [d for d in watched if str(d) in row.departments.split(",")]
    userids = {change.user_id, change.fields.get("newuserid", "")} - {""}
    snapshots = load_snapshots(worker.engine, watched, userids)
    touched = []
    for department_id in watched:
        covered, members = snapshots.get(department_id, ({department_id}, set()))
        if covered & set(change.departments) or userids & members:
            touched.append(department_id)
    return touched
