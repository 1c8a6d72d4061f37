"""The delivery loop: claim an event (lease) → expand it into deliveries → send them; one thread, one owner."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy.exc import DBAPIError

import wecom_api
from bounces.intake import Poller
from channels import fallback
from delivery import digest, retry
from delivery.event_round import send_event
from delivery.expand import expand
from delivery.lease import LeaseKeeper
from delivery.limits import Gate
from delivery.reconcile import Reconciler
from delivery.retention import Pruner
from smtp_session import Pool
from store import outbox
from store.db import StateUnavailable
from store.migrate import ensure_schema
from store.snapshots import load_snapshots, save_snapshot

log = logging.getLogger("wecom_mailer.worker")
POLL_SECONDS = 1.0
SNAPSHOT_RETRY_SECONDS = 60.0
LEFTOVER_DIGESTS_SECONDS = 60.0  # with the digest off: how often to look for what was held before


class Worker:
    """One delivery loop; owns its lease identity. Run it in a thread (web) or alone (`flask worker`)."""

    def __init__(self, settings, engine, template_engine, client, metrics=None, reconcile_client=None,
                 clock=time.time, app_client=None):
        self.settings = settings
        self.engine = engine
        self.template_engine = template_engine
        self.client = client
        self.app_client = app_client  # the self-built app's (WeCom application messages); None without one
        self.metrics = metrics
        self.clock = clock  # every time the worker writes or compares; tests move it to tomorrow
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop = threading.Event()
        self.wakeup = threading.Event()
        # SMTP connections stay open across events (up to 30 s idle): a burst of small events logs in once.
        self.smtp_pool = Pool(settings) if settings.mail_backend == "smtp" else None
        self.gate = Gate(engine, settings, lambda: self.clock(), self.stop)
        self.lease: LeaseKeeper | None = None  # the lease on the event in hand
        self.thread: threading.Thread | None = None  # set by start()
        self.digest_on = digest.active(settings)
        self._snapshots_due = 0.0
        self._beat_at = float("-inf")  # monotonic time of the last heartbeat (WORKER_HEARTBEAT_FILE)
        self._beat_failed = False
        self.digests_paused_until = 0.0  # monotonic; the flush waits (digest off, template database down)
        # Its own WeCom client: a round runs in a thread of its own, beside this loop's listings.
        self.reconciler = Reconciler(settings, engine, reconcile_client or client, self.owner, metrics,
                                     stop=self.stop, on_announced=self.wakeup.set)
        self.pruner = Pruner(settings, engine, self.owner, self.stop)  # RETENTION_DAYS, hourly, one process
        self.bounce_poller = Poller(settings, engine, self.owner, stop=self.stop)  # BOUNCE_IMAP_URL, if set

    # -- loop ----------------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Run the loop in a daemon thread of this process (the web process's delivery thread)."""
        self.thread = threading.Thread(target=self.run, name="wecom-mailer-worker", daemon=True)
        self.thread.start()
        return self.thread

    def shutdown(self) -> None:
        """Stop the loop and wait: the message in flight finishes, the lease is released."""
        self.stop.set()
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join(timeout=self.settings.smtp_timeout + 5)
        self.reconciler.join(timeout=5)  # a round in a slow WeCom call is not waited out: its lease ends by itself
        self.pruner.join(timeout=5)  # stops after the batch in hand and releases its lease
        self.bounce_poller.join(timeout=5)  # nor a poll in a slow IMAP call: it stops at its next batch
        if self.smtp_pool is not None and (self.thread is None or not self.thread.is_alive()):
            self.smtp_pool.close()

    def run(self) -> None:
        """Work until `stop` is set; a failure of one round is logged, never fatal."""
        log.info("delivery worker %s started", self.owner)
        while not self.stop.is_set():
            self.beat()  # first: a round that fails on the database still turns the loop
            try:
                ensure_schema(self.engine)  # a worker started before its database creates the tables
                self.ensure_snapshots()
                busy = self.run_once()
                self.reconciler.tick(idle=not busy)  # a due round starts in its own thread, preferably when idle
                self.pruner.tick()
                self.bounce_poller.tick()  # so does a due poll of the bounce mailbox
            except (DBAPIError, StateUnavailable) as exc:
                reason = exc.orig.__class__.__name__ if isinstance(exc, DBAPIError) else str(exc)
                log.warning("state database error, retrying in %.0f s: %s", POLL_SECONDS * 4, reason)
                busy = False
                self.stop.wait(POLL_SECONDS * 4)
            except Exception:
                log.exception("delivery round failed; continuing")
                busy = False
            if not busy:
                if self.smtp_pool is not None:
                    self.smtp_pool.close_idle()
                self.wakeup.wait(min(POLL_SECONDS, self.reconciler.due_in(), self.bounce_poller.due_in()))
                self.wakeup.clear()
        if self.smtp_pool is not None:
            self.smtp_pool.close()
        log.info("delivery worker %s stopped", self.owner)

    def beat(self) -> None:
        """Touch WORKER_HEARTBEAT_FILE (at most once a second): the loop, or a sending round, is turning.

        Called at the top of every loop round, whatever the database does, and for each outcome a sending
        round records (delivery/event_round.py): a long fan-out is progress, not a hang."""
        path = self.settings.worker_heartbeat_file
        now = time.monotonic()
        if not path or now - self._beat_at < 1.0:
            return
        self._beat_at = now
        try:
            Path(path).touch()
        except OSError as exc:
            if not self._beat_failed:  # once: a liveness probe on this file will say the rest
                log.warning("cannot touch WORKER_HEARTBEAT_FILE %s (%s): is its directory writable?", path,
                            exc.strerror)
            self._beat_failed = True

    def run_once(self) -> bool:
        """Process one due event, if any, then send the digests that are due; True when there was work."""
        handled = self.run_event_once()
        fallback.sweep(self)  # emails that failed or bounced after their round: WECOM_MESSAGE=fallback
        return self.run_digests_once() or handled

    def run_digests_once(self) -> bool:
        """Send the digests that are due; True when there were some. With the digest off, only once a
        minute: deliveries held before it was turned off still go."""
        if time.monotonic() < self.digests_paused_until:
            return False
        if not self.digest_on:
            self.digests_paused_until = time.monotonic() + LEFTOVER_DIGESTS_SECONDS
        return digest.send_due(self)

    def run_event_once(self) -> bool:
        """Process one due event, if any; True when there was one."""
        row = outbox.claim_event(self.engine, self.owner, self.settings.lease_seconds, now=self.clock())
        if row is None:
            return False
        started = time.monotonic()
        self.lease = LeaseKeeper(self.engine, row.id, self.owner, self.settings.lease_seconds, self.clock)
        try:
            if row.status == "pending" and not expand(self, row):
                return True
            send_event(self, row, started)
            return True
        finally:
            self.lease.close()

    # -- member snapshots ----------------------------------------------------------------------

    def ensure_snapshots(self) -> None:
        """Take the member snapshot of each watched department that has none (at start-up, then retried)."""
        if time.time() < self._snapshots_due:
            return
        taken = load_snapshots(self.engine, self.settings.department_ids, userids=())  # no member rows
        missing = [d for d in self.settings.department_ids if d not in taken]
        self._snapshots_due = float("inf")
        if not missing:
            return
        try:
            self.refresh_snapshots(self.client.list_members(missing, self.settings.fetch_child))
            log.info("member snapshot taken for department(s) %s", ",".join(map(str, missing)))
        except wecom_api.WeComError as exc:
            self._snapshots_due = time.time() + SNAPSHOT_RETRY_SECONDS
            log.warning("cannot take the member snapshot of department(s) %s yet: %s",
                        ",".join(map(str, missing)), exc)

    def refresh_snapshots(self, members_by_department) -> None:
        for department_id, members in members_by_department.items():
            covered = self.client.covered.get(department_id, (department_id,))
            save_snapshot(self.engine, department_id, members, covered)

    # -- an event's end, or its postponement -----------------------------------------------------

    def finish(self, row, status: str, reason: str) -> bool:
        """End the event with `status` and `reason` (ignored, skipped, failed); False: nothing to send."""
        outbox.update_event(self.engine, row.id, self.owner, status=status, reason=reason,
                            finished_at=self.clock())
        level = logging.WARNING if status == "failed" else logging.INFO
        log.log(level, "event %s %s userid=%s: %s (%s)", row.id, row.change_type, row.user_id, status, reason)
        self.observe_event(status)
        return False

    def postpone(self, row, reason: str) -> bool:
        """A transient failure before deliveries exist: back off, or fail after RETRY_MAX_HOURS."""
        now = self.clock()
        first = row.first_attempt_at or now
        attempts = row.attempts + 1
        if now - first > self.settings.retry_max_hours * 3600:
            return self.finish(row, "failed", f"gave up after {attempts} attempts: {reason}")
        delay = retry.backoff_seconds(attempts, self.settings.retry_backoff)
        outbox.update_event(self.engine, row.id, self.owner, attempts=attempts, first_attempt_at=first,
                            next_attempt_at=now + delay, reason=reason)
        log.warning("event %s %s: %s; retry %d in %.0f s", row.id, row.change_type, reason, attempts, delay)
        return False

    def observe_event(self, status: str) -> None:
        if self.metrics:
            self.metrics.event_finished(status)
