"""Engines and the rules for talking to the state database: pools, short timeouts, retries of deadlocks."""
from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError


class StateUnavailable(Exception):
    """The state database did not answer."""


def make_engine(url: str, autocommit: bool = False) -> Engine:
    """A pooled engine; PyMySQL connects slowly (SSL context per connect), so never connect per request.

    With `autocommit` every statement commits by itself, and nothing is rolled back on the way back to
    the pool: a single-statement write is durable in one round trip."""
    options = {"isolation_level": "AUTOCOMMIT", "skip_autocommit_rollback": True} if autocommit else {}
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **options)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA busy_timeout=30000")
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        return engine
    # The autocommit engine records callbacks. It pings nothing (store/recording.py retries once on a connection
    # found dead instead), and its timeouts are short: a hung database must still get WeCom a 503 inside
    # the 5 s it waits, so that it retries. A one-row INSERT takes milliseconds when the server is well.
    timeouts = ({"connect_timeout": 2, "read_timeout": 3, "write_timeout": 3} if autocommit else
                {"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30})
    return sa.create_engine(url, pool_pre_ping=not autocommit, pool_recycle=3600, pool_size=5, max_overflow=10,
                            connect_args={**timeouts, "charset": "utf8mb4"}, **options)


_autocommit_siblings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_siblings_lock = threading.Lock()


def autocommit_engine(engine: Engine) -> Engine:
    """An autocommit engine on the same database as `engine` (its own small pool, disposed with it)."""
    if engine.url.database in (None, "", ":memory:"):
        return engine  # a private in-memory database cannot be shared with a second pool
    with _siblings_lock:
        sibling = _autocommit_siblings.get(engine)
        if sibling is None:
            sibling = make_engine(engine.url.render_as_string(hide_password=False), autocommit=True)
            _autocommit_siblings[engine] = sibling
            sa.event.listen(engine, "engine_disposed", lambda _engine: sibling.dispose())
    return sibling


def answers(engine: Engine) -> bool:
    """True when the database answers a query within the short timeouts of the autocommit engine."""
    try:
        with autocommit_engine(engine).connect() as conn:  # a hung database is not ready
            conn.execute(sa.text("SELECT 1"))
        return True
    except DBAPIError:
        return False


def is_transient_db_error(exc: BaseException) -> bool:
    """Deadlock, lock wait timeout or lost connection: retry the transaction."""
    if isinstance(exc, OperationalError):
        return True
    code = getattr(getattr(exc, "orig", None), "args", [None])[0]
    return code in (1205, 1213, 2006, 2013)


def with_retries(fn, tries: int = 5):
    """Run a transaction function again after a deadlock or lock timeout (InnoDB 1213/1205)."""
    for attempt in range(tries):
        try:
            return fn()
        except DBAPIError as exc:
            if attempt == tries - 1 or not is_transient_db_error(exc):
                raise
            time.sleep(0.05 * (attempt + 1))


def safe_url(url: str) -> str:
    """A database URL with its password hidden, for messages."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)
