"""The one entry point for a received message (IMAP intake, the `bounces` command) and for a refusal at send
time: classify, match, store the report once, act on it. docs/bounces.md says what each outcome does."""
from __future__ import annotations

import email
import logging
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bounces import classify, match, tags
from config import Settings, mask
from store import suppressions
from store.db import with_retries
from store.schema import deliveries, digests

log = logging.getLogger("wecom_mailer.bounces")

MAX_PARSE = 1024 * 1024  # bytes of a message parsed: a report is small; a 25 MB message is read no further
KINDS = ("hard", "soft", "sender_blocked", "ignored", "delayed", "unmatched")
ACTED_STATUSES = ("sent", "failed")  # a delivery these may become `bounced`


@dataclass(frozen=True)
class BounceOutcome:
    """What one message turned out to be and what it changed.

    `kind`: hard, soft, sender_blocked, ignored, delayed or unmatched; `is_bounce`: a delivery report of any
    kind, matched or not (only those are marked \\Seen by the IMAP intake); `duplicate`: stored before, so
    nothing changed this time; `suppressed`: this report suppressed `address`."""
    kind: str
    delivery_id: int | None
    digest_id: int | None
    reason: str
    is_bounce: bool
    duplicate: bool = False
    address: str | None = None
    suppressed: bool = False
    via: str = ""


def process_message(engine: Engine, settings: Settings, raw: bytes, *, source: str = "file",
                    now: float | None = None) -> BounceOutcome:
    """Process one received message; idempotent (the same report twice changes nothing the second time).
    Never raises for what the message holds (bounded work, outcome `ignored` or `unmatched` with the reason);
    only a failing state database raises (sqlalchemy's error), so the caller keeps the message for later."""
    now = time.time() if now is None else now
    key_of_tags = tags.service_key(engine, settings)
    try:
        message = email.message_from_bytes(bytes(raw[:MAX_PARSE]))
        verdict = classify.classify(message)
        if not verdict.is_bounce:
            return BounceOutcome("ignored", None, None, verdict.reason, False)
        found = match.find(key_of_tags, message, verdict.envid)
        key = suppressions.report_key(classify.header(message, "Message-ID"), bytes(raw[:MAX_PARSE]))
        subject = classify.header(message, "Subject")
    except (sa.exc.SQLAlchemyError, MemoryError):
        raise
    except Exception as exc:  # the email package on a tree it cannot take apart: not ours to read
        return _logged(BounceOutcome("ignored", None, None, f"unreadable message ({exc.__class__.__name__})",
                                     False), settings)
    return _act(engine, settings, verdict, found, key=key, source=source, now=now, subject=subject,
                raw=bytes(raw[:suppressions.RAW_LIMIT]))


def process_refusal(engine: Engine, settings: Settings, *, kind: str, ident: int, reply: str, source: str = "rcpt",
                    now: float | None = None) -> BounceOutcome:
    """A refusal for good at send time (`550 5.1.1 … User unknown` at RCPT), for delivery (`kind` 'd') or
    digest ('g') `ident`, by the same rules as a report: hard bounces the delivery and suppresses the address;
    a throttling or policy answer never touches the address."""
    now = time.time() if now is None else now
    verdict = classify.classify_reply(reply)
    key = suppressions.report_key(f"{source}:{kind}{ident}:{reply}", b"")
    return _act(engine, settings, verdict, match.Match(tags.Named(kind, ident), source), key=key, source=source,
                now=now, subject=f"refused at send time: {reply}"[:255], raw=reply.encode("utf-8"))


def _act(engine, settings, verdict, found, *, key, source, now, subject, raw) -> BounceOutcome:
    target = _target(engine, found.named) if found.named is not None else None
    outcome = _outcome(verdict, found, target)

    def write() -> BounceOutcome:
        with engine.begin() as conn:
            if not suppressions.store_report(conn, key, now=now, source=source, kind=outcome.kind,
                                             reason=outcome.reason, subject=subject, raw=raw,
                                             delivery_id=outcome.delivery_id, digest_id=outcome.digest_id,
                                             address=outcome.address):
                stored = suppressions.report_seen(conn, key)
                return BounceOutcome(stored.kind, stored.delivery_id, stored.digest_id, stored.reason, True,
                                     duplicate=True, address=outcome.address, via=outcome.via)
            if outcome.kind == "hard":
                return _hard(conn, settings, outcome, target, source, now)
            if outcome.kind == "soft":
                return _soft(conn, settings, outcome, now)
            return outcome
    return _logged(with_retries(write), settings)


def _target(engine, named: tags.Named):
    """(address, [(delivery id, userid, address source)]) of the named delivery or digest; None when gone."""
    with engine.connect() as conn:
        if named.kind == "g":
            address = conn.execute(sa.select(digests.c.address).where(digests.c.id == named.id)).scalar()
            rows = conn.execute(sa.select(deliveries.c.id, deliveries.c.userid, deliveries.c.address_source)
                                .where(deliveries.c.digest_id == named.id)).all()
        else:
            row = conn.execute(sa.select(deliveries.c.id, deliveries.c.userid, deliveries.c.address_source,
                                         deliveries.c.address).where(deliveries.c.id == named.id)).first()
            address, rows = (row.address, [row]) if row is not None else (None, [])
    return (address, rows) if address else None


def _outcome(verdict, found, target) -> BounceOutcome:
    """The outcome before acting: unmatched when nothing of ours is named, or the report is about someone else."""
    if found.named is None:
        why = ("a tag with a wrong MAC (forged, or mail of another installation)" if found.forged
               else "no VERP tag, ENVID or Message-ID of ours")
        return BounceOutcome("unmatched", None, None, f"{why}; the report says: {verdict.kind} {verdict.reason}"[:1000],
                             True)
    delivery_id = found.named.id if found.named.kind == "d" else None
    digest_id = found.named.id if found.named.kind == "g" else None
    if target is None:
        what = f"delivery {delivery_id}" if delivery_id else f"digest {digest_id}"
        return BounceOutcome("unmatched", delivery_id, digest_id, f"names {what}, which is not in the state "
                             f"database (removed by RETENTION_DAYS?)", True, via=found.via)
    address = target[0]
    named = [r for r in verdict.recipients if r]
    if named and suppressions.normal(address) not in named:
        # Only the address we mailed can be acted on: a report about another one changes nothing.
        return BounceOutcome("unmatched", delivery_id, digest_id, f"reports on {', '.join(named)[:200]}, but "
                             f"that mail went to {address}", True, address=address, via=found.via)
    return BounceOutcome(verdict.kind, delivery_id, digest_id, verdict.reason, True, address=address, via=found.via)


def _hard(conn, settings, outcome: BounceOutcome, target, source: str, now: float) -> BounceOutcome:
    """The delivery (every delivery of a digest) `bounced`; the address suppressed; a bad guess remembered."""
    address, rows = target
    ids = [r.id for r in rows]
    conn.execute(deliveries.update().where(deliveries.c.id.in_(ids), deliveries.c.status.in_(ACTED_STATUSES))
                 .values(status="bounced", reason=outcome.reason[:1000]))
    new = suppressions.suppress(conn, address, outcome.reason, "rcpt" if source == "rcpt" else "bounce", now,
                                outcome.delivery_id or (ids[0] if ids else None))
    for row in rows:
        if row.address_source == "pattern":
            suppressions.remember_bad_guess(conn, row.userid, address, now)
    return _with(outcome, suppressed=new)


def _soft(conn, settings, outcome: BounceOutcome, now: float) -> BounceOutcome:
    """Count it (once per address and day); BOUNCE_SOFT_LIMIT days within 7 suppress the address."""
    days = suppressions.count_soft(conn, outcome.address, now, settings.tz, outcome.reason)
    if days < settings.bounce_soft_limit:
        return _with(outcome, reason=f"{outcome.reason} (soft bounce {days} of {settings.bounce_soft_limit} "
                                     "within 7 days)")
    why = f"{days} soft bounces within 7 days, the last: {outcome.reason}"
    new = suppressions.suppress(conn, outcome.address, why, "bounce", now, outcome.delivery_id)
    return _with(outcome, reason=why, suppressed=new)


def _with(outcome: BounceOutcome, **changes) -> BounceOutcome:
    return BounceOutcome(**{**outcome.__dict__, **changes})


def _logged(outcome: BounceOutcome, settings) -> BounceOutcome:
    """One log line per processed report: WARNING for what matched nothing or blocks the sender."""
    if outcome.duplicate:
        log.info("bounce report seen before (%s): nothing changes", describe(outcome))
    elif outcome.kind in ("unmatched", "sender_blocked"):
        log.warning("bounce report %s", mask(describe(outcome), settings))
    else:
        log.info("bounce report %s", mask(describe(outcome), settings))
    return outcome


def describe(outcome: BounceOutcome) -> str:
    """`delivery 12 <a@corp.example>: hard: 5.1.1 …` — what the command prints and the log says."""
    what = (f"delivery {outcome.delivery_id}" if outcome.delivery_id else
            f"digest {outcome.digest_id}" if outcome.digest_id else "no delivery")
    who = f" <{outcome.address}>" if outcome.address else ""
    kind = outcome.kind.replace("_", " ")
    extra = ", address suppressed" if outcome.suppressed else ", seen before" if outcome.duplicate else ""
    return f"{what}{who}: {kind}{extra}: {outcome.reason}"
