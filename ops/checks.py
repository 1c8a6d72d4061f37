"""`flask check`: try every dependency with the current configuration; one line each, with the fix."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

import config
import mailer
import templates_repo
import wecom
from ops import report
from store import addressbook
from store.db import StateUnavailable, safe_url
from store.migrate import upgrade
from wecom import MEMBER_CHANGES


def run_all(parts) -> list[tuple[bool, str]]:
    """Every check in order (`parts`: the app's services); a failed prerequisite skips what depends on it."""
    settings, engine = parts.settings, parts.engine
    results = [state_database(engine, settings), template_rows(parts.template_engine, settings)]
    state_ok = results[0][0]
    # The access token is shared through the state database; without it, WeCom is still worth trying.
    client = parts.wecom_client() if state_ok else wecom.WeComClient(settings)
    token_ok, line = wecom_token(client)
    results.append((token_ok, line))
    if token_ok:
        results.extend(departments(client, settings, engine if state_ok else None))
    else:
        results.extend((False, f"WeCom department {d}: not checked (needs a working gettoken)")
                       for d in settings.department_ids)
    if settings.reconcile_seconds > 0:
        results.append(reconciliation(engine, settings) if state_ok else
                       (False, "reconciliation: not checked (needs the state database)"))
    results.append(smtp(settings))
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
    except DBAPIError as exc:
        return False, (f"templates {where}: {exc.orig.__class__.__name__}: {str(exc.orig)[:120]} — check "
                       "TEMPLATE_DATABASE_URL / TEMPLATE_TABLE, or run `flask --app app init-db --seed-templates`")
    if missing:
        return False, (f"templates {where}: no row for {', '.join(missing)} — add them, or run "
                       "`flask --app app init-db --seed-templates` for the original three")
    return True, f"templates {where}: a row for each of {', '.join(MEMBER_CHANGES)}"


def wecom_token(client) -> tuple[bool, str]:
    try:
        client.check_token()
    except wecom.WeComError as exc:
        return False, str(exc)  # it names gettoken and the fix already
    return True, "WeCom gettoken: access token obtained"


def departments(client, settings, engine) -> list[tuple[bool, str]]:
    """Each watched department listable, its member count and how many members lack an address."""
    results = []
    for department_id in settings.department_ids:
        try:
            members = client.list_members([department_id], settings.fetch_child)[department_id]
        except wecom.WeComError as exc:
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
            results.append((False, f"{line}, {len(without)} without an address under EMAIL_SOURCES="
                                   f"{','.join(settings.email_sources)} ({sample}) — import them with "
                                   "`flask --app app import-addresses FILE.csv` or set EMAIL_PATTERN"))
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
        return True, mailer.check_smtp(settings)
    except mailer.MailError as exc:
        return False, str(exc)  # it names the server and the fix already
