"""/admin/templates: the template rows of TEMPLATE_APP, each rendered against a sample event."""
from __future__ import annotations

from flask import current_app, render_template
from sqlalchemy.exc import DBAPIError

import config
import services
import templates_repo
import wecom
from ops import report
from ops.admin.blueprint import bp, settings as _settings

SAMPLE = {"userid": "zhangsan", "name": "张三", "create_time": 1700000000}  # 2023-11-15 06:13:20 Asia/Shanghai


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
