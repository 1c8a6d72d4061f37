"""What bounces mean for sending: every message tagged with its delivery (or digest), a suppressed address not
mailed, and a refusal for good at send time classified like a bounce report (bounces/handle.py)."""
from __future__ import annotations

import logging
import re

from sqlalchemy.exc import SQLAlchemyError

from bounces import handle, tags
from store import digests, suppressions

log = logging.getLogger("wecom_mailer.worker")
SMTP_REPLY = re.compile(r"[45][0-9][0-9]\b")  # what the server said, not our own "invalid address" and kin


def tag(worker, kind: str, ident: int) -> str:
    """The tag of delivery (`kind` 'd') or digest ('g') `ident` under this service's key."""
    return tags.make(tags.service_key(worker.engine, worker.settings), kind, ident)


def suppressed_reasons(worker, addresses) -> dict[str, str]:
    """Of `addresses`, the suppressed ones: normal address → `address suppressed: <why, when>`."""
    found = suppressions.suppressed(worker.engine, addresses)
    return {address: suppressions.describe(reason, since, source, worker.settings.tz)
            for address, (reason, since, source) in found.items()}


def screen(worker, due: list, marks) -> list:
    """The due deliveries still to mail: one whose address was suppressed since it was written is marked
    skipped (`address suppressed: …`) instead."""
    blocked = suppressed_reasons(worker, [d.address for d in due])
    if not blocked:
        return due
    kept = []
    for delivery in due:
        reason = blocked.get(suppressions.normal(delivery.address))
        if reason is None:
            kept.append(delivery)
        else:
            marks.mark(delivery.id, status="skipped", reason=reason)
            log.info("delivery %d to %s skipped: %s", delivery.id, delivery.address, reason)
    return kept


def screen_digests(worker, claimed: list) -> list:
    """The claimed digests still to mail: one whose address was suppressed meanwhile ends `failed` with the
    reason `address suppressed: …` on it and every delivery it carried (they were held, never skipped)."""
    blocked = suppressed_reasons(worker, [d.address for d in claimed])
    kept, now = [], worker.clock()
    for digest in claimed:
        reason = blocked.get(suppressions.normal(digest.address))
        if reason is None:
            kept.append(digest)
            continue
        values = {"status": "failed", "attempts": digest.attempts,
                  "first_attempt_at": digest.first_attempt_at or now, "reason": reason}
        done = digests.finish(worker.engine, digest, worker.owner, now, values, worker.settings.digest_window)
        for _ in done or ():
            worker.observe_event("done")
        log.info("digest %d to %s not sent: %s", digest.id, digest.address, reason)
    return kept


def after_refusal(worker, kind: str, ident: int, result) -> None:
    """A refusal for good (`result.permanent`) goes through the bounce classifier: `550 5.1.1` at RCPT bounces
    the delivery and suppresses the address, as a DSN would; a throttling or policy answer touches no address.
    A failure to record it is logged: the delivery itself is already marked."""
    if not result.permanent or not SMTP_REPLY.match(result.reason):
        return
    try:
        handle.process_refusal(worker.engine, worker.settings, kind=kind, ident=ident, reply=result.reason,
                                         now=worker.clock())
    except SQLAlchemyError as exc:
        log.warning("%s %d: refusal not classified (state database: %s)", "digest" if kind == "g" else "delivery",
                    ident, exc.__class__.__name__)
