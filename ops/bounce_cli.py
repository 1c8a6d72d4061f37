"""`flask --app app bounces FILE… | -` and `flask --app app suppressions [--remove ADDRESS]`."""
from __future__ import annotations

import sys
from datetime import datetime

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy.exc import SQLAlchemyError

import services
from bounces import handle
from store import audit, suppressions

MAX_INPUT = 32 * 1024 * 1024  # bytes read of one file or of standard input; process_message reads 1 MB of it


def init_app(app) -> None:
    """Register the two commands."""
    for command in (bounces_command, suppressions_command):
        app.cli.add_command(command)


@click.command("bounces")
@click.argument("files", nargs=-1, required=True)
@with_appcontext
def bounces_command(files: tuple[str, ...]) -> None:
    """Process bounce messages (one per FILE, or one on standard input with `-`, e.g. from a Postfix pipe):
    one line each naming the delivery matched, the outcome and why."""
    parts = services.of(current_app)
    unreadable = 0
    for name in files:
        try:
            raw = sys.stdin.buffer.read(MAX_INPUT) if name == "-" else _read(name)
        except OSError as exc:
            click.echo(f"{name}: cannot read ({exc.strerror}): check the path", err=True)
            unreadable += 1
            continue
        try:
            outcome = handle.process_message(parts.engine, parts.settings, raw,
                                             source="stdin" if name == "-" else "file")
        except SQLAlchemyError as exc:  # kept for a later run: exit non-zero (a Postfix pipe defers the mail)
            click.echo(f"{name}: not processed, the state database failed ({exc.__class__.__name__}): check "
                       "DATABASE_URL and run the command again", err=True)
            sys.exit(75)  # EX_TEMPFAIL
        label = "-" if name == "-" else name
        click.echo(f"{label}: {handle.describe(outcome)}")
    if unreadable:
        sys.exit(1)


def _read(name: str) -> bytes:
    with open(name, "rb") as file:
        return file.read(MAX_INPUT)


@click.command("suppressions")
@click.option("--remove", "address", default=None, metavar="ADDRESS", help="Lift the suppression of ADDRESS.")
@with_appcontext
def suppressions_command(address: str | None) -> None:
    """List suppressed addresses (address, reason, since, source), or lift one with --remove."""
    parts = services.of(current_app)
    if address is not None:
        if not suppressions.remove(parts.engine, address):
            click.echo(f"{address} is not suppressed (see `flask --app app suppressions`)", err=True)
            sys.exit(1)
        audit.record(parts.engine, audit.CLI, "suppression-remove", target=suppressions.normal(address))
        click.echo(f"{suppressions.normal(address)}: suppression lifted; it will be mailed again")
        return
    rows = suppressions.listing(parts.engine)
    if not rows:
        click.echo("No suppressed addresses.")
        return
    tz = parts.settings.tz
    for row in rows:
        since = datetime.fromtimestamp(row.since, tz).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{row.address}\t{' '.join(row.reason.split())}\t{since}\t{row.source}")  # DESIGN.md's order
