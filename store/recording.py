"""Recording callbacks: one row per event, once (the dedup key), committed before the answer; callbacks
that arrive together are recorded in one INSERT and one commit (group commit).

Leader and followers, as in MySQL's binary-log group commit: a request queues its row; if no write is
in flight in this process it becomes the writer, takes every row queued at that moment (its own
included), writes them in one statement and wakes their requests; rows queued meanwhile wait for the
next writer, which is one of their own requests. So one write is in flight per process, a lone callback
is written at once in its own thread (no wait to fill a batch, no hand-over to another thread), and no
request is answered before the commit that holds its row.

Why: under a burst every request used to pay its own statement and its own commit (issue 15 in
BENCHMARKS.md); a batch of n pays one INSERT, one SELECT and one commit.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass

from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from store.db import StateUnavailable, autocommit_engine, is_transient_db_error
from store.migrate import ensure_schema
from store.schema import events

MAX_ROWS = 200  # per INSERT: a few hundred KB of XML, well inside max_allowed_packet
# WeCom waits 5 s for an answer. A row still queued after this long (the writer ahead of it is stuck on a
# hung database, whose reads time out after 3 s) is answered 503 without being written; WeCom retries it.
WAIT_SECONDS = 4.0
# Rows of a batch that failed for a reason of their own are written again one by one, but only within
# this long of the batch's start: a database that hangs meanwhile must still get WeCom a 503 in time.
ALONE_SECONDS = 1.0


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


# The columns event_row fills, in its order: the statements below are compiled for exactly these.
EVENT_ROW_COLUMNS = ("dedup_key", "change_type", "user_id", "departments", "create_time", "xml", "status", "reason",
                     "attempts", "received_at", "next_attempt_at", "source")


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

@dataclass(eq=False)
class _Queued:
    row: dict
    outcome: tuple[int, bool] | StateUnavailable | None = None


class GroupCommit:
    """The callbacks' writer of one process: record(row) returns once the row is committed."""

    def __init__(self, engine: Engine, observe=lambda rows: None, wait_seconds: float = WAIT_SECONDS):
        self.engine, self.observe, self.wait_seconds = engine, observe, wait_seconds
        self._changed = threading.Condition()
        self._queue: collections.deque[_Queued] = collections.deque()
        self._writing = False
        self._connection: Connection | None = None  # the writer's own, used by one writer at a time

    def record(self, row: dict) -> tuple[int, bool]:
        """(event id, created) once `row` (event_row) is committed or its dedup key was there already;
        raises StateUnavailable when the state database fails or does not answer in time."""
        mine = _Queued(row)
        deadline = time.monotonic() + self.wait_seconds
        with self._changed:
            self._queue.append(mine)
            while mine.outcome is None:
                if not self._writing:
                    self._lead()
                    continue
                left = deadline - time.monotonic()
                if left <= 0 and mine in self._queue:  # not taken by a writer yet: give up, unwritten
                    self._queue.remove(mine)
                    raise StateUnavailable(f"no answer from the state database within {self.wait_seconds:g} s")
                self._changed.wait(max(left, 0.05))
        if isinstance(mine.outcome, StateUnavailable):
            raise mine.outcome
        return mine.outcome

    def _lead(self) -> None:
        """Write what is queued (called holding the condition; writes without it)."""
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_ROWS))]
        self._writing = True
        self._changed.release()
        try:
            outcomes = self._write([queued.row for queued in batch])
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the followers waiting for nothing
            outcomes = [StateUnavailable(exc.__class__.__name__)] * len(batch)
        finally:
            self._changed.acquire()
            self._writing = False
        for queued, outcome in zip(batch, outcomes):
            queued.outcome = outcome
        if outcomes and all(isinstance(o, StateUnavailable) for o in outcomes):
            # The database is failing: the rows that queued up meanwhile fail now too, rather than each
            # waiting for its own timeout in turn (a request never waits longer than for one write).
            while self._queue:
                self._queue.popleft().outcome = outcomes[0]
        self._changed.notify_all()
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
        try:
            ensure_schema(self.engine)
            for attempt in (1, 2):
                tried_at = time.monotonic()
                try:
                    return write_rows(self._connected(), rows, stamp)
                except DBAPIError as exc:
                    self._drop_connection()  # a failed statement may leave the connection in any state
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

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.invalidate()  # closed, and not given back to the pool
            self._connection = None

    def _connected(self) -> Connection:
        # Held across writes: a pool checkout and return cost more CPU than the INSERT itself (measured).
        if self._connection is None or self._connection.invalidated or self._connection.closed:
            self._connection = autocommit_engine(self.engine).connect()
        return self._connection


def write_rows(conn: Connection, rows: list[dict], stamp: float) -> list[tuple[int, bool]]:
    """Write event rows (event_row, each with received_at = stamp) on an autocommit connection;
    per row (event id, created). A row found with another received_at was there already (a resend).

    The statements are compiled once and run with exec_driver_sql: the Core statement's per-call work
    was half the CPU of a callback's write (measured: 235 µs a row through engine.connect() + execute,
    88 µs like this, 35 µs a row in batches of 16)."""
    sql = _statements(conn.dialect.name)
    if len(rows) == 1:  # the lone callback: one round trip, as before group commit
        try:
            return [(conn.exec_driver_sql(sql.insert, rows[0]).lastrowid, True)]
        except IntegrityError:  # the dedup key exists
            [(event_id, _, received_at)] = conn.exec_driver_sql(sql.find(1), (rows[0]["dedup_key"],)).all()
            return [(event_id, received_at == stamp)]
    keys = tuple(dict.fromkeys(row["dedup_key"] for row in rows))
    conn.exec_driver_sql(sql.insert_new, rows)  # MySQL: one multi-row statement, autocommitted
    found = {key: (event_id, received_at) for event_id, key, received_at
             in conn.exec_driver_sql(sql.find(len(keys)), keys)}
    results, seen = [], set()
    for row in rows:
        key = row["dedup_key"]
        event_id, received_at = found[key]
        results.append((event_id, received_at == stamp and key not in seen))  # a copy in the batch: a duplicate
        seen.add(key)
    return results


@dataclass(frozen=True)
class _Sql:
    insert: str  # a plain INSERT: an existing dedup key raises IntegrityError
    insert_new: str  # leaves a row whose dedup key exists as it is (and only then, unlike INSERT IGNORE)
    marker: str  # the positional placeholder

    def find(self, count: int) -> str:
        return ("SELECT id, dedup_key, received_at FROM wm_events WHERE dedup_key IN ("
                + ", ".join([self.marker] * count) + ")")


_COMPILED: dict[str, _Sql] = {}


def _statements(dialect_name: str) -> _Sql:
    """The statements for SQLite (named parameters) or MySQL/MariaDB (pyformat), compiled once."""
    if dialect_name not in _COMPILED:
        if dialect_name == "sqlite":
            dialect = sqlite.dialect(paramstyle="named")
            insert_new = sqlite.insert(events).on_conflict_do_nothing(index_elements=["dedup_key"])
        else:
            dialect = mysql.dialect(paramstyle="pyformat")
            insert_new = mysql.insert(events).on_duplicate_key_update(id=events.c.id)

        def compiled(statement) -> str:
            return str(statement.compile(dialect=dialect, column_keys=EVENT_ROW_COLUMNS))
        _COMPILED[dialect_name] = _Sql(compiled(events.insert()), compiled(insert_new),
                                       "?" if dialect_name == "sqlite" else "%s")
    return _COMPILED[dialect_name]
