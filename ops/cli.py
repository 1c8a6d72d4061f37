"""`flask --app app …` commands: init-db, worker, simulate, check, status, retry, import-addresses, audit,
admin-unlock, rotate-secret (and bounces, suppressions: ops/bounce_cli.py).

What `check` and `status` print comes from the state database and from peers (SMTP replies, WeCom's errmsg,
userids): every line goes through logs.escape_controls, so an OSC title change, a clear-screen or a forged
second line is printed as visible text (\x1b, \n) and never acted on by the terminal.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from urllib.parse import urlencode

import click
from flask import current_app
from flask.cli import with_appcontext

import services
import templates_repo
import wecom
from logs import escape_controls
from ops import bounce_cli, checks, report
from store import addressbook, audit, outbox
from store import sessions as session_store
from store.migrate import upgrade


def init_app(app) -> None:
    """Register the commands on the app's CLI (`demo` comes from devtools/, outside the service)."""
    for command in (init_db, worker_command, simulate, check, status, retry, import_addresses, audit_command,
                    admin_unlock, rotate_secret):
        app.cli.add_command(command)
    bounce_cli.init_app(app)  # bounces, suppressions


def _services() -> services.Services:
    return services.of(current_app)


@click.command("init-db")
@click.option("--seed-templates", is_flag=True,
              help="Also create the template table with the three original rows and the digest's where missing.")
@with_appcontext
def init_db(seed_templates: bool) -> None:
    """Create or upgrade the state tables (safe to run any time, from several machines at once)."""
    parts = _services()
    revision = upgrade(parts.engine)
    click.echo(f"Initialized the state database (schema revision {revision}).")
    if seed_templates:
        settings = parts.settings
        added = templates_repo.seed_templates(parts.template_engine, settings.template_table,
                                              settings.template_app)
        click.echo(f"Template table {settings.template_table}: {added} row(s) added for app {settings.template_app}.")
        if added:
            _audit("seed-templates", settings.template_table, f"{added} row(s) added for app {settings.template_app}")


@click.command("worker")
@with_appcontext
def worker_command() -> None:
    """Run delivery only (no web server); SIGTERM finishes the message in flight and exits."""
    worker = _services().start_worker()

    def stop(signum, _frame):
        # Logged, not echoed: with LOG_FORMAT=json every line of a worker is a JSON object.
        logging.getLogger("wecom_mailer.worker").info("received signal %s: finishing the message in flight",
                                                      signal.Signals(signum).name)
        worker.stop.set()
        worker.wakeup.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not worker.stop.wait(0.5):
        pass
    worker.shutdown()


@click.command("simulate")
@click.option("--url", required=True, help="Callback URL of a running instance, e.g. https://mail.corp.example/wecom/callback")
@click.option("--change-type", default="create_user", show_default=True,
              type=click.Choice(["create_user", "update_user", "delete_user"]))
@click.option("--user-id", default="zhangsan", show_default=True, help="UserID carried by the event.")
@click.option("--department", default=None, help="Department list of the event (default: the first watched id).")
@click.option("--name", default="", help="Name carried by the event (optional, as in older callbacks).")
@click.option("--verify", is_flag=True, help="Send WeCom's URL check (GET with echostr) instead of an event.")
@with_appcontext
def simulate(url: str, change_type: str, user_id: str, department: str | None, name: str, verify: bool) -> None:
    """Send a correctly encrypted and signed callback to URL, as WeCom would; print the answer."""
    import requests

    if not url.lower().startswith(("http://", "https://")):
        raise click.BadParameter(f"{url!r} is not an http:// or https:// URL, "
                                 "e.g. https://mail.corp.example/wecom/callback", param_hint="--url")
    settings, crypto = _services().settings, _services().crypto
    try:
        if verify:
            echo = str(int(time.time() * 1000))
            packet = crypto.encrypt(echo)
            query = dict(packet["query"], echostr=packet["encrypted"])
            response = requests.get(url, params=query, timeout=10)
            ok = response.status_code == 200 and response.text == echo
        else:
            departments = department or str(settings.department_ids[0])
            xml = wecom.event_xml(change_type, user_id, settings.corp_id, departments, name=name)
            packet = crypto.encrypt(xml)
            response = requests.post(f"{url}?{urlencode(packet['query'])}", data=packet["body"], timeout=10,
                                     headers={"Content-Type": "text/xml"})
            ok = response.status_code == 200 and response.text.strip() == "success"
    except requests.exceptions.SSLError as exc:  # before ConnectionError, its base class
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        raise click.ClickException(f"TLS with {url} failed ({reason or exc.__class__.__name__}): WeCom needs a "
                                   "certificate from a public CA that names this host")
    except requests.ConnectionError:
        raise click.ClickException(f"cannot connect to {url}: is the service running and the URL right?")
    except requests.Timeout:
        raise click.ClickException(f"{url} did not answer within 10 s (WeCom waits only 5 s)")
    except requests.RequestException as exc:  # e.g. no http:// or https:// in front
        raise click.ClickException(f"request to {url} failed: {exc}"[:300])
    what = "URL check" if verify else f"{change_type} userid={user_id}"
    click.echo(f"{what} → HTTP {response.status_code}: {response.text.strip()[:200]}")
    if not ok:
        hint = " (token, EncodingAESKey or corp id differ from the server's?)" if response.status_code in (400, 403) else ""
        raise click.ClickException(f"the service did not accept it{hint}")


@click.command("check")
@with_appcontext
def check() -> None:
    """Try every dependency with the current configuration and print one line each."""
    results = checks.run_all(_services())
    for ok, line in results:
        click.echo(("✓ " if ok else "✗ ") + escape_controls(line))
    for line in checks.config_warnings(_services().settings):  # works, but exposes something: not a failure
        click.echo("⚠ " + escape_controls(line))
    if not all(ok for ok, _ in results):
        sys.exit(1)


@click.command("status")
@click.option("--event", "event_id", type=int, default=None, help="Show the deliveries of one event.")
@click.option("--limit", default=20, show_default=True, help="How many recent events to list.")
@with_appcontext
def status(event_id: int | None, limit: int) -> None:
    """Recent events with delivery counts; failures with their reasons."""
    parts = _services()
    for line in report.status_lines(parts.engine, parts.settings.tz, event_id=event_id, limit=limit):
        click.echo(escape_controls(line))


@click.command("retry")
@click.argument("event_id", type=int, required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Requeue every failed delivery and failed event.")
@with_appcontext
def retry(event_id: int | None, all_failed: bool) -> None:
    """Requeue one event's failed deliveries (or the event itself), or every failed one."""
    if (event_id is None) == (not all_failed):
        raise click.UsageError("give an EVENT_ID or --failed (not both)")
    events, deliveries = outbox.requeue(_services().engine, event_id)
    if event_id is not None and events == deliveries == 0:
        raise click.ClickException(f"event {event_id}: nothing to retry (no such event, or nothing failed)")
    _audit("retry", f"event {event_id}" if event_id is not None else "all failed",
           f"{events} event(s), {deliveries} delivery(ies)")
    click.echo(f"Requeued {events} event(s) and {deliveries} delivery(ies).")


@click.command("import-addresses")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False))
@with_appcontext
def import_addresses(csv_file: str) -> None:
    """Load userid,email rows (headers userid/帐号/账号 and email/邮箱) into the address book."""
    try:
        result = addressbook.import_csv(_services().engine, csv_file)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    _audit("import-addresses", click.format_filename(csv_file)[-200:],
           f"{result.added} added, {result.updated} updated, {result.rejected} rejected")
    click.echo(f"Address book: {result.added} added, {result.updated} updated, {result.rejected} rejected.")
    for error in result.errors[:50]:
        click.echo(f"  rejected {error}", err=True)


def _audit(action: str, target: str, detail: str) -> None:
    """The audit row of a command that changed something (actor `cli`, client: this machine)."""
    import socket

    audit.record(_services().engine, audit.CLI, action, target=target, detail=detail, client=socket.gethostname())


@click.command("audit")
@click.option("--since", default=None, help="Only entries from this day or time on, in TIMEZONE: 2026-12-01 or "
                                            "'2026-12-01 08:00'.")
@click.option("--limit", default=1000, show_default=True, help="At most this many (the newest).")
@with_appcontext
def audit_command(since: str | None, limit: int) -> None:
    """Print the audit log, oldest first: time, actor, client, action, target, detail (one line each)."""
    from datetime import datetime

    parts = _services()
    since_epoch = None
    if since:
        for form in ("%Y-%m-%d", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"):
            try:
                since_epoch = datetime.strptime(since.strip(), form).replace(tzinfo=parts.settings.tz).timestamp()
                break
            except ValueError:
                continue
        else:
            raise click.BadParameter(f"{since!r} is not a date: use 2026-12-01 or '2026-12-01 08:00' (in "
                                     f"{parts.settings.timezone})", param_hint="--since")
    rows = audit.entries(parts.engine, since=since_epoch, limit=max(1, min(limit, 100_000)))
    for row in reversed(rows):
        fields = (report.local_time(row.at, parts.settings.tz), row.actor, row.client or "-", row.action,
                  row.target or "-", row.detail or "")
        click.echo("  ".join(escape_controls(str(f)) for f in fields).rstrip())
    if not rows:
        click.echo("No audit entries" + (f" since {since}." if since else "."))


@click.command("admin-unlock")
@click.option("--client", default=None, help="Clear one address only (as the logs name it), not every address.")
@with_appcontext
def admin_unlock(client: str | None) -> None:
    """Clear the failed-login counters of /admin (every address, or one), so a throttled address may try again."""
    engine = _services().engine
    cleared = session_store.clear_login_failures(engine, client)
    _audit("admin-unlock", client or "every address", f"{cleared} failed login(s) cleared")
    click.echo(f"{cleared} failed login(s) cleared ({escape_controls(client) if client else 'every address'}).")


@click.command("rotate-secret")
@with_appcontext
def rotate_secret() -> None:
    """Replace the generated key that signs /admin sessions: every session ends, every process re-reads it."""
    parts = _services()
    if parts.settings.secret_key:
        raise click.ClickException("SECRET_KEY is set, so the generated key is not in use: change SECRET_KEY "
                                   "(or the file SECRET_KEY_FILE names) and restart the service instead")
    session_store.rotate_shared_secret(parts.engine)
    ended = session_store.end_all_sessions(parts.engine)
    _audit("rotate-secret", session_store.SIGNING_SECRET, f"{ended} session(s) ended")
    click.echo(f"New session signing key stored; {ended} session(s) ended. Running processes pick it up "
               "at the next cookie signed with it.")
