"""The MySQL/MariaDB server settings the outbox's promises rely on, read once at start-up.

What breaks what (store/outbox.py, store/digests.py, store/recording.py):
- Transaction isolation. Claims are compare-and-set UPDATEs, and several decisions are "read, then write in
  the same transaction under a row lock" (an event's settle against a digest finishing its rows, a
  recipient's window). READ COMMITTED and REPEATABLE READ both give that. READ UNCOMMITTED lets a worker act
  on what another transaction writes and then rolls back (a lease or a held count that never was);
  SERIALIZABLE turns every plain SELECT into a shared lock, so claims, marks and the digests' recipient
  locks wait on each other and deadlock under load.
- Autocommit inside a transaction (forced by the server's init_connect or by a proxy): the event's move to
  `sending` and its delivery rows would no longer commit together, nor a digest and the rows it carried.
- A table that is not InnoDB (default_storage_engine=MyISAM when the tables were made): no transactions and
  no row locks at all.
- A read-only server (DATABASE_URL at a replica): every write fails.
- Statement-based binary logging with READ COMMITTED: InnoDB refuses every write (error 1665).
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

GOOD_ISOLATION = ("REPEATABLE-READ", "READ-COMMITTED")
ISOLATION_FIX = ("SET GLOBAL transaction_isolation='REPEATABLE-READ' (and transaction-isolation=REPEATABLE-READ "
                 "under [mysqld] in my.cnf, or the managed service's parameter group)")


class ServerSettingBroken(Exception):
    """A server setting breaks a promise of the outbox; the message names it and the one-line fix."""


def _variable(conn: Connection, *names: str):
    """The first of `names` (e.g. @@SESSION.transaction_isolation, then MariaDB's older tx_isolation) the
    server knows."""
    for name in names:
        try:
            return conn.execute(sa.text(f"SELECT {name}")).scalar()
        except DBAPIError:
            conn.rollback()
    return None


def read_settings(engine: Engine) -> dict:
    """The settings that matter, as our own transactions see them (a pooled connection, in a transaction)."""
    with engine.connect() as conn:
        return {
            "isolation": _variable(conn, "@@SESSION.transaction_isolation", "@@SESSION.tx_isolation"),
            "autocommit": _variable(conn, "@@SESSION.autocommit"),
            "read_only": _variable(conn, "@@GLOBAL.read_only"),
            "innodb_read_only": _variable(conn, "@@GLOBAL.innodb_read_only"),
            "log_bin": _variable(conn, "@@GLOBAL.log_bin"),
            "binlog_format": _variable(conn, "@@SESSION.binlog_format"),
            "engines": dict(conn.execute(sa.text(
                "SELECT table_name, engine FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name LIKE 'wm\\_%' AND table_type = 'BASE TABLE'")).all()),
        }


def problems(settings: dict) -> list[str]:
    """What in `settings` (read_settings' shape) breaks a promise: one sentence each, with its fix."""
    found = []
    isolation = str(settings.get("isolation") or "").upper().replace(" ", "-")
    if isolation and isolation not in GOOD_ISOLATION:
        found.append(f"transaction isolation is {isolation}, but claims and marks need REPEATABLE-READ or "
                     f"READ-COMMITTED: {ISOLATION_FIX}")
    if str(settings.get("autocommit")) == "1":
        found.append("autocommit is on inside a transaction (the server's init_connect or a proxy forces it), so "
                     "an event and its deliveries would not commit together: remove SET autocommit=1 from "
                     "init_connect or the proxy's connection settings")
    for table, engine_name in sorted((settings.get("engines") or {}).items()):
        if str(engine_name).lower() != "innodb":
            found.append(f"table {table} uses {engine_name}, which has no transactions or row locks: "
                         f"ALTER TABLE {table} ENGINE=InnoDB (and default_storage_engine=InnoDB)")
    if str(settings.get("read_only")) == "1" or str(settings.get("innodb_read_only")) == "1":
        found.append("the server is read-only (a replica?): point DATABASE_URL at the primary (the writer)")
    if (str(settings.get("log_bin")) == "1" and str(settings.get("binlog_format") or "").upper() == "STATEMENT"
            and isolation == "READ-COMMITTED"):
        found.append("binlog_format=STATEMENT with READ-COMMITTED makes InnoDB refuse writes (error 1665): "
                     "SET GLOBAL binlog_format='ROW'")
    return found


def verify(engine: Engine) -> None:
    """Raise ServerSettingBroken naming the first problem (MySQL/MariaDB only; SQLite has none of these)."""
    if engine.dialect.name not in ("mysql", "mariadb"):
        return
    found = problems(read_settings(engine))
    if found:
        raise ServerSettingBroken("state database setting breaks a promise: " + "; and ".join(found))
