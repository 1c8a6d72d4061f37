"""The statements that write callback rows (wm_events): compiled once, run on the driver's own cursor.

store/recording.py decides when and what to write (group commit); this module how: one round trip for a lone
callback or a batch of new ones, the dedup key's row read back only after a resend.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from store.schema import events

# The columns recording.event_row fills, in its order: the statements below are compiled for exactly these.
EVENT_ROW_COLUMNS = ("dedup_key", "change_type", "user_id", "departments", "create_time", "xml", "status", "reason",
                     "attempts", "received_at", "next_attempt_at", "source")


def write_rows(conn: Connection, rows: list[dict], stamp: float) -> list[tuple[int, bool]]:
    """Write event rows (event_row, each with received_at = stamp) on an autocommit connection;
    per row (event id, created). A row found with another received_at was there already (a resend).

    The statements are compiled once and run on the driver's own cursor: SQLAlchemy's per-statement
    work (execution context, result metadata) was a third of a lone callback's write (measured: 235 µs a row
    through engine.connect() + Core execute, 88 µs with exec_driver_sql; issue 25 in BENCHMARKS.md for
    this). Driver errors are raised as SQLAlchemy's DBAPIError, as exec_driver_sql would raise them."""
    sql = _statements(conn.dialect.name)
    with _cursor(conn) as cursor:
        if len(rows) == 1:  # the lone callback: one round trip, as before group commit
            try:
                _run(conn, cursor, sql.insert, rows[0])
                return [(cursor.lastrowid, True)]
            except IntegrityError:  # the dedup key exists
                _run(conn, cursor, sql.find(1), (rows[0]["dedup_key"],))
                [(event_id, _, received_at)] = cursor.fetchall()
                return [(event_id, received_at == stamp)]
        keys = tuple(dict.fromkeys(row["dedup_key"] for row in rows))
        if len(keys) == len(rows) and _consecutive_ids(conn, cursor, rows):
            try:  # the usual batch, all new: one round trip, as for a lone callback
                _run(conn, cursor, sql.insert, rows, many=True)
                return [(cursor.lastrowid + i, True) for i in range(len(rows))]
            except IntegrityError:  # a resend among them: the statement wrote nothing; the general way below
                pass
        _run(conn, cursor, sql.insert_new, rows, many=True)  # MySQL: one multi-row statement, autocommitted
        _run(conn, cursor, sql.find(len(keys)), keys)
        found = {key: (event_id, received_at) for event_id, key, received_at in cursor.fetchall()}
    results, seen = [], set()
    for row in rows:
        key = row["dedup_key"]
        event_id, received_at = found[key]
        results.append((event_id, received_at == stamp and key not in seen))  # a copy in the batch: a duplicate
        seen.add(key)
    return results


ONE_STATEMENT_BYTES = 900_000  # below PyMySQL's max_stmt_length (1,024,000), which splits a longer executemany


def _consecutive_ids(conn: Connection, cursor, rows: list[dict]) -> bool:
    """Whether a multi-row INSERT of `rows` is one statement whose new ids are lastrowid, +1, +2, …

    InnoDB gives the rows of one multi-row INSERT consecutive auto-increment values when
    innodb_autoinc_lock_mode is 0 or 1 (MariaDB's default is 1; Galera needs 2) and auto_increment_increment
    is 1; LAST_INSERT_ID() is the first of them. Asked once per connection; SQLite: never (executemany has no
    lastrowid there)."""
    if conn.dialect.name != "mysql" or sum(len(row["xml"]) for row in rows) * 4 > ONE_STATEMENT_BYTES:
        return False
    info = conn.connection.info
    if "wm_consecutive_ids" not in info:
        _run(conn, cursor, "SELECT @@innodb_autoinc_lock_mode, @@auto_increment_increment", ())
        mode, increment = cursor.fetchone()
        info["wm_consecutive_ids"] = int(mode) <= 1 and int(increment) == 1
    return info["wm_consecutive_ids"]


@contextlib.contextmanager
def _cursor(conn: Connection):
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        yield cursor
    finally:
        cursor.close()


def _run(conn: Connection, cursor, statement: str, parameters, many: bool = False) -> None:
    """Execute on the driver's cursor; a driver error becomes the DBAPIError subclass SQLAlchemy would raise
    (IntegrityError for a duplicate key), flagged connection_invalidated when the connection is dead."""
    dialect = conn.dialect
    try:
        (cursor.executemany if many else cursor.execute)(statement, parameters)
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(statement, parameters, exc, dialect.loaded_dbapi.Error, dialect=dialect,
                                  connection_invalidated=dialect.is_disconnect(exc, conn.connection.dbapi_connection,
                                                                               cursor)) from exc


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
