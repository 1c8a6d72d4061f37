"""The service with a statement counter: `bench.instrumented:create_app()` is `app:create_app()` plus
SQLAlchemy listeners that count what each process sends to the state database.

Every 0.2 s (and at exit) each process writes `$BENCH_STATS_DIR/<pid>.json`: statements by thread
kind (request, worker, reconcile, smtp) and verb, transactions committed, pool checkouts (each one is a
ping round trip under pool_pre_ping), the distinct statements seen (for EXPLAIN), and VmHWM.
"""
from __future__ import annotations

import atexit
import collections
import json
import os
import threading

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()
_statements: dict[str, object] = {}  # SQL text → one parameter set, for EXPLAIN
MAX_DISTINCT = 200


def _kind() -> str:
    name = threading.current_thread().name
    if name == "wecom-mailer-worker":
        return "worker"
    if name == "wecom-mailer-reconcile":
        return "reconcile"
    if name.startswith("smtp"):
        return "smtp"
    return "request"


def _before_cursor_execute(conn, cursor, statement, parameters, context, executemany):
    verb = statement.lstrip().split(None, 1)[0].upper()
    with _lock:
        _counts[f"stmt.{_kind()}.{verb}"] += 1
        if statement not in _statements and len(_statements) < MAX_DISTINCT and not executemany:
            _statements[statement] = parameters


def _commit(conn):
    with _lock:
        _counts[f"commit.{_kind()}"] += 1


def _checkout(dbapi_conn, record, proxy):
    with _lock:
        _counts[f"checkout.{_kind()}"] += 1


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _dump() -> None:
    directory = os.environ.get("BENCH_STATS_DIR")
    if not directory:
        return
    with _lock:
        data = {"pid": os.getpid(), "counts": dict(_counts), "peak_rss_kb": _peak_rss_kb(),
                "statements": [[sql, params] for sql, params in _statements.items()]}
    path = os.path.join(directory, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as file:
        json.dump(data, file, default=str)
    os.replace(path + ".tmp", path)


def _dumper() -> None:
    stop = threading.Event()
    atexit.register(_dump)
    for _ in range(3600 * 5):  # bounded: at most an hour
        if stop.wait(0.2):
            return
        _dump()


def install() -> None:
    """Listen on every Engine and Pool of this process; start the stats writer (once)."""
    if getattr(install, "done", False):
        return
    install.done = True
    sa.event.listen(Engine, "before_cursor_execute", _before_cursor_execute)
    sa.event.listen(Engine, "commit", _commit)
    sa.event.listen(Pool, "checkout", _checkout)
    threading.Thread(target=_dumper, name="bench-stats", daemon=True).start()


def create_app(env=None):
    """The service's own factory, counted."""
    install()
    import app

    return app.create_app(env)
