"""One sending round of one event: its due deliveries sent, each outcome marked on its row as it comes."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import mailer
from delivery import bounce_rules, retry
from delivery.limits import daily_limit_reason, next_day_start
from delivery.sending import send_batch
from store import outbox, recipients

log = logging.getLogger("wecom_mailer.worker")


@dataclass
class Tally:
    """What a round did, counted by whichever of its connections records an outcome."""

    sent: int = 0
    failed: int = 0
    retried: int = 0
    retry_at: float | None = None  # the earliest retry a refusal scheduled
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, values: dict) -> None:
        with self._lock:
            status = values["status"]
            if status == "sent":
                self.sent += 1
            elif status == "failed":
                self.failed += 1
            else:
                self.retried += 1
                at = values["next_attempt_at"]
                self.retry_at = at if self.retry_at is None else min(self.retry_at, at)


def send_event(worker, row, started: float) -> None:
    """Send the due deliveries of a held event; then schedule what is left, or finish the event."""
    settings, engine = worker.settings, worker.engine
    due = outbox.due_deliveries(engine, row.id, now=worker.clock())
    subject, body = outbox.event_message(engine, row.id)
    tally, marks = Tally(), outbox.DeliveryMarks(engine)
    due = bounce_rules.screen(worker, due, marks) if due else due  # suppressed since the rows were written
    by_id = {d.id: d for d in due}
    mailed: list[str] = []  # addresses sent to, whose digest window then runs from the end of the round

    def record(outcomes: list[tuple[mailer.Outgoing, mailer.SendResult]]) -> bool:
        """Mark deliveries (durably, before the next content goes out on their connection): the sent ones
        in one statement, each other outcome on its own; False once the lease is lost."""
        now, sent = worker.clock(), []
        for item, result in outcomes:
            delivery = by_id[item.delivery_id]
            if result.ok:
                sent.append(delivery.id)
                values = {"status": "sent"}
            elif result.quota:  # the provider's day is used up: no attempt, it waits for tomorrow with the rest
                resume_at = next_day_start(now, settings.tz)
                values = {"status": "retry", "next_attempt_at": resume_at,
                          "reason": daily_limit_reason(settings, resume_at, result.reason)[:1000]}
                marks.mark(delivery.id, **values)
            else:
                values = retry.outcome(settings, result, delivery.attempts, delivery.first_attempt_at, now)
                marks.mark(delivery.id, **values)
                if values["status"] == "failed":  # 550 5.1.1 at RCPT: bounced and suppressed, as after a DSN
                    bounce_rules.after_refusal(worker, "d", delivery.id, result)
            tally.add(values)
            if values["status"] == "sent" and worker.digest_on:
                mailed.append(delivery.address)
            if worker.metrics:
                worker.metrics.delivery(values["status"])
        if sent:
            marks.mark_sent(sent, now)
        return not worker.lease.lost.is_set()

    items = [mailer.Outgoing(d.id, d.address, d.name, subject, body, bounce_rules.tag(worker, "d", d.id))
             for d in due]
    halt = None
    try:
        if items:  # every recipient held for a digest: nothing to send, no connection to check
            halt = send_batch(settings, items, record, stop=worker.stop, pool=worker.smtp_pool, gate=worker.gate)
    finally:
        marks.close()
    if worker.metrics and settings.smtp_max_per_day:
        worker.metrics.sent_today(worker.gate.used_today())
    if mailed:
        recipients.push_windows(engine, mailed, worker.clock() + settings.digest_window)
    if worker.lease.lost.is_set():
        log.warning("event %s: lease lost during sending; another worker continues", row.id)
        return
    if halt is not None:
        _schedule_untried(worker, row, halt, tally)
    next_due = outbox.next_open_delivery_at(engine, row.id)
    counts = outbox.delivery_counts(engine, row.id)
    held = f", {counts['held']} held for digest" if counts.get("held") else ""
    summary = (f"{tally.sent} sent{' at once' if held else ''}{held}, {counts.get('skipped', 0)} skipped "
               f"(no address), {tally.failed} failed, {tally.retried} to retry")
    if next_due is None:
        status = outbox.settle_event(engine, row.id, worker.owner, worker.clock(), outbox.counts_reason(counts))
        if status == "done":
            worker.observe_event("done")
    else:
        outbox.update_event(engine, row.id, worker.owner, next_attempt_at=next_due,
                            reason=outbox.counts_reason(counts))
    waited = f", {worker.gate.waited:.1f} s waiting for SMTP_MAX_PER_MINUTE" if worker.gate.waited else ""
    worker.gate.waited = 0.0
    log.info("event %s %s userid=%s: %s in %.1f s%s", row.id, row.change_type, row.user_id, summary,
             time.monotonic() - started, waited)


def _schedule_untried(worker, row, halt, tally: Tally) -> None:
    """A round that stopped early: what it left untried waits, all together, for one time."""
    settings, now = worker.settings, worker.clock()
    if halt.quota:
        if halt.resume_at is None:  # the provider said so, not our own SMTP_MAX_PER_DAY
            resume_at = next_day_start(now, settings.tz)
            reason = daily_limit_reason(settings, resume_at, halt.reason)
        else:
            resume_at, reason = halt.resume_at, halt.reason
        waiting = outbox.wait_for_quota(worker.engine, row.id, resume_at, reason, now)
        log.warning("event %s: %s; %d more deliveries wait with it", row.id, reason, waiting)
        return
    if halt.throttled:
        log.warning("event %s: the SMTP server is throttling (%s); the rest of the round waits", row.id,
                    halt.reason)
        if worker.metrics:
            worker.metrics.throttle_pause()
    # One shared retry time on the backoff schedule: one attempt counted for the round, not one per member.
    until = tally.retry_at or now + retry.backoff_seconds(1, settings.retry_backoff)
    hours = settings.retry_max_hours
    outbox.postpone_untried(worker.engine, row.id, until, give_up_before=now - hours * 3600, now=now,
                            reason=f"gave up after RETRY_MAX_HOURS ({hours:g} h): the SMTP connection "
                                   "kept failing before this message could be tried")
