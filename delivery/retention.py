"""Scheduling retention: one process at a time (the lease `retention`) prunes, hourly, in a thread of its own."""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import DBAPIError

from store import leases, retention
from store.db import StateUnavailable

log = logging.getLogger("wecom_mailer.retention")
LEASE = "retention"
INTERVAL_SECONDS = 3600.0  # how often a run may start: rows become old by the day, an hour is soon enough
HOLD_SECONDS = 600.0  # the lease; a run stops before it ends, and the next run goes on where it stopped
RUN_SECONDS = 540.0
PAUSE_SECONDS = 0.005  # between batches: the callbacks' commits get the database between two deletes
YIELD_FACTOR = 3.0  # and at least three times as long as the last batch took: pruning holds it <= 1/4 of the time
RETRY_AFTER_DB_ERROR_SECONDS = 60.0


def run(settings, engine, owner: str, stop: threading.Event | None = None, now: float | None = None,
        interval: float = INTERVAL_SECONDS) -> retention.Pruned | None:
    """Prune if it is our turn (None: not due, or another process has it); the outcome goes on the lease."""
    now = time.time() if now is None else now
    turn = leases.take_turn(engine, LEASE, owner, interval, HOLD_SECONDS, now)
    if turn.round is None:
        return None
    outcome = "failed"
    try:
        pruned = retention.prune(engine, settings.retention_days, now=now, stop=stop,
                                 deadline=time.monotonic() + RUN_SECONDS, pause=PAUSE_SECONDS,
                                 yield_factor=YIELD_FACTOR)
        outcome = pruned.summary()
    finally:
        leases.finish_turn(engine, LEASE, owner, outcome)  # released at once, also when stopped early
    if pruned.events or pruned.digests or pruned.members or not pruned.complete:
        log.info("retention (%d days): %s", settings.retention_days, outcome)
    return pruned


class Pruner:
    """Starts a run from the worker loop when one may be due, in a thread, so deliveries never wait for it."""

    def __init__(self, settings, engine, owner: str, stop: threading.Event):
        self.settings, self.engine, self.owner, self.stop = settings, engine, owner, stop
        self.thread: threading.Thread | None = None
        self._next_check = 0.0
        self._resume = False  # the last run stopped at its deadline: the next goes on without the interval

    def tick(self) -> None:
        """Start a run if one may be due (the lease decides which process runs it)."""
        if self.settings.retention_days <= 0 or time.time() < self._next_check:
            return
        if self.thread is not None and self.thread.is_alive():
            return
        self.thread = threading.Thread(target=self._run, name="wecom-mailer-retention", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            pruned = run(self.settings, self.engine, self.owner, stop=self.stop,
                         interval=0.0 if self._resume else INTERVAL_SECONDS)
            self._resume = False
        except (DBAPIError, StateUnavailable) as exc:
            reason = exc.orig.__class__.__name__ if isinstance(exc, DBAPIError) else str(exc)
            log.warning("retention: state database error, next try in %.0f s: %s",
                        RETRY_AFTER_DB_ERROR_SECONDS, reason)
            self._next_check = time.time() + RETRY_AFTER_DB_ERROR_SECONDS
            return
        except Exception:
            log.exception("retention run failed; trying again in an hour")
            self._next_check = time.time() + INTERVAL_SECONDS
            return
        if pruned is not None and not pruned.complete and not self.stop.is_set():
            self._resume, self._next_check = True, time.time() + 1.0  # stopped by its deadline: go on
            return
        self._next_check = leases.next_turn_at(self.engine, LEASE, INTERVAL_SECONDS, 1.0)

    def join(self, timeout: float) -> None:
        """Wait for a run in progress (shutdown): it stops after its current batch."""
        if self.thread is not None:
            self.thread.join(timeout)
