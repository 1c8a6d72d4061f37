"""The delivery loop: claim → scope → template → members → deliveries → send."""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future

from sqlalchemy.exc import DBAPIError

import addressbook
import mailer
import outbox
import templates_repo
import wecom

log = logging.getLogger("wecom_mailer.worker")
POLL_SECONDS = 1.0
SNAPSHOT_RETRY_SECONDS = 60.0


class Worker:
    """One delivery loop; owns its lease identity. Run it in a thread (web) or alone (`flask worker`)."""

    def __init__(self, settings, engine, template_engine, client, metrics=None):
        self.settings = settings
        self.engine = engine
        self.template_engine = template_engine
        self.client = client
        self.metrics = metrics
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop = threading.Event()
        self.wakeup = threading.Event()
        self.lease: _LeaseKeeper | None = None  # the lease on the event in hand
        self.thread: threading.Thread | None = None  # set by start_in_background
        self._snapshots_due = 0.0

    # -- loop ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the background loop and wait: the message in flight finishes, the lease is released."""
        self.stop.set()
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join(timeout=self.settings.smtp_timeout + 5)

    def run(self) -> None:
        """Work until `stop` is set; a failure of one round is logged, never fatal."""
        log.info("delivery worker %s started", self.owner)
        while not self.stop.is_set():
            try:
                outbox.ensure_schema(self.engine)  # a worker started before its database creates the tables
                self.ensure_snapshots()
                busy = self.run_once()
            except DBAPIError as exc:
                log.warning("state database error, retrying in %.0f s: %s", POLL_SECONDS * 5,
                            exc.orig.__class__.__name__)
                busy = False
                self.stop.wait(POLL_SECONDS * 4)
            except Exception:
                log.exception("delivery round failed; continuing")
                busy = False
            if not busy:
                self.wakeup.wait(POLL_SECONDS)
                self.wakeup.clear()
        log.info("delivery worker %s stopped", self.owner)

    def run_once(self) -> bool:
        """Process one due event, if any; True when there was one."""
        row = outbox.claim_event(self.engine, self.owner, self.settings.lease_seconds)
        if row is None:
            return False
        started = time.monotonic()
        self.lease = _LeaseKeeper(self, row.id)  # renewed while we work, however slow WeCom or SMTP are
        try:
            if row.status == "pending":
                if not self.expand(row):
                    return True
            self.send(row, started)
            return True
        finally:
            self.lease.close()

    def ensure_snapshots(self) -> None:
        """Take the member snapshot of each watched department that has none (at start-up, then retried)."""
        if time.time() < self._snapshots_due:
            return
        taken = outbox.load_snapshots(self.engine, self.settings.department_ids, userids=())  # no member rows
        missing = [d for d in self.settings.department_ids if d not in taken]
        self._snapshots_due = float("inf")
        if not missing:
            return
        try:
            self.refresh_snapshots(self.client.list_members(missing, self.settings.fetch_child))
            log.info("member snapshot taken for department(s) %s", ",".join(map(str, missing)))
        except wecom.WeComError as exc:
            self._snapshots_due = time.time() + SNAPSHOT_RETRY_SECONDS
            log.warning("cannot take the member snapshot of department(s) %s yet: %s",
                        ",".join(map(str, missing)), exc)

    def refresh_snapshots(self, members_by_department) -> None:
        for department_id, members in members_by_department.items():
            covered = self.client.covered.get(department_id, (department_id,))
            outbox.save_snapshot(self.engine, department_id, members, covered)

    # -- expansion: from an event to delivery rows ---------------------------------------------

    def expand(self, row) -> bool:
        """Decide scope, render, list members and write deliveries; False when the event ends here."""
        settings = self.settings
        try:
            change = wecom.parse_event(row.xml)
        except wecom.CallbackRejected as exc:  # e.g. XML cut short by schema 1's 64 KB column: it never will parse
            return self.finish(row, "failed", f"stored event XML does not parse: {exc.reason}")
        touched = self.touched_departments(change)
        if not touched:
            return self.finish(row, "ignored", "not a change to a member of a watched department")
        try:
            template = templates_repo.load_template(self.template_engine, settings.template_table,
                                                    settings.template_app, change.change_type)
        except DBAPIError as exc:
            return self.postpone(row, f"template database unavailable ({exc.orig.__class__.__name__})")
        if template is None:
            return self.finish(row, "skipped", f"no template for change_type {change.change_type!r} "
                                               f"(app {settings.template_app!r} in {settings.template_table})")
        try:
            members_by_department = self.client.list_members(touched, settings.fetch_child)
        except wecom.WeComError as exc:
            if exc.permanent:
                return self.finish(row, "failed", str(exc))
            return self.postpone(row, str(exc))
        self.refresh_snapshots(members_by_department)
        members = list({m.userid: m for ms in members_by_department.values() for m in ms}.values())
        name_fallback = next((m.name for m in members if m.userid == change.user_id), "")
        try:
            subject, body = templates_repo.render_email(template, change, settings.tz, name_fallback)
        except templates_repo.RenderError as exc:
            return self.finish(row, "failed", f"template error: {exc}")
        try:
            resolved = addressbook.resolve(settings, self.engine, members)
        except DBAPIError as exc:
            return self.postpone(row, f"address book unavailable ({exc.orig.__class__.__name__})")
        rows = []
        for member, address in resolved:
            rows.append({"userid": member.userid[:64], "name": member.name[:255], "address": address,
                         "status": "pending" if address else "skipped",
                         "reason": None if address else "no address"})
        if not outbox.expand_event(self.engine, row.id, self.owner, subject, body, rows):
            log.warning("event %s: lease lost while expanding; another worker has it", row.id)
            return False
        return True

    def touched_departments(self, change) -> list[int]:
        """The watched departments this change concerns (NOTIFY_SCOPE), from the event and the snapshot."""
        watched = self.settings.department_ids
        if not change.is_member_change:
            return []
        if self.settings.notify_scope == "corp":
            return list(watched)
        userids = {change.user_id, change.fields.get("newuserid", "")} - {""}
        snapshots = outbox.load_snapshots(self.engine, watched, userids)
        touched = []
        for department_id in watched:
            covered, members = snapshots.get(department_id, ({department_id}, set()))
            if covered & set(change.departments) or userids & members:
                touched.append(department_id)
        return touched

    def finish(self, row, status: str, reason: str) -> bool:
        outbox.update_event(self.engine, row.id, self.owner, status=status, reason=reason,
                            finished_at=time.time())
        level = logging.WARNING if status == "failed" else logging.INFO
        log.log(level, "event %s %s userid=%s: %s (%s)", row.id, row.change_type, row.user_id, status, reason)
        self._observe_event(status)
        return False

    def postpone(self, row, reason: str) -> bool:
        """A transient failure before deliveries exist: back off, or fail after RETRY_MAX_HOURS."""
        now = time.time()
        first = row.first_attempt_at or now
        attempts = row.attempts + 1
        if now - first > self.settings.retry_max_hours * 3600:
            return self.finish(row, "failed", f"gave up after {attempts} attempts: {reason}")
        delay = outbox.backoff_seconds(attempts, self.settings.retry_backoff)
        outbox.update_event(self.engine, row.id, self.owner, attempts=attempts, first_attempt_at=first,
                            next_attempt_at=now + delay, reason=reason)
        log.warning("event %s %s: %s; retry %d in %.0f s", row.id, row.change_type, reason, attempts, delay)
        return False

    # -- sending -------------------------------------------------------------------------------

    def send(self, row, started: float) -> None:
        """Send the due deliveries of a held event over one reused connection per SMTP_CONNECTIONS."""
        event = _EventRound(self, row.id)
        due = outbox.due_deliveries(self.engine, row.id)
        subject, body = outbox.event_message(self.engine, row.id)
        items = [mailer.Outgoing(d.id, d.address, d.name, subject, body) for d in due]
        meta = {d.id: d for d in due}
        try:
            mailer.send_all(self.settings, items, lambda item, result: event.record(meta[item.delivery_id], result),
                            self.stop, before_content=event.settle)
        finally:
            event.close()
        if event.lost:
            log.warning("event %s: lease lost during sending; another worker continues", row.id)
            return
        if event.retry_at is not None or (event.failed and not self.stop.is_set()):
            # Left untried because the connection failed: they share the retry clock, and give up together.
            hours = self.settings.retry_max_hours
            outbox.postpone_untried(self.engine, row.id, event.retry_at or time.time(),
                                    give_up_before=time.time() - hours * 3600,
                                    reason=f"gave up after RETRY_MAX_HOURS ({hours:g} h): the SMTP connection "
                                           "kept failing before this message could be tried")
        next_due = outbox.next_open_delivery_at(self.engine, row.id)
        counts = outbox.delivery_counts(self.engine, row.id)
        summary = (f"{event.sent} sent, {counts.get('skipped', 0)} skipped (no address), "
                   f"{event.failed} failed, {event.retried} to retry")
        if next_due is None:
            outbox.update_event(self.engine, row.id, self.owner, status="done", finished_at=time.time(),
                                reason=_final_reason(counts))
            self._observe_event("done")
        else:
            outbox.update_event(self.engine, row.id, self.owner, next_attempt_at=next_due,
                                reason=_final_reason(counts))
        log.info("event %s %s userid=%s: %s in %.1f s", row.id, row.change_type, row.user_id, summary,
                 time.monotonic() - started)

    def _observe_event(self, status: str) -> None:
        if self.metrics:
            self.metrics.event_finished(status)


class _LeaseKeeper:
    """Renews the lease on the event in hand every LEASE_SECONDS/3 from its own thread, so a slow WeCom call
    or SMTP reply never lets another process take over live work; `lost` is set once someone else holds it."""

    def __init__(self, worker: Worker, event_id: int):
        self.lost = threading.Event()
        self._done = threading.Event()
        self._args = (worker.engine, event_id, worker.owner, worker.settings.lease_seconds)
        self._thread = threading.Thread(target=self._renew, name="wecom-mailer-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        engine, event_id, owner, lease_seconds = self._args
        while not self._done.wait(lease_seconds / 3):
            try:
                if not outbox.renew_lease(engine, event_id, owner, lease_seconds):
                    self.lost.set()
                    return
            except DBAPIError as exc:  # try again at the next beat; the lease may run out meanwhile
                log.warning("event %s: cannot renew the lease (%s)", event_id, exc.orig.__class__.__name__)

    def close(self) -> None:
        """Stop renewing (the caller has released the lease or is about to give it up)."""
        self._done.set()
        self._thread.join(timeout=self._args[3])


class _EventRound:
    """Outcomes of one sending round of one event; called from the SMTP threads."""

    def __init__(self, worker: Worker, event_id: int):
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
                retry_at = now + outbox.backoff_seconds(attempts, settings.retry_backoff)
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


def start_in_background(worker: Worker) -> threading.Thread:
    """Run the worker in a daemon thread of the web process; stopped and joined at exit."""
    import atexit

    thread = threading.Thread(target=worker.run, name="wecom-mailer-worker", daemon=True)
    thread.start()
    worker.thread = thread
    # A fallback only: by atexit time thread pools refuse new work. gunicorn.conf.py's worker_exit comes first.
    atexit.register(worker.shutdown)
    return thread
