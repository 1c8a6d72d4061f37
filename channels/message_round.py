"""One event's WeCom messages in its sending round: fallback rows added (WECOM_MESSAGE=fallback), the due
rows cut into calls of up to 1,000 members (one content per event, so ⌈N/1000⌉ calls), each call's outcome
marked on its rows before the next call goes, and the limits every process shares applied first."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import mailer
from channels import wecom_message
from delivery import digest, retry
from channels.admission import admit
from store import channel_rows, recipients
from store.outbox import DeliveryMarks

log = logging.getLogger("wecom_mailer.worker")


@dataclass
class MessageTally:
    """What the WeCom part of a round did."""
    sent: int = 0
    failed: int = 0
    retried: int = 0
    waiting: int = 0
    calls: int = 0
    problems: list[str] = field(default_factory=list)


def add_fallbacks(worker, event_id: int) -> int:
    """WECOM_MESSAGE=fallback: a WeCom row for each member of the event email did not reach (once each)."""
    if worker.settings.wecom_message != "fallback":
        return 0
    members = [(r.userid, r.name) for r in channel_rows.unreached(worker.engine, event_id)]
    if not members:
        return 0
    return channel_rows.add_messages(worker.engine, event_id, members, digest.hold_for(worker),
                                     now=worker.clock())


def send_event_messages(worker, row, subject: str, body: str) -> MessageTally | None:
    """Send the event's due WeCom deliveries; None when it has none."""
    settings, engine = worker.settings, worker.engine
    add_fallbacks(worker, row.id)
    due = channel_rows.due_messages(engine, row.id, worker.clock())
    if not due:
        return None
    tally, started = MessageTally(), time.monotonic()
    if settings.wecom_message == "off" or worker.app_client is None:
        channel_rows.mark_many(engine, [d.id for d in due], {
            "status": "skipped", "reason": "WECOM_MESSAGE is off (or no WECOM_APP_SECRET): not sent"})
        return tally
    content = wecom_message.text_content(subject, body)
    marks, sent_addresses = DeliveryMarks(engine), []
    try:
        chunks = [due[i:i + wecom_message.MAX_USERS] for i in range(0, len(due), wecom_message.MAX_USERS)]
        for n, chunk in enumerate(chunks):
            if worker.stop.is_set() or worker.lease.lost.is_set():
                break
            go, waits = admit(worker, chunk, lambda d: d.address)
            _wait(worker, marks, waits, tally)
            if not go:
                continue
            outcome = wecom_message.send(worker.app_client, settings.agent_id, [d.userid for d in go], content)
            tally.calls += 1
            sent = _mark(worker, marks, go, outcome, tally)
            sent_addresses += [d.address for d in sent]
            if outcome.transient:  # WeCom asks us to slow down: the rest wait with this call's rows
                rest = [d for later in chunks[n + 1:] for d in later]
                _mark(worker, marks, rest, outcome, tally)
                break
    finally:
        marks.close()
    if sent_addresses and worker.digest_on:
        recipients.push_windows(engine, sent_addresses, worker.clock() + settings.digest_window)
    log.info("event %s %s userid=%s: WeCom messages: %d sent, %d failed, %d to retry, %d waiting, in %d call(s), "
             "%.1f s%s", row.id, row.change_type, row.user_id, tally.sent, tally.failed, tally.retried,
             tally.waiting, tally.calls, time.monotonic() - started,
             "".join(f"; {p}" for p in dict.fromkeys(tally.problems)))
    return tally


def _wait(worker, marks: DeliveryMarks, waits: list, tally: MessageTally) -> None:
    now = worker.clock()
    for d, until, reason in waits:
        first = None if d.first_attempt_at is None else d.first_attempt_at + (until - now)
        marks.mark(d.id, status="retry", next_attempt_at=until, reason=reason[:1000], first_attempt_at=first)
        tally.waiting += 1


def _mark(worker, marks: DeliveryMarks, rows: list, outcome: wecom_message.CallOutcome,
          tally: MessageTally) -> list:
    """Record one call's outcome on its rows (durably, before the next call); the rows sent."""
    settings, now = worker.settings, worker.clock()
    by_userid = {d.userid: d for d in rows}
    if outcome.transient or outcome.permanent:
        result = mailer.SendResult(ok=False, permanent=bool(outcome.permanent),
                                   reason=outcome.permanent or outcome.transient)
        failures = {d.userid: result for d in rows}
        sent = []
        if outcome.permanent:
            tally.problems.append(outcome.permanent)
    else:
        sent = [by_userid[u] for u in outcome.sent]
        failures = {u: mailer.SendResult(ok=False, permanent=True, reason=why) for u, why in outcome.failed.items()}
    if sent:
        marks.mark_sent([d.id for d in sent], now)
        tally.sent += len(sent)
        _observe(worker, "sent", len(sent))
    groups: dict[tuple, list[int]] = {}  # one UPDATE per distinct outcome, not one per member
    for userid, result in failures.items():
        d = by_userid[userid]
        values = retry.outcome(settings, result, d.attempts, d.first_attempt_at, now)
        groups.setdefault(tuple(sorted(values.items())), []).append(d.id)
    for values, ids in groups.items():
        values = dict(values)
        channel_rows.mark_many(worker.engine, ids, values)
        if values["status"] == "failed":
            tally.failed += len(ids)
        else:
            tally.retried += len(ids)
        _observe(worker, values["status"], len(ids))
    return sent


def _observe(worker, status: str, n: int) -> None:
    if worker.metrics:
        worker.metrics.delivery(status, "wecom", n)
