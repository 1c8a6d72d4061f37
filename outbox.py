"""The outbox: events, deliveries, member snapshots, address book, shared tokens (SQLAlchemy Core)."""
from __future__ import annotations

import hashlib
import time

import sqlalchemy as sa
from sqlalchemy import (BigInteger, Column, Double, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

SCHEMA_VERSION = 1
metadata = MetaData()

# Event status: pending (recorded, not yet expanded) → sending (deliveries written) → done;
# or ignored / skipped / failed, with `reason`.
EVENT_OPEN = ("pending", "sending")
# Delivery status: pending → sent | retry → … | failed | skipped (no address).
DELIVERY_OPEN = ("pending", "retry")

Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER keys

events = Table(
    "wm_events", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("dedup_key", String(64), nullable=False),
    Column("change_type", String(32), nullable=False, default=""),
    Column("user_id", String(64), nullable=False, default=""),
    Column("departments", String(255), nullable=False, default=""),
    Column("create_time", BigInteger),
    Column("xml", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("subject", Text),
    Column("body", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("received_at", Double, nullable=False),
    Column("first_attempt_at", Double),
    Column("next_attempt_at", Double, nullable=False, default=0),
    Column("finished_at", Double),
    Column("lease_owner", String(64)),
    Column("lease_until", Double),
    UniqueConstraint("dedup_key", name="uq_wm_events_dedup"),
    Index("ix_wm_events_due", "status", "next_attempt_at"),
)

deliveries = Table(
    "wm_deliveries", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", BigInteger, nullable=False),
    Column("userid", String(64), nullable=False),
    Column("name", String(255), nullable=False, default=""),
    Column("address", String(320), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("first_attempt_at", Double),
    Column("next_attempt_at", Double, nullable=False, default=0),
    Column("sent_at", Double),
    UniqueConstraint("event_id", "address", name="uq_wm_deliveries_event_address"),
    Index("ix_wm_deliveries_status", "status", "next_attempt_at"),
)

department_snapshots = Table(
    "wm_department_snapshots", metadata,
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("taken_at", Double, nullable=False),
    Column("member_count", Integer, nullable=False, default=0),
)

snapshot_members = Table(
    "wm_snapshot_members", metadata,
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("userid", String(64), primary_key=True),
    Column("name", String(255), nullable=False, default=""),
)

address_book = Table(
    "wm_address_book", metadata,
    Column("userid", String(64), primary_key=True),
    Column("email", String(320), nullable=False),
    Column("updated_at", Double, nullable=False),
)

access_tokens = Table(
    "wm_access_tokens", metadata,
    Column("key", String(64), primary_key=True),  # digest of corp id + secret: the secret is never stored
    Column("access_token", String(512), nullable=False),
    Column("expires_at", Double, nullable=False),
)

schema_info = Table(
    "wm_schema", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", Double, nullable=False),
)


class StateUnavailable(Exception):
    """The state database did not answer."""


def dedup_key(xml: str) -> str:
    """Key of an event: WeCom resends the same plaintext, so digest it."""
    return hashlib.sha256(xml.encode("utf-8")).hexdigest()


def make_engine(url: str) -> Engine:
    """A pooled engine; PyMySQL connects slowly (SSL context per connect), so never connect per request."""
    if url.startswith("sqlite"):
        from pathlib import Path

        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA busy_timeout=30000")
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_recycle=3600, pool_size=5, max_overflow=10,
                            connect_args={"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30,
                                          "charset": "utf8mb4"})


def init_schema(engine: Engine) -> None:
    """Create or upgrade the state tables; safe when several processes start at once."""
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                _create_index(conn, index)
        conn.execute(_insert_ignore(schema_info), {"version": SCHEMA_VERSION, "applied_at": time.time()})


def _create_index(conn, index: Index) -> None:
    try:
        conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
    except (OperationalError, sa.exc.ProgrammingError) as exc:  # MySQL 8 lacks IF NOT EXISTS on indexes
        if "Duplicate key name" not in str(exc) and "already exists" not in str(exc):
            raise


def _insert_ignore(table: Table):
    """INSERT that skips rows whose unique key exists (SQLite and MySQL/MariaDB)."""
    return table.insert().prefix_with("OR IGNORE", dialect="sqlite").prefix_with("IGNORE", dialect="mysql")


def ping(engine: Engine) -> bool:
    """True when the state database answers."""
    try:
        with engine.connect() as conn:
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


# --- recording -----------------------------------------------------------------------------

def record_event(engine: Engine, xml: str, change, status: str, reason: str | None = None) -> tuple[int, bool]:
    """Record a decrypted event once; return (event id, created). Raises StateUnavailable."""
    key = dedup_key(xml)
    now = time.time()
    row = {"dedup_key": key, "change_type": change.change_type[:32], "user_id": change.user_id[:64],
           "departments": ",".join(str(d) for d in change.departments)[:255],
           "create_time": change.create_time, "xml": xml, "status": status, "reason": reason,
           "attempts": 0, "received_at": now, "next_attempt_at": 0}
    try:
        with engine.begin() as conn:
            result = conn.execute(_insert_ignore(events), row)
            if result.rowcount == 1:
                return result.inserted_primary_key[0], True
            existing = conn.execute(sa.select(events.c.id).where(events.c.dedup_key == key)).scalar_one()
            return existing, False
    except IntegrityError:
        with engine.connect() as conn:
            return conn.execute(sa.select(events.c.id).where(events.c.dedup_key == key)).scalar_one(), False
    except DBAPIError as exc:
        raise StateUnavailable(str(exc.orig.__class__.__name__)) from exc


# --- shared access token -------------------------------------------------------------------

class TokenStore:
    """WeCom access tokens shared by every process through the state database."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @staticmethod
    def key_for(corp_id: str, secret: str) -> str:
        return hashlib.sha256(f"{corp_id}\0{secret}".encode()).hexdigest()[:64]

    def get(self, key: str) -> tuple[str, float] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(access_tokens.c.access_token, access_tokens.c.expires_at)
                               .where(access_tokens.c.key == key)).first()
        return (row.access_token, row.expires_at) if row else None

    def put(self, key: str, token: str, expires_at: float) -> None:
        with self.engine.begin() as conn:
            updated = conn.execute(access_tokens.update().where(access_tokens.c.key == key)
                                   .values(access_token=token, expires_at=expires_at)).rowcount
            if not updated:
                conn.execute(_insert_ignore(access_tokens),
                             {"key": key, "access_token": token, "expires_at": expires_at})
