"""/admin/templates: the template rows of TEMPLATE_APP, and an editor with a server-rendered preview, test-send
to oneself, and every saved version kept (store/template_versions.py) with one-click restore.

The pages run no script (the CSP forbids it), so "live" is a round trip: 预览 Preview posts the form and the
page comes back with what the worker would send, rendered by the worker's own renderer (ops/template_editing.py).
"""
from __future__ import annotations

import time

from flask import abort, current_app, redirect, render_template, request, url_for
from sqlalchemy.exc import DBAPIError

import config
import services
import templates_repo
import wecom
import wecom_api
from ops import report
from ops import template_editing as editing
import ops.admin.trail as trail
from ops.admin.blueprint import MAX_ID, bp, engine as _engine, log, settings as _settings
from store import addressbook, template_versions as versions, template_writes, test_sends


def _template_engine():
    return services.of(current_app).template_engine


DENIED_CACHE_SECONDS = 60  # how long a probe of the template user's rights is reused by this process
_DENIED = "wecom_mailer_template_write_denied"  # app.extensions: (checked at, reason or None)


def _write_denied() -> str | None:
    """Whether the template database user may write (probed at most once a minute per process: a preview is
    a round trip of its own; a save always finds out by writing)."""
    checked = current_app.extensions.get(_DENIED)
    if checked is None or time.monotonic() - checked[0] > DENIED_CACHE_SECONDS:
        s = _settings()
        checked = (time.monotonic(), template_writes.write_denied(_template_engine(), s.template_table,
                                                                  s.template_app))
        current_app.extensions[_DENIED] = checked
    return checked[1]


def _rows() -> tuple[dict[str, dict], str | None]:
    s = _settings()
    try:
        rows = report.template_rows(_template_engine(), s.template_table, s.template_app)
    except DBAPIError as exc:
        return {}, config.mask(f"{exc.orig.__class__.__name__}: {exc.orig}", s)[:300]
    return {row["change_type"]: row for row in rows}, None


@bp.get("/templates")
def templates():
    """The template rows of TEMPLATE_APP, each rendered against a sample event; handled types lacking a row."""
    s = _settings()
    rows, error = _rows()
    stored = {k: templates_repo.EmailTemplate(r["email_title"] or "", r["email_body"] or "") for k, r in rows.items()}
    for change_type, row in rows.items():
        row["preview"] = editing.preview(s, change_type, row["email_title"] or "", row["email_body"] or "",
                                         templates=stored)
    missing = [t for t in editing.HANDLED if t not in rows] if error is None else []
    return render_template("admin/templates.html", rows=list(rows.values()), missing=missing, error=error,
                           settings=s, sample=editing, department=s.department_ids[0])


def _change_type(change_type: str) -> str:
    if not editing.CHANGE_TYPE.fullmatch(change_type):
        abort(404)
    return change_type


def _editor(change_type: str, title: str, body: str, status: int = 200, **extra):
    """The editor page for this title and body: preview, versions, and whether the table may be written."""
    s = _settings()
    rows, error = _rows()
    if change_type not in rows and change_type not in editing.HANDLED and error is None:
        abort(404)
    stored = {k: templates_repo.EmailTemplate(r["email_title"] or "", r["email_body"] or "") for k, r in rows.items()}
    recent = editing.recent_events(_engine(), change_type) if change_type != editing.DIGEST else []
    chosen = request.values.get("event", "sample")
    change = None
    for event in recent:
        if chosen == str(event.id):
            try:
                change = wecom.parse_event(event.xml)
            except wecom.CallbackRejected:
                extra.setdefault("notice", f"事件 #{event.id} 无法解析，改用示例 Event #{event.id} does not parse: "
                                           "the sample is shown")
    problem = editing.check(title, body)
    preview = (editing.Preview(error=problem) if problem else
               editing.preview(s, change_type, title, body, change, templates=stored))
    denied = None if error else _write_denied()
    sql = (template_writes.sql_to_run(s.template_table, s.template_app, change_type, title, body,
                                      exists=change_type in rows) if denied and not problem else None)
    return render_template("admin/template_edit.html", change_type=change_type, title=title, body=body,
                           preview=preview, recent=recent, chosen=chosen if change is not None else "sample",
                           versions=versions.history(_engine(), s.template_app, change_type), stored=rows.get(
                               change_type), error=error, denied=denied, sql=sql, settings=s,
                           sample=editing, **extra), status


@bp.get("/templates/<change_type>")
def template_edit(change_type: str):
    """The editor, filled with the stored row (empty for a handled type that has none)."""
    change_type = _change_type(change_type)
    rows, _ = _rows()
    row = rows.get(change_type) or {}
    return _editor(change_type, row.get("email_title") or "", row.get("email_body") or "",
                   saved=request.args.get("saved", type=int), restored=request.args.get("restored", type=int))


@bp.post("/templates/<change_type>")
def template_post(change_type: str):
    """预览 Preview (changes nothing), 保存 Save (a new version), or 发送测试 Send a test to oneself."""
    change_type = _change_type(change_type)
    title = request.form.get("title", "")
    body = request.form.get("body", "").replace("\r\n", "\n")  # a textarea sends CRLF line breaks
    op = request.form.get("op", "preview")
    if op not in ("preview", "save", "test"):
        abort(400, "unknown action: use the buttons of the page")
    if op == "preview":
        return _editor(change_type, title, body)
    problem = editing.check(title, body) or editing.preview(_settings(), change_type, title, body).error
    if problem:  # what the worker could not render is never saved nor sent
        return _editor(change_type, title, body, status=400, refused=problem)
    if op == "save":
        return _save(change_type, title, body)
    return _test_send(change_type, title, body)


def _save(change_type: str, title: str, body: str, action: str = versions.SAVE, restored_from: int | None = None):
    s = _settings()
    before = templates_repo.load_template(_template_engine(), s.template_table, s.template_app, change_type)
    try:
        template_writes.save(_template_engine(), s.template_table, s.template_app, change_type, title, body)
    except template_writes.WriteDenied as exc:
        current_app.extensions[_DENIED] = (time.monotonic(), str(exc))
        log.warning("template %s not saved: the template database refused the write (%s)", change_type, exc)
        return _editor(change_type, title, body, status=403, refused=f"模板数据库只读，未保存 The template database "
                                                                     f"refused the write, nothing was saved: {exc}")
    if before is not None:
        versions.keep_original(_engine(), s.template_app, change_type, before.title, before.body)
    version = versions.add(_engine(), s.template_app, change_type, title, body, trail.who(), action, restored_from)
    what = "template-rollback" if action == versions.ROLLBACK else "template-save"
    trail.record(what, target=change_type, detail=f"version {version}" + (f" restores version {restored_from}"
                                                                         if restored_from else ""))
    log.info("%s %s: version %s by %s", what, change_type, version, trail.who())
    key = "restored" if restored_from else "saved"
    return redirect(url_for("admin.template_edit", change_type=change_type, **{key: version}))


@bp.post(f"/templates/<change_type>/restore/<int(max={MAX_ID}):version_id>")
def template_restore(change_type: str, version_id: int):
    """Put a kept version back in the table: restoring is itself a new version."""
    change_type = _change_type(change_type)
    version = versions.get(_engine(), _settings().template_app, version_id)
    if version is None or version.change_type != change_type:
        abort(404)
    problem = editing.check(version.title, version.body) or editing.preview(
        _settings(), change_type, version.title, version.body).error
    if problem:
        return _editor(change_type, version.title, version.body, status=400, refused=problem)
    return _save(change_type, version.title, version.body, versions.ROLLBACK, restored_from=version_id)


def _own_address(userid: str) -> tuple[str, str | None]:
    """(name, address) of the signed-in member by EMAIL_SOURCES, as a delivery to them would resolve it."""
    s, parts = _settings(), services.of(current_app)
    member = wecom_api.Member(userid)
    client = parts.wecom_client()
    try:
        listed = client.list_members(s.department_ids, s.fetch_child)
        member = next((m for ms in listed.values() for m in ms if m.userid.lower() == userid.lower()), member)
    except wecom_api.WeComError as exc:  # the other sources may still know the address
        log.warning("test send: cannot list members for %s's address: %s", userid, exc)
    finally:
        client.close()
    [(member, address)] = addressbook.resolve(s, parts.engine, [member])
    return member.name, address


def _test_send(change_type: str, title: str, body: str):
    s, who = _settings(), trail.who()
    if who == "token":
        return _editor(change_type, title, body, status=400, refused="令牌登录没有本人邮箱，请用企业微信登录后再发送测试。"
                       "A token session has no address of its own: sign in with WeCom to send yourself a test.")
    name, address = _own_address(who)
    if not address:
        return _editor(change_type, title, body, status=400, refused=f"找不到 {who} 的邮箱 No address for {who} "
                       f"from EMAIL_SOURCES ({','.join(s.email_sources)}): add one to the address book.")
    change = editing.sample_change(s, change_type)
    rendered = editing.preview(s, change_type, title, body, change)
    xml = wecom.event_xml(change.change_type, change.user_id, s.corp_id, str(s.department_ids[0]),
                          create_time=change.create_time, name=editing.SAMPLE_NAME)
    event_id = test_sends.enqueue(_engine(), change_type, xml, rendered.subject, rendered.body, who, name, address,
                                  versions.matching(s.template_app, change_type, title, body))
    services.of(current_app).wake_worker()
    trail.record("template-test-send", target=change_type, detail=f"test to {address}, event {event_id}")
    return _editor(change_type, title, body, test_event=event_id, test_address=address)
