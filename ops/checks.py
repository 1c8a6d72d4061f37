"""`flask check`: try every dependency with the current configuration; one line each, with the fix."""
from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

import config
import mailer
import smtp_session
import templates_repo
import wecom_api
from delivery.limits import day_of, next_day_start
from bounces.mailbox_check import mailbox_line
from ops import bounce_checks, message_checks, report, storage
from ops.exposure import bind_warning, loopback  # shared with gunicorn.conf.py (start-up warning)
from store import addressbook, limits
from store.db import StateUnavailable, safe_url
from store.migrate import upgrade
from wecom import MEMBER_CHANGES


def run_all(parts) -> list[tuple[bool, str]]:
    """Every check in order (`parts`: the app's services); a failed prerequisite skips what depends on it."""
    settings, engine = parts.settings, parts.engine
    results = [state_database(engine, settings), template_rows(parts.template_engine, settings)]
    state_ok = results[0][0]
    # The access token is shared through the state database; without it, WeCom is still worth trying.
    client = parts.wecom_client() if state_ok else wecom_api.WeComClient(settings)
    token_ok, line = wecom_token(client)
    results.append((token_ok, line))
    if token_ok:
        results.extend(departments(client, settings, engine if state_ok else None))
    else:
        results.extend((False, f"WeCom department {d}: not checked (needs a working gettoken)")
                       for d in settings.department_ids)
    if token_ok:  # WeCom application messages: the app, its visible range, who goes by which channel
        results.extend(message_checks.run(parts, client, state_ok))
    if settings.reconcile_seconds > 0:
        results.append(reconciliation(engine, settings) if state_ok else
                       (False, "reconciliation: not checked (needs the state database)"))
    results.append(smtp(settings))
    results.append(sending_limits(settings, engine if state_ok else None))
    if state_ok:  # bounces (issue 20): what came back, the blocked sender, a wrong EMAIL_PATTERN
        results.extend(bounce_checks.bounce_lines(engine, settings))
    if settings.bounce_imap is not None:  # the mailbox they arrive in (BOUNCE_IMAP_URL), read-only
        results.append(mailbox_line(settings, engine if state_ok else None))
    results.append(storage.retention_line(engine, settings) if state_ok else
                   (False, "retention: not checked (needs the state database)"))
    return [(ok, config.mask(line, settings)) for ok, line in results]


def state_database(engine, settings) -> tuple[bool, str]:
    try:
        revision = upgrade(engine)
    except DBAPIError as exc:
        return False, (f"state database {safe_url(settings.database_url)}: {exc.orig.__class__.__name__}: "
                       f"{str(exc.orig)[:120]} — check DATABASE_URL and that the server accepts connections")
    except StateUnavailable as exc:
        return False, f"state database {safe_url(settings.database_url)}: {exc}"
    return True, f"state database {safe_url(settings.database_url)}: reachable, schema revision {revision}"


def template_rows(engine, settings) -> tuple[bool, str]:
    where = f"{settings.template_table} (app {settings.template_app!r}) in {safe_url(settings.template_database_url)}"
    try:
        if not sa.inspect(engine).has_table(settings.template_table):
            return False, (f"templates {where}: the table does not exist — check TEMPLATE_DATABASE_URL / "
                           "TEMPLATE_TABLE, or run `flask --app app init-db --seed-templates` to create it "
                           "with the original three rows")
        missing = [t for t in MEMBER_CHANGES
                   if templates_repo.load_template(engine, settings.template_table, settings.template_app, t) is None]
        digest_row = templates_repo.load_template(engine, settings.template_table, settings.template_app, "digest")
    except DBAPIError as exc:
        return False, (f"templates {where}: {exc.orig.__class__.__name__}: {str(exc.orig)[:120]} — check "
                       "TEMPLATE_DATABASE_URL / TEMPLATE_TABLE, or run `flask --app app init-db --seed-templates`")
    if missing:
        return False, (f"templates {where}: no row for {', '.join(missing)} — add them, or run "
                       "`flask --app app init-db --seed-templates` for the original three")
    digest = ""
    if settings.digest_window or settings.quiet_hours:
        digest = ("; digests use its 'digest' row" if digest_row is not None else
                  "; no 'digest' row: digests use the built-in text (README: the template section has the SQL)")
    return True, f"templates {where}: a row for each of {', '.join(MEMBER_CHANGES)}{digest}"


def wecom_token(client) -> tuple[bool, str]:
    try:
        client.check_token()
    except wecom_api.WeComError as exc:
        return False, str(exc)  # it names gettoken and the fix already
    return True, "WeCom gettoken: access token obtained"


def departments(client, settings, engine) -> list[tuple[bool, str]]:
    """Each watched department listable, its member count and how many members lack an address."""
    results = []
    for department_id in settings.department_ids:
        try:
            members = client.list_members([department_id], settings.fetch_child)[department_id]
        except wecom_api.WeComError as exc:
            results.append((False, f"WeCom department {department_id}: {exc}"))
            continue
        line = f"WeCom department {department_id}: {len(members)} member(s)"
        if engine is None:
            results.append((True, f"{line} (addresses not checked: the state database holds the address book)"))
            continue
        resolved = addressbook.resolve(settings, engine, members)
        without = [m.userid for m, address in resolved if not address]
        if without:
            sample = ", ".join(without[:5]) + (" …" if len(without) > 5 else "")
            # With WeCom messages on, they are reached there: the channels line says whether all are.
            covered = settings.wecom_message != "off"
            results.append((covered, f"{line}, {len(without)} without an address under EMAIL_SOURCES="
                                     f"{','.join(settings.email_sources)} ({sample}) — "
                                     + (f"WECOM_MESSAGE={settings.wecom_message} sends them WeCom messages"
                                        if covered else "import them with `flask --app app import-addresses "
                                                        "FILE.csv` or set EMAIL_PATTERN")))
        else:
            results.append((True, f"{line}, every one with an address"))
    return results


def reconciliation(engine, settings) -> tuple[bool, str]:
    """When reconciliation last ran and what it found; ✗ when its last round could not list a department."""
    try:
        turn, found = report.reconciliation_summary(engine)
    except DBAPIError as exc:
        return False, f"reconciliation: {exc.orig.__class__.__name__} reading its state"
    every = f"every {settings.reconcile_seconds:g} s"
    if turn is None or turn.last_run_at is None:
        return True, f"reconciliation ({every}): has not run yet (the first delivery worker to start runs it)"
    when = report.local_time(turn.last_run_at, settings.tz)
    line = (f"reconciliation ({every}): last round {when} ({settings.timezone}); {found} change(s) found in the "
            f"last 7 days that WeCom's callbacks never delivered")
    outcome = turn.last_outcome or ""
    if outcome.startswith("failed"):
        return False, f"{line} — last round {outcome}"
    return True, line


def smtp(settings) -> tuple[bool, str]:
    if settings.mail_backend != "smtp":
        return True, f"mail: MAIL_BACKEND={settings.mail_backend} (nothing is sent over SMTP)"
    try:
        return True, smtp_session.check(settings)
    except mailer.MailError as exc:
        return False, str(exc)  # it names the server and the fix already


def sending_limits(settings, engine) -> tuple[bool, str]:
    """The provider's limits as configured, and how much of today's is used."""
    if not (settings.smtp_max_per_minute or settings.smtp_max_per_day):
        return True, ("sending limits: none (set SMTP_MAX_PER_MINUTE / SMTP_MAX_PER_DAY to your provider's, "
                      "e.g. QQ Mail about 15/minute)")
    parts = []
    if settings.smtp_max_per_minute:
        parts.append(f"{settings.smtp_max_per_minute}/minute")
    if settings.smtp_max_per_day:
        used = "not counted (state database down)"
        if engine is not None:
            now = time.time()
            used = f"{limits.sent_on(engine, day_of(now, settings.tz))} used today, resets at " + \
                report.local_time(next_day_start(now, settings.tz), settings.tz)
        parts.append(f"{settings.smtp_max_per_day}/day ({used})")
    return True, "sending limits: " + ", ".join(parts) + " (shared by every process on DATABASE_URL)"


def config_warnings(settings, environ=None) -> list[str]:
    """Settings that work but expose a secret or the service; one line each, saying what to do instead."""
    environ = os.environ if environ is None else environ
    found = []
    api = urlsplit(settings.api_base)
    if api.scheme == "http" and not loopback(api.hostname):
        found.append(f"WECOM_API_BASE={settings.api_base} is plain HTTP: the corp secret travels in clear in the "
                     "gettoken URL — use https://")
    if (settings.mail_backend == "smtp" and settings.smtp_security == "none" and settings.smtp_user
            and not loopback(settings.smtp_host)):
        found.append(f"SMTP_SECURITY=none with SMTP_USER set: the SMTP password goes to {settings.smtp_host} in "
                     "clear — use SMTP_SECURITY=ssl or starttls")
    if settings.admin_token and not settings.admin_cookie_secure:
        found.append("ADMIN_COOKIE_SECURE=false with ADMIN_TOKEN set: the admin session cookie may travel over "
                     "plain HTTP — put HTTPS in front of /admin and leave it true (false is for use on 127.0.0.1 only)")
    bind_line = bind_warning(settings, environ)
    if bind_line:
        found.append(bind_line)
    return [config.mask(line, settings) for line in found]
