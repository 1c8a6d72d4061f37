"""The /admin blueprint and what every page shares: response headers, errors, helpers for the templates."""
from __future__ import annotations

import logging

from flask import Blueprint, current_app, g, render_template
from sqlalchemy.exc import DBAPIError

import services
from ops import report

log = logging.getLogger("wecom_mailer.admin")
bp = Blueprint("admin", __name__, url_prefix="/admin")  # pages: templates/admin/ beside app.py

MAX_ID = 2**63 - 1  # ids are BIGINT; a larger number in a URL is a 404, not an overflow in the driver
LABELS = {"pending": "待处理", "sending": "发送中", "done": "完成", "failed": "失败", "skipped": "跳过",
          "ignored": "忽略", "retry": "待重试", "sent": "已发送", "held": "待汇总", "bounced": "退信"}


def engine():
    return services.of(current_app).engine


def settings():
    return services.of(current_app).settings


def choice(value: str | None, options: tuple[str, ...]) -> str | None:
    return value if value in options else None


def when(epoch: float | None) -> str:
    return report.local_time(epoch, settings().tz)


def label(status: str | None) -> str:
    return f"{LABELS[status]} {status}" if status in LABELS else (status or "-")


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
            "signed_in": bool(g.get("admin_session")), "when": when, "label": label,
            "timezone": settings().timezone}
