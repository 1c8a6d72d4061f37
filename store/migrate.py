"""Schema upgrades: Alembic to head under a lock, so that several processes may start at once."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import weakref
from functools import lru_cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from store.db import StateUnavailable, answers

log = logging.getLogger("wecom_mailer.store")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LOCK_NAME = "wecom_mailer_schema"
LOCK_WAIT_SECONDS = 120  # another process may be running a long ALTER TABLE



class SchemaTooNew(StateUnavailable):
    """The database is at a revision this release does not know: a newer release migrated it. Unusable
    like an unreachable one (callbacks 503, /readyz 503); start-up refuses outright (app.py)."""


_ready: weakref.WeakSet = weakref.WeakSet()  # engines whose schema this process has seen at head


def _config(connection=None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest revision in store/migrations/versions."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: not managed by Alembic yet, or empty)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    """Every revision in store/migrations/versions."""
    return frozenset(script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions())


def refuse_unknown(revision: str | None) -> None:
    """Raise SchemaTooNew when `revision` is none of ours (one line naming both revisions, and the fix)."""
    if revision is not None and revision not in known_revisions():
        raise SchemaTooNew(
            f"the state database is at schema revision {revision}, which this release does not know (its newest "
            f"is {head_revision()}): a newer release has migrated it; run that release or a newer one, never "
            "an older one, against this database")


def upgrade(engine: Engine) -> str:
    """Upgrade the state database to head (a no-op when it is there); return the revision it is at.

    Raises SchemaTooNew, touching nothing, when a newer release has migrated the database past our head."""
    current = current_revision(engine)
    refuse_unknown(current)
    if current != head_revision():
        _upgrade_under_lock(engine)
    _ready.add(engine)
    return head_revision()


def _upgrade_under_lock(engine: Engine) -> None:
    with _locked(engine) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        refuse_unknown(before)  # a newer release may have upgraded it while we waited for the lock
        if before != head_revision():  # another process may have done it while we waited
            command.upgrade(_config(conn), "head")
            conn.commit()
            log.info("state database upgraded from %s to %s", before or "nothing", head_revision())


def ensure_schema(engine: Engine) -> None:
    """Upgrade once per process and engine, also when the database was down at start-up.

    Raises DBAPIError, or StateUnavailable when another process kept the schema lock too long."""
    if engine in _ready:
        return
    try:
        upgrade(engine)
    except (DBAPIError, StateUnavailable):
        # No right to run DDL? A database someone else upgraded will do.
        with contextlib.suppress(DBAPIError):
            if current_revision(engine) == head_revision():
                _ready.add(engine)
                return
        raise


def ready(engine: Engine) -> bool:
    """True when the state database answers and holds the current tables (/readyz)."""
    try:
        ensure_schema(engine)
    except (DBAPIError, StateUnavailable):
        return False
    return answers(engine)


@contextlib.contextmanager
def _locked(engine: Engine):
    """A connection holding the schema lock: MySQL's GET_LOCK, or a lock file beside a SQLite database."""
    with engine.connect() as conn:
        if conn.dialect.name in ("mysql", "mariadb"):
            got = conn.execute(sa.text("SELECT GET_LOCK(:name, :wait)"),
                               {"name": LOCK_NAME, "wait": LOCK_WAIT_SECONDS}).scalar()
            if got != 1:
                raise StateUnavailable(f"another process held the schema lock for {LOCK_WAIT_SECONDS} s")
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
                conn.commit()
            return
        path = engine.url.database
        if not path or path == ":memory:":
            yield conn
            return
        with open(f"{path}.schema-lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield conn
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
