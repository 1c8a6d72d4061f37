"""/admin: events, deliveries, retries, templates and the address book for the IT team, behind ADMIN_TOKEN."""
from __future__ import annotations

import hmac
import logging
import secrets
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, g, redirect, render_template, request, url_for
from sqlalchemy.exc import DBAPIError

import config
import services
import templates_repo
import wecom
from ops import login_throttle, metrics, report, sessions
from store import addressbook, outbox
from store.schema import DELIVERY_OPEN, DELIVERY_STATUSES, EVENT_OPEN, EVENT_STATUSES

log = logging.getLogger("wecom_mailer.admin")
bp = Blueprint("admin", __name__, url_prefix="/admin")  # pages: templates/admin/ beside app.py

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_ID = 2**63 - 1  # ids are BIGINT; a larger number in a URL is a 404, not an overflow in the driver
LABELS = {"pending": "待处理", "sending": "发送中", "done": "完成", "failed": "失败", "skipped": "跳过",
          "ignored": "忽略", "retry": "待重试", "sent": "已发送", "held": "待汇总"}
SAMPLE = {"userid": "zhangsan", "name": "张三", "create_time": 1700000000}  # 2023-11-15 06:13:20 Asia/Shanghai
REFRESH_WITHIN_SECONDS = 60  # the event page refreshes itself while something is due this soon


def init_app(app) -> None:
    """Mount /admin only when ADMIN_TOKEN is set: otherwise every /admin URL is a plain 404."""
    if services.of(app).settings.admin_token:
        app.register_blueprint(bp)


# --- login, sessions and CSRF ----------------------------------------------------------------

def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _safe_next(target: str | None) -> str | None:
    """Only a path inside /admin, in printable ASCII: never an open redirect, never a header break."""
    if not target or len(target) > 2048 or not target.isascii() or not target.isprintable():
        return None
    if target.startswith("//") or "\\" in target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not (parts.path == "/admin" or parts.path.startswith("/admin/")):
        return None
    return target


def _client() -> str:
    """The client address failures are counted under (behind TRUSTED_PROXIES: the one they report)."""
    return login_throttle.client_key(request.remote_addr)


@bp.before_request
def require_login():
    """Every page but the login form needs a live session; every POST needs the session's CSRF token."""
    request.max_content_length = MAX_UPLOAD_BYTES
    g.admin_session = sessions.current()
    if request.endpoint == "admin.login":
        return None
    if g.admin_session is None:
        wanted = _safe_next(request.full_path.rstrip("?")) if request.method == "GET" else None
        return redirect(url_for("admin.login", next=wanted))
    if request.method == "POST" and not _same(request.form.get("csrf_token", ""), g.admin_session.csrf):
        abort(400, "missing or wrong CSRF token: reload the page and try again")
    return None


@bp.after_request
def protect(response):
    """No caching, no framing, no scripts: the pages are plain HTML with inline CSS."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'unsafe-inline'; "
                                                   "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


@bp.errorhandler(DBAPIError)
def database_unavailable(exc):
    log.error("admin page: state database error (%s)", exc.orig.__class__.__name__)
    return render_template("admin/error.html", message="状态数据库不可用 State database unavailable: "
                                                       + exc.orig.__class__.__name__), 503


@bp.context_processor
def helpers():
    return {"csrf_token": g.admin_session.csrf if g.get("admin_session") else "",
            "signed_in": bool(g.get("admin_session")), "when": _when, "label": _label,
            "timezone": _settings().timezone}


def _when(epoch: float | None) -> str:
    return report.local_time(epoch, _settings().tz)


def _label(status: str | None) -> str:
    return f"{LABELS[status]} {status}" if status in LABELS else (status or "-")


@bp.route("/login", methods=["GET", "POST"])
def login():
    """The token form; a right token opens a session. Failures are throttled per address and over all."""
    next_url = _safe_next(request.values.get("next"))
    page = {"next": next_url, "insecure": sessions.cookie_would_be_lost()}
    if request.method == "GET":
        if g.admin_session is not None:
            return redirect(next_url or url_for("admin.events"))
        return render_template("admin/login.html", **page)
    client, engine = _client(), _engine()
    wait = login_throttle.retry_after(engine, client)
    if wait is not None:
        metrics.admin_login_failed("throttled")
        log.warning("admin login refused from %s: too many failed logins, retry in %d s", client, wait)
        return render_template("admin/login.html", throttled=wait, **page), 429, {"Retry-After": str(wait)}
    if not _same(request.form.get("token", ""), _settings().admin_token):
        login_throttle.failed(engine, client)
        metrics.admin_login_failed("wrong_token")
        log.warning("admin login refused from %s: wrong token", client)
        return render_template("admin/login.html", error=True, **page), 403
    login_throttle.succeeded(engine, client)
    response = redirect(next_url or url_for("admin.events"))
    sessions.start(response, client, csrf=secrets.token_urlsafe(32))
    log.info("admin login from %s", client)
    return response


@bp.post("/logout")
def logout():
    """End this browser's session: the cookie is refused from now on, wherever a copy of it is."""
    response = redirect(url_for("admin.login"))
    sessions.end(response, g.admin_session)
    log.info("admin logout from %s", _client())
    return response


@bp.post("/logout-everywhere")
def logout_everywhere():
    """End every admin session, in every browser (after a lost laptop, or a token that leaked)."""
    response = redirect(url_for("admin.login"))
    ended = sessions.end(response, g.admin_session, everywhere=True)
    log.warning("admin logged out everywhere from %s: %d session(s) ended", _client(), ended)
    return response


# --- pages -----------------------------------------------------------------------------------

def _engine():
    return services.of(current_app).engine


def _settings():
    return services.of(current_app).settings


def _choice(value: str | None, options: tuple[str, ...]) -> str | None:
    return value if value in options else None


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
    return redirect(url_for("admin.event", event_id=event_id, requeued_events=n_events, requeued=n_deliveries))


@bp.post("/retry-failed")
def retry_failed():
    """Requeue every failed delivery and failed event."""
    n_events, n_deliveries = outbox.requeue(_engine())
    _wake_worker()
    log.info("admin requeued all failed: %d event(s), %d delivery(ies)", n_events, n_deliveries)
    return redirect(url_for("admin.events", requeued_events=n_events, requeued=n_deliveries))


def _wake_worker() -> None:
    services.of(current_app).wake_worker()


@bp.get("/templates")
def templates():
    """The template rows of TEMPLATE_APP, each rendered against a sample event of its change type."""
    settings = _settings()
    try:
        rows = report.template_rows(services.of(current_app).template_engine, settings.template_table,
                                    settings.template_app)
        error = None
    except DBAPIError as exc:
        rows = []
        error = config.mask(f"{exc.orig.__class__.__name__}: {exc.orig}", settings)[:300]
    for row in rows:
        row["preview"] = _preview(row, settings)
    return render_template("admin/templates.html", rows=rows, error=error, settings=settings, sample=SAMPLE,
                           department=settings.department_ids[0])


def _preview(row: dict, settings) -> dict:
    change_type = row["change_type"] if row["change_type"] in wecom.MEMBER_CHANGES else "create_user"
    change = wecom.parse_event(wecom.event_xml(change_type, SAMPLE["userid"], settings.corp_id,
                                               str(settings.department_ids[0]), create_time=SAMPLE["create_time"]))
    template = templates_repo.EmailTemplate(row["email_title"] or "", row["email_body"] or "")
    try:
        subject, body = templates_repo.render_email(template, change, settings.tz, SAMPLE["name"])
    except templates_repo.RenderError as exc:
        return {"error": str(exc)}
    return {"subject": subject, "body": body, "error": None}


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
    return _addresses_page(result=result, file_name=shown_name)


def _addresses_page(**extra):
    search = request.args.get("q", "").strip()[:64]
    rows, total = report.address_book_rows(_engine(), search)
    return render_template("admin/addresses.html", rows=rows, total=total, q=search, **extra)
