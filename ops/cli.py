"""`flask --app app …` commands: init-db, worker, simulate, check, status, retry, import-addresses."""
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
from ops import bounce_cli, checks, report
from store import addressbook, outbox
from store.migrate import upgrade


def init_app(app) -> None:
    """Register the commands on the app's CLI (`demo` comes from devtools/, outside the service)."""
    for command in (init_db, worker_command, simulate, check, status, retry, import_addresses):
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
        click.echo(("✓ " if ok else "✗ ") + line)
    for line in checks.config_warnings(_services().settings):  # works, but exposes something: not a failure
        click.echo("⚠ " + line)
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
        click.echo(line)


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
    click.echo(f"Address book: {result.added} added, {result.updated} updated, {result.rejected} rejected.")
    for error in result.errors[:50]:
        click.echo(f"  rejected {error}", err=True)
