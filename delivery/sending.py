"""A sending round: the due deliveries of one event, over SMTP_CONNECTIONS connections, each outcome marked."""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

import mailer
from delivery import backoff
from store import outbox

log = logging.getLogger("wecom_mailer.worker")


def send_event(worker, row, started: float) -> None:
    """Send the due deliveries of a held event over one reused connection per SMTP_CONNECTIONS."""
    event = _EventRound(worker, row.id)
    due = outbox.due_deliveries(worker.engine, row.id)
    subject, body = outbox.event_message(worker.engine, row.id)
    items = [mailer.Outgoing(d.id, d.address, d.name, subject, body) for d in due]
    meta = {d.id: d for d in due}
    try:
        mailer.send_all(worker.settings, items, lambda item, result: event.record(meta[item.delivery_id], result),
                        worker.stop, before_content=event.settle)
    finally:
        event.close()
    if event.lost:
        log.warning("event %s: lease lost during sending; another worker continues", row.id)
        return
    if event.retry_at is not None or (event.failed and not worker.stop.is_set()):
        # Left untried because the connection failed: they share the retry clock, and give up together.
        hours = worker.settings.retry_max_hours
        outbox.postpone_untried(worker.engine, row.id, event.retry_at or time.time(),
                                give_up_before=time.time() - hours * 3600,
                                reason=f"gave up after RETRY_MAX_HOURS ({hours:g} h): the SMTP connection "
                                       "kept failing before this message could be tried")
    next_due = outbox.next_open_delivery_at(worker.engine, row.id)
    counts = outbox.delivery_counts(worker.engine, row.id)
    summary = (f"{event.sent} sent, {counts.get('skipped', 0)} skipped (no address), "
               f"{event.failed} failed, {event.retried} to retry")
    if next_due is None:
        outbox.update_event(worker.engine, row.id, worker.owner, status="done", finished_at=time.time(),
                            reason=_final_reason(counts))
        worker.observe_event("done")
    else:
        outbox.update_event(worker.engine, row.id, worker.owner, next_attempt_at=next_due,
                            reason=_final_reason(counts))
    log.info("event %s %s userid=%s: %s in %.1f s", row.id, row.change_type, row.user_id, summary,
             time.monotonic() - started)


class _EventRound:
    """Outcomes of one sending round of one event; called from the SMTP threads."""

    def __init__(self, worker, event_id: int):
        self.worker = worker
        self.event_id = event_id
        self.sent = self.failed = self.retried = 0
        self.retry_at: float | None = None
        self.lost = False
        self.marks = outbox.DeliveryMarks(worker.engine)
        self._lock = threading.Lock()
        # Over SMTP a writer thread writes the outcomes while the next messages start; each sending thread
        # runs settle() before its next message's content goes out (mailer's before_content), so the
        # server never accepts a message while an earlier outcome on that connection is unwritten.
        # What several connections hand over meanwhile goes out together: the sent ones in one UPDATE.
        self.pipelined = worker.settings.mail_backend == "smtp"
        self._local = threading.local()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None

    def record(self, delivery, result) -> bool:
        """Write one outcome (so a crash repeats at most the message in flight); False to stop."""
        if not self.pipelined:
            self._write([(delivery, result)])
            return not self.lost
        self.settle()  # at most one outcome in flight per connection
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_queued, name="smtp-marks", daemon=True)
                self._writer.start()
        written = self._local.pending = Future()
        self._queue.put((delivery, result, written))
        return not self.lost

    def settle(self) -> None:
        """Wait until this sending thread's latest outcome is written; raises what writing it raised."""
        pending = getattr(self._local, "pending", None)
        if pending is not None:
            self._local.pending = None
            pending.result()

    def close(self) -> None:
        """Wait until every outcome is written, then give back the connections; raises a write error."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        self.marks.close()
        if self._failure is not None:
            raise self._failure

    def _write_queued(self) -> None:
        """The writer thread: everything queued since its last write, in one go, until close()."""
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None and not self._queue.empty():
                batch.append(self._queue.get())
            entries = [entry for entry in batch if entry is not None]
            try:
                self._write([(delivery, result) for delivery, result, _ in entries])
            except BaseException as exc:  # the sending threads see it at their next settle()
                self._failure = self._failure or exc
                for *_, written in entries:
                    written.set_exception(exc)
            else:
                for *_, written in entries:
                    written.set_result(None)
            if batch[-1] is None:
                return

    def _write(self, outcomes) -> None:
        """Write outcomes: the sent ones in one statement, a failure or a retry each on its own."""
        worker, settings, now = self.worker, self.worker.settings, time.time()
        sent = [delivery.id for delivery, result in outcomes if result.ok]
        if sent:
            self.marks.mark_sent(sent, now)
        counted = [("sent", None)] * len(sent)
        for delivery, result in outcomes:
            if result.ok:
                continue
            attempts = delivery.attempts + 1
            first = delivery.first_attempt_at or now
            if result.permanent or now - first > settings.retry_max_hours * 3600:
                reason = result.reason if result.permanent else f"gave up after {attempts} attempts: {result.reason}"
                self.marks.mark(delivery.id, status="failed", attempts=attempts,
                                first_attempt_at=first, reason=reason[:1000])
                counted.append(("failed", None))
            else:
                retry_at = now + backoff.seconds(attempts, settings.retry_backoff)
                self.marks.mark(delivery.id, status="retry", attempts=attempts,
                                first_attempt_at=first, next_attempt_at=retry_at, reason=result.reason[:1000])
                counted.append(("retry", retry_at))
        with self._lock:
            for outcome, retry_at in counted:
                if outcome == "sent":
                    self.sent += 1
                elif outcome == "failed":
                    self.failed += 1
                else:
                    self.retried += 1
                    self.retry_at = retry_at if self.retry_at is None else min(self.retry_at, retry_at)
                if worker.metrics:
                    worker.metrics.delivery(outcome)
            if worker.lease.lost.is_set():  # another process holds the event now: stop after this message
                self.lost = True


def _final_reason(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


