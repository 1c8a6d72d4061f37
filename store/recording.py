"""Recording callbacks: one row per event, once (the dedup key), committed before the answer; callbacks
that arrive together are recorded in one INSERT and one commit (group commit).

Leader and followers, as in MySQL's binary-log group commit: a request queues its row; if a writer's slot
is free in this process it becomes the writer, takes every row queued at that moment (its own included),
writes them in one statement and wakes their requests, each alone; rows queued meanwhile wait for the next
writer, which is one of their own requests. A lone callback is written at once in its own thread (no wait to
fill a batch, no hand-over to another thread), and no request is answered before the commit that holds its
row. One slot while writes are fast, a few while they are slow (GroupCommit). The statements themselves
are store/event_writes.py.

Why: under a burst every request used to pay its own statement and its own commit (issue 15 in
BENCHMARKS.md); a batch of n new rows pays one INSERT and one commit (issue 25: and one round trip).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from store.db import StateUnavailable, autocommit_engine, is_transient_db_error
from store.event_writes import write_rows
from store.migrate import ensure_schema

MAX_ROWS = 200  # per INSERT: a few hundred KB of XML, well inside max_allowed_packet
# WeCom waits 5 s for an answer. A row still queued after this long (the writer ahead of it is stuck on a
# hung database, whose reads time out after 3 s) is answered 503 without being written; WeCom retries it.
WAIT_SECONDS = 4.0
# Rows of a batch that failed for a reason of their own are written again one by one, but only within
# this long of the batch's start: a database that hangs meanwhile must still get WeCom a 503 in time.
ALONE_SECONDS = 1.0
# Writes in flight per process when the database is slow to answer (a write took over SLOW_WRITE_SECONDS:
# a database some 15 ms or more away); one while it is fast. 5 ms also caught a local database on busy
# cores, where more writes in flight only made the tail worse (BENCHMARKS.md, issue 25). Below the
# autocommit pool's 15 connections.
WRITERS = 4
SLOW_WRITE_SECONDS = 0.015


# --- one callback -----------------------------------------------------------------------------

def dedup_key(xml: str) -> str:
    """Key of an event: WeCom resends the same plaintext, so digest it."""
    return hashlib.sha256(xml.encode("utf-8")).hexdigest()


def event_row(xml: str, change, status: str, reason: str | None, now: float) -> dict:
    """The wm_events row of a decrypted callback (the key columns cut to their widths)."""
    return {"dedup_key": dedup_key(xml), "change_type": change.change_type[:32], "user_id": change.user_id[:64],
            "departments": ",".join(str(d) for d in change.departments)[:255],
            "create_time": change.create_time, "xml": xml, "status": status, "reason": reason,
            "attempts": 0, "received_at": now, "next_attempt_at": 0, "source": "callback"}


def record_event(engine: Engine, xml: str, change, status: str, reason: str | None = None) -> tuple[int, bool]:
    """Record a decrypted event once, outside a web request (tests, benchmarks); return (event id,
    created). Raises StateUnavailable. Callbacks go through their process's GroupCommit."""
    row = event_row(xml, change, status, reason, time.time())
    try:
        ensure_schema(engine)
        with autocommit_engine(engine).connect() as conn:
            return write_rows(conn, [row], row["received_at"])[0]
    except DBAPIError as exc:
        raise StateUnavailable(str(exc.orig.__class__.__name__)) from exc


def retry_on_new_connection(exc: DBAPIError, started: float) -> bool:
    """A pooled connection the server has dropped fails at once: worth one more try on a new one.
    A slow failure (a hung server) is not retried: WeCom's 5 s are nearly spent."""
    return exc.connection_invalidated and time.monotonic() - started <= 1


# --- callbacks that arrive together ----------------------------------------------------------

def _taken_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class _Queued:
    row: dict
    outcome: tuple[int, bool] | StateUnavailable | None = None
    lead: bool = False  # set by the writer that hands over: this request writes the next batch
    # Released once `outcome` or `lead` is set: each request is woken alone, when it has something to do
    # (a Condition's notify_all woke every waiting request at every write: 9 % of the CPU under load).
    signal: threading.Lock = field(default_factory=_taken_lock)


class GroupCommit:
    """The callbacks' writer of one process: record(row) returns once the row is committed.

    Up to `writers` writes may be in flight at once, each on its own held connection: a callback that finds a
    free one is written at once (with whatever is queued), and callbacks queue, to share the next write, only
    while all are busy. How many may be busy adapts to the database (issue 25 in BENCHMARKS.md): one while
    writes come back fast (group commit proper: the best p99 and the fewest statements, near the database), up
    to `writers` while they are slow (a database 20 ms away: one writer made each request wait for the
    round trip ahead of its own, and several in flight won 1.3-1.7x). writers=1 is group commit alone."""

    def __init__(self, engine: Engine, observe=lambda rows: None, wait_seconds: float = WAIT_SECONDS,
                 writers: int = WRITERS, slow_seconds: float = SLOW_WRITE_SECONDS):
        self.engine, self.observe, self.wait_seconds, self.writers = engine, observe, wait_seconds, writers
        self.slow_seconds = slow_seconds
        self._limit = 1  # writes allowed in flight now: 1, or `writers` after a slow write
        self._lock = threading.Lock()
        self._queue: collections.deque[_Queued] = collections.deque()
        self._busy = 0  # writes in flight
        self._idle: list[Connection] = []  # the writers' own connections, each used by one writer at a time

    def record(self, row: dict) -> tuple[int, bool]:
        """(event id, created) once `row` (event_row) is committed or its dedup key was there already;
        raises StateUnavailable when the state database fails or does not answer in time."""
        mine = _Queued(row)
        with self._lock:
            if self._busy < self._limit:
                self._busy += 1
                mine.lead = True
            else:
                self._queue.append(mine)
        if not mine.lead and not mine.signal.acquire(timeout=self.wait_seconds):
            with self._lock:
                if mine in self._queue:  # not taken by a writer yet: give up, unwritten
                    self._queue.remove(mine)
                    raise StateUnavailable(f"no answer from the state database within {self.wait_seconds:g} s")
            mine.signal.acquire()  # in a write already, whose own timeouts bound the wait
        if mine.outcome is None:  # mine.lead: write it, and what queued meanwhile
            self._lead(mine)
        if isinstance(mine.outcome, StateUnavailable):
            raise mine.outcome
        return mine.outcome

    def _lead(self, mine: _Queued) -> None:
        """Write `mine` and what is queued; then hand the queue to the next writer, one of its requests."""
        with self._lock:
            batch = [mine] + [self._queue.popleft() for _ in range(min(len(self._queue), MAX_ROWS - 1))]
        started = time.monotonic()
        try:
            outcomes = self._write([queued.row for queued in batch])
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the followers waiting for nothing
            outcomes = [StateUnavailable(exc.__class__.__name__)] * len(batch)
        slow = time.monotonic() - started > self.slow_seconds
        woken = batch[1:]
        with self._lock:
            self._limit = self.writers if slow else 1
            for queued, outcome in zip(batch, outcomes):
                queued.outcome = outcome
            if outcomes and all(isinstance(o, StateUnavailable) for o in outcomes):
                # The database is failing: the rows that queued up meanwhile fail now too, rather than each
                # waiting for its own timeout in turn (a request never waits longer than for one write).
                while self._queue:
                    queued = self._queue.popleft()
                    queued.outcome = outcomes[0]
                    woken.append(queued)
            self._busy -= 1
            while self._queue and self._busy < self._limit:  # a queued request writes next (more, if slow)
                successor = self._queue.popleft()
                successor.lead = True
                self._busy += 1
                woken.append(successor)
        for queued in woken:
            queued.signal.release()
        self.observe(len(batch))

    def _write(self, rows: list[dict]) -> list[tuple[int, bool] | StateUnavailable]:
        """Per row (event id, created) or the error. Rows that fail together for a reason of their own
        (data too long, say; not the connection) are written again one by one, so that one bad callback
        does not fail the callbacks that happened to arrive with it."""
        started = time.monotonic()
        # Every row of a write carries the same received_at, also on the retry below: a row found with it
        # afterwards was created by this write (its first attempt may have committed and lost the answer).
        stamp = time.time()
        for row in rows:
            row["received_at"] = stamp
        connection = None
        try:
            ensure_schema(self.engine)
            for attempt in (1, 2):
                tried_at = time.monotonic()
                try:
                    connection = self._checkout()
                    return write_rows(connection, rows, stamp)
                except DBAPIError as exc:
                    self._drop(connection)  # a failed statement may leave the connection in any state
                    connection = None
                    # A connection the server has dropped fails at once: one more try on a new one.
                    if attempt == 2 or not retry_on_new_connection(exc, tried_at):
                        raise
        except DBAPIError as exc:
            if len(rows) > 1 and not is_transient_db_error(exc):
                return [self._write([row])[0] if time.monotonic() - started < ALONE_SECONDS else
                        StateUnavailable(exc.orig.__class__.__name__) for row in rows]
            return [StateUnavailable(exc.orig.__class__.__name__)] * len(rows)
        except StateUnavailable as exc:  # the schema lock was held too long by another process
            return [exc] * len(rows)
        finally:
            if connection is not None:
                self._idle.append(connection)

    @staticmethod
    def _drop(connection: Connection | None) -> None:
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.invalidate()  # closed, and not given back to the pool

    def _checkout(self) -> Connection:
        # Held across writes: a pool checkout and return cost more CPU than the INSERT itself (measured).
        # list.pop and append are atomic: at most `writers` connections exist, each with one writer.
        while self._idle:
            try:
                connection = self._idle.pop()
            except IndexError:
                break
            if not (connection.invalidated or connection.closed):
                return connection
        return autocommit_engine(self.engine).connect()
