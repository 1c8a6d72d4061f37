"""Suppressed addresses, soft-bounce counts, stored bounce reports and bad pattern guesses (docs/bounces.md).

An address is suppressed by a hard bounce, by a refusal at RCPT saying the mailbox does not exist, or by
BOUNCE_SOFT_LIMIT soft bounces within 7 days (at most one counted per address per day); only an admin lifts
it (`suppressions --remove`, /admin): a later successful delivery never does. Every report is stored once,
keyed by its own Message-ID, so a replayed or re-fetched report changes nothing the second time.
"""
from __future__ import annotations

import hashlib
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.schema import bad_guesses, bounce_reports, insert_ignore, soft_bounces, suppressions

SOFT_WINDOW_SECONDS = 7 * 86400
RAW_LIMIT = 256 * 1024  # bytes of a report's text kept for the admin
CHUNK = 500


def normal(address: str) -> str:
    """The key of an address: stripped, lower case (domains are case-insensitive; local parts in practice)."""
    return (address or "").strip().lower()


def report_key(message_id: str, raw: bytes) -> str:
    """The identity of a report: its own Message-ID (a re-fetched copy has the same), else its bytes."""
    basis = ("id:" + message_id.strip().lower()).encode("utf-8") if message_id.strip() else b"raw:" + raw
    return hashlib.sha256(basis).hexdigest()


def store_report(conn: Connection, key: str, *, now: float, source: str, kind: str, reason: str,
                 subject: str = "", raw: bytes = b"", delivery_id: int | None = None,
                 digest_id: int | None = None, address: str | None = None) -> bool:
    """Keep one report (raw text cut at RAW_LIMIT); False when a report with this key was stored before."""
    text = raw[:RAW_LIMIT].decode("utf-8", "replace") if raw else None
    return conn.execute(insert_ignore(bounce_reports), {
        "report_key": key, "received_at": now, "source": source[:16], "kind": kind, "reason": reason[:1000],
        "subject": subject[:255], "raw": text, "delivery_id": delivery_id, "digest_id": digest_id,
        "address": normal(address)[:320] if address else None}).rowcount == 1


def report_seen(conn: Connection, key: str):
    """The stored report with this key (kind, delivery_id, digest_id, reason), or None."""
    return conn.execute(sa.select(bounce_reports.c.kind, bounce_reports.c.delivery_id, bounce_reports.c.digest_id,
                                  bounce_reports.c.reason).where(bounce_reports.c.report_key == key)).first()


def suppress(conn: Connection, address: str, reason: str, source: str, now: float,
             delivery_id: int | None = None) -> bool:
    """Suppress `address` (a no-op when it already is: the first reason stays); True when newly suppressed."""
    return conn.execute(insert_ignore(suppressions), {
        "address": normal(address)[:320], "reason": reason[:1000], "since": now, "source": source,
        "delivery_id": delivery_id}).rowcount == 1


def count_soft(conn: Connection, address: str, now: float, tz, reason: str) -> int:
    """Count one soft bounce of `address` for today (a second one the same day is not counted); how many
    days within the last 7 had one."""
    address = normal(address)[:320]
    day = datetime.fromtimestamp(now, tz).strftime("%Y-%m-%d")
    conn.execute(insert_ignore(soft_bounces), {"address": address, "day": day, "at": now, "reason": reason[:1000]})
    return conn.execute(sa.select(sa.func.count()).select_from(soft_bounces).where(
        soft_bounces.c.address == address, soft_bounces.c.at > now - SOFT_WINDOW_SECONDS)).scalar_one()


def remember_bad_guess(conn: Connection, userid: str, address: str, now: float) -> None:
    """An EMAIL_PATTERN guess for `userid` bounced hard: it is never guessed again for that member."""
    conn.execute(insert_ignore(bad_guesses), {"userid": userid.strip().lower()[:64],
                                              "address": normal(address)[:320], "since": now})


def suppressed(engine: Engine, addresses) -> dict[str, tuple[str, float, str]]:
    """Of `addresses`, the suppressed ones: normal address → (reason, since, source)."""
    wanted = sorted({normal(a) for a in addresses if a})
    found = {}
    with engine.connect() as conn:
        for start in range(0, len(wanted), CHUNK):
            for row in conn.execute(sa.select(suppressions.c.address, suppressions.c.reason, suppressions.c.since,
                                              suppressions.c.source)
                                    .where(suppressions.c.address.in_(wanted[start:start + CHUNK]))):
                found[normal(row.address)] = (row.reason, row.since, row.source)
    return found


def bad_guesses_of(engine: Engine, userids) -> set[tuple[str, str]]:
    """(lower-case userid, address) of the pattern guesses that bounced, for `userids`."""
    wanted = sorted({u.strip().lower() for u in userids if u})
    found = set()
    with engine.connect() as conn:
        for start in range(0, len(wanted), CHUNK):
            found |= {(r.userid.lower(), normal(r.address)) for r in conn.execute(
                sa.select(bad_guesses.c.userid, bad_guesses.c.address)
                .where(bad_guesses.c.userid.in_(wanted[start:start + CHUNK])))}
    return found


def remove(engine: Engine, address: str) -> bool:
    """Lift a suppression (and forget its soft bounces); False when the address was not suppressed."""
    address = normal(address)
    with engine.begin() as conn:
        gone = conn.execute(suppressions.delete().where(suppressions.c.address == address)).rowcount
        conn.execute(soft_bounces.delete().where(soft_bounces.c.address == address))
    return gone > 0


def listing(engine: Engine, limit: int = 1000) -> list:
    """Suppressed addresses, newest first: address, reason, since, source, delivery_id."""
    with engine.connect() as conn:
        return conn.execute(sa.select(suppressions).order_by(suppressions.c.since.desc(),
                                                             suppressions.c.address).limit(limit)).all()


def count(engine: Engine) -> int:
    """How many addresses are suppressed."""
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(suppressions)).scalar_one()


def describe(reason: str, since: float, source: str, tz) -> str:
    """`address suppressed: <why, when>`, the skipped delivery's reason (a contract: keep the prefix)."""
    when = datetime.fromtimestamp(since, tz).strftime("%Y-%m-%d %H:%M")
    return f"address suppressed: {reason} ({source}, since {when})"[:1000]
