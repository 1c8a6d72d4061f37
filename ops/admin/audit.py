"""/admin/audit: the audit log, newest first, filterable by actor and action; read only (nothing here edits it)."""
from __future__ import annotations

from flask import render_template, request

from ops.admin.blueprint import bp, engine
from store import audit

ACTIONS = ("sign-in", "sign-in-refused", "sign-out", "sign-out-everywhere", "retry", "import-addresses",
           "template-save", "template-rollback", "template-test-send", "seed-templates", "suppression-remove",
           "admin-unlock", "rotate-secret")


@bp.get("/audit")
def audit_page():
    """Who did what, when and from where; ?actor= and ?action= narrow it."""
    actor = request.args.get("actor", "").strip()[:64] or None
    action = request.args.get("action", "").strip()[:32] or None
    limit = min(max(request.args.get("limit", 200, type=int), 1), 1000)
    rows = audit.entries(engine(), actor=actor, action=action, limit=limit)
    return render_template("admin/audit.html", rows=rows, actor_filter=actor or "", action_filter=action or "",
                           limit=limit, actions=ACTIONS)
