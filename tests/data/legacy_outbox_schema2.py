# FROZEN: outbox.py as the last release before Alembic shipped it (git 0ae1b49, "schema 2"), verbatim, so that
# tests can build a database exactly as that release did and then upgrade it. Never edit it.
"""The outbox: events, deliveries, member snapshots, address book, shared tokens (SQLAlchemy Core)."""
from __future__ import annotations

import hashlib
import threading
import time
import weakref

import sqlalchemy as sa
from sqlalchemy import (BigInteger, Column, Double, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)
from sqlalchemy.dialects.mysql import MEDIUMTEXT
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

SCHEMA_VERSION = 2  # 2: wm_events xml/subject/body MEDIUMTEXT on MySQL
metadata = MetaData()

# Event status: pending (recorded, not yet expanded) → sending (deliveries written) → done;
# or ignored / skipped / failed, with `reason`.
EVENT_OPEN = ("pending", "sending")
# Delivery status: pending → sent | retry → … | failed | skipped (no address).
DELIVERY_OPEN = ("pending", "retry")

Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER keys
# MySQL's TEXT holds 64 KB; an event's XML (up to CALLBACK_MAX_BODY_BYTES) and its rendered message may not fit.
LongText = Text().with_variant(MEDIUMTEXT(), "mysql", "mariadb")

events = Table(
    "wm_events", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("dedup_key", String(64), nullable=False),
    Column("change_type", String(32), nullable=False, default=""),
    Column("user_id", String(64), nullable=False, default=""),
    Column("departments", String(255), nullable=False, default=""),
    Column("create_time", BigInteger),
    Column("xml", LongText, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("subject", LongText),
    Column("body", LongText),
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
    Column("address", String(320)),  # NULL when skipped for want of an address (unique allows many NULLs)
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
    Column("covered", Text, nullable=False, default=""),  # the department and, with FETCH_CHILD, its descendants
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


def make_engine(url: str, autocommit: bool = False) -> Engine:
    """A pooled engine; PyMySQL connects slowly (SSL context per connect), so never connect per request.

    With `autocommit` every statement commits by itself, and nothing is rolled back on the way back to
    the pool: a single-statement write is durable in one round trip."""
    options = {"isolation_level": "AUTOCOMMIT", "skip_autocommit_rollback": True} if autocommit else {}
    if url.startswith("sqlite"):
        from pathlib import Path

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
    # The autocommit engine records callbacks. It pings nothing (record_event retries once on a connection
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


def init_schema(engine: Engine) -> None:
    """Create or upgrade the state tables; safe when several processes start at once."""
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                _create_index(conn, index)
        if conn.dialect.name in ("mysql", "mariadb"):
            _widen_text_columns(conn)
        conn.execute(insert_ignore(schema_info), {"version": SCHEMA_VERSION, "applied_at": time.time()})
    _schema_ready.add(engine)


def _widen_text_columns(conn) -> None:
    """Schema 1 kept event XML and messages in TEXT (64 KB, silently cut by INSERT IGNORE): widen them."""
    narrow = conn.execute(sa.text(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = DATABASE() "
        "AND table_name = 'wm_events' AND column_name IN ('xml', 'subject', 'body') AND data_type = 'text'"))
    for name in narrow.scalars().all():
        null = "NULL" if events.c[name.lower()].nullable else "NOT NULL"
        conn.execute(sa.text(f"ALTER TABLE wm_events MODIFY `{name}` MEDIUMTEXT {null}"))


_schema_ready: weakref.WeakSet = weakref.WeakSet()  # engines whose tables this process has checked


def ensure_schema(engine: Engine) -> None:
    """Create the tables once per process, also when the database was down at start-up; raises DBAPIError."""
    if engine in _schema_ready:
        return
    try:
        init_schema(engine)
    except DBAPIError:
        try:  # no right to run DDL? Tables that someone else created will do.
            with engine.connect() as conn:
                conn.execute(sa.select(schema_info.c.version).limit(1)).first()
        except DBAPIError:
            pass
        else:
            _schema_ready.add(engine)
            return
        raise


def _create_index(conn, index: Index) -> None:
    try:
        conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
    except (OperationalError, sa.exc.ProgrammingError) as exc:  # MySQL 8 lacks IF NOT EXISTS on indexes
        if "Duplicate key name" not in str(exc) and "already exists" not in str(exc):
            raise


def insert_ignore(table: Table):
    """INSERT that skips rows whose unique key exists (SQLite and MySQL/MariaDB)."""
    return table.insert().prefix_with("OR IGNORE", dialect="sqlite").prefix_with("IGNORE", dialect="mysql")


def ping(engine: Engine) -> bool:
    """True when the state database answers (and holds the state tables)."""
    try:
        ensure_schema(engine)
        with autocommit_engine(engine).connect() as conn:  # its short timeouts: a hung database is not ready
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

_INSERT_EVENT = events.insert()  # built once: the request path skips constructing it (~20 µs)


def record_event(engine: Engine, xml: str, change, status: str, reason: str | None = None) -> tuple[int, bool]:
    """Record a decrypted event once; return (event id, created). Raises StateUnavailable."""
    key = dedup_key(xml)
    now = time.time()
    row = {"dedup_key": key, "change_type": change.change_type[:32], "user_id": change.user_id[:64],
           "departments": ",".join(str(d) for d in change.departments)[:255],
           "create_time": change.create_time, "xml": xml, "status": status, "reason": reason,
           "attempts": 0, "received_at": now, "next_attempt_at": 0}
    try:
        ensure_schema(engine)
        # A plain INSERT: MySQL's INSERT IGNORE would also turn "data too long" into a warning and cut the XML.
        # Autocommitted: recorded for good in one round trip (no ping, no COMMIT, no ROLLBACK to the pool).
        for attempt in (1, 2):
            started = time.monotonic()
            try:
                with autocommit_engine(engine).connect() as conn:
                    return conn.execute(_INSERT_EVENT, row).inserted_primary_key[0], True
            except DBAPIError as exc:
                # A pooled connection the server has dropped fails at once: try once more on a new one.
                # A slow failure (a hung server) is not retried: WeCom's 5 s are nearly spent.
                if attempt == 2 or not exc.connection_invalidated or time.monotonic() - started > 1:
                    raise
    except IntegrityError:  # the dedup key exists: a resend
        with autocommit_engine(engine).connect() as conn:
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
                conn.execute(insert_ignore(access_tokens),
                             {"key": key, "access_token": token, "expires_at": expires_at})


# --- retries ---------------------------------------------------------------------------------

def backoff_seconds(attempts: int, first: float) -> float:
    """Delay before the next try: `first`, doubling per attempt, capped at one hour."""
    return min(first * 2 ** max(attempts - 1, 0), 3600.0)


def with_retries(fn, tries: int = 5):
    """Run a transaction function again after a deadlock or lock timeout (InnoDB 1213/1205)."""
    for attempt in range(tries):
        try:
            return fn()
        except DBAPIError as exc:
            if attempt == tries - 1 or not is_transient_db_error(exc):
                raise
            time.sleep(0.05 * (attempt + 1))


# --- claiming events -----------------------------------------------------------------------

def _lease_free(now: float):
    return sa.or_(events.c.lease_until.is_(None), events.c.lease_until < now)


def claim_event(engine: Engine, owner: str, lease_seconds: float):
    """Take the next due event with a lease (compare-and-set), or None. Any number of processes may call this."""
    now = time.time()
    with engine.connect() as conn:
        candidates = conn.execute(
            sa.select(events.c.id)
            .where(events.c.status.in_(EVENT_OPEN), events.c.next_attempt_at <= now, _lease_free(now))
            .order_by(events.c.next_attempt_at, events.c.id).limit(8)).scalars().all()
    for event_id in candidates:
        def take():
            with engine.begin() as conn:
                return conn.execute(
                    events.update()
                    .where(events.c.id == event_id, events.c.status.in_(EVENT_OPEN), _lease_free(now))
                    .values(lease_owner=owner, lease_until=now + lease_seconds)).rowcount
        if with_retries(take) == 1:
            with engine.connect() as conn:
                return conn.execute(sa.select(events).where(events.c.id == event_id)).first()
    return None


def renew_lease(engine: Engine, event_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend our lease; False when another process has taken the event over."""
    def renew():
        with engine.begin() as conn:
            return conn.execute(events.update()
                                .where(events.c.id == event_id, events.c.lease_owner == owner)
                                .values(lease_until=time.time() + lease_seconds)).rowcount
    return with_retries(renew) == 1


def update_event(engine: Engine, event_id: int, owner: str, release: bool = True, **values) -> bool:
    """Write our outcome to an event we hold, releasing the lease; False if we no longer hold it."""
    if release:
        values.update(lease_owner=None, lease_until=None)

    def write():
        with engine.begin() as conn:
            return conn.execute(events.update()
                                .where(events.c.id == event_id, events.c.lease_owner == owner)
                                .values(**values)).rowcount
    return with_retries(write) == 1


# --- deliveries ----------------------------------------------------------------------------

def expand_event(engine: Engine, event_id: int, owner: str, subject: str, body: str,
                 rows: list[dict]) -> bool:
    """Write one delivery row per recipient and move the event to `sending`, in one transaction."""
    now = time.time()
    for row in rows:
        row.setdefault("reason", None)
        row.update(event_id=event_id, attempts=0, next_attempt_at=0)
        if row["status"] != "pending":
            row["first_attempt_at"] = now
        else:
            row.setdefault("first_attempt_at", None)

    def write():
        with engine.begin() as conn:
            held = conn.execute(events.update()
                                .where(events.c.id == event_id, events.c.lease_owner == owner,
                                       events.c.status == "pending")
                                .values(status="sending", subject=subject, body=body, reason=None)).rowcount
            if held != 1:
                conn.rollback()
                return False
            for start in range(0, len(rows), 1000):
                conn.execute(insert_ignore(deliveries), rows[start:start + 1000])
            return True
    return with_retries(write)


def due_deliveries(engine: Engine, event_id: int) -> list:
    """The deliveries of one event that may be tried now."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(deliveries.c.id, deliveries.c.address, deliveries.c.name, deliveries.c.userid,
                      deliveries.c.attempts, deliveries.c.first_attempt_at)
            .where(deliveries.c.event_id == event_id, deliveries.c.status.in_(DELIVERY_OPEN),
                   deliveries.c.next_attempt_at <= time.time())
            .order_by(deliveries.c.id)).all()


class DeliveryMarks:
    """Delivery outcomes of a sending round: each writing thread keeps a connection of its own, every UPDATE
    autocommitted, so a mark is durable when mark() returns after one round trip (no pool checkout and
    ping, no separate COMMIT)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._local = threading.local()
        self._opened: list = []
        self._lock = threading.Lock()

    # Built once: the columns set come from the parameters, so per mark only the values change; the
    # status list is rendered inline (literal_execute), sparing the per-execution expansion of IN.
    _statement = (deliveries.update()
                  .where(deliveries.c.id == sa.bindparam("delivery_id"),
                         deliveries.c.status.in_(sa.bindparam("open_statuses", list(DELIVERY_OPEN),
                                                              literal_execute=True))))

    def mark(self, delivery_id: int, **values) -> None:
        """Record one delivery's outcome; only an open row changes (a sent row stays sent)."""
        self._execute(self._statement, {"delivery_id": delivery_id, **values})

    def _execute(self, statement, parameters: dict) -> None:
        def write():
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                self._local.conn = conn
                with self._lock:
                    self._opened.append(conn)
            try:
                conn.execute(statement, parameters)
            except DBAPIError:
                self._local.conn = None  # the next try starts from a fresh connection
                conn.close()
                raise
        with_retries(write)

    # Every sent mark alike (attempts and first attempt follow from the row), so any number in one UPDATE.
    _sent_statement = (deliveries.update()
                       .where(deliveries.c.id.in_(sa.bindparam("delivery_ids", expanding=True)),
                              deliveries.c.status.in_(sa.bindparam("open_statuses", list(DELIVERY_OPEN),
                                                                   literal_execute=True)))
                       .values(status="sent", sent_at=sa.bindparam("now"), attempts=deliveries.c.attempts + 1,
                               first_attempt_at=sa.func.coalesce(deliveries.c.first_attempt_at,
                                                                 sa.bindparam("now")),
                               reason=None))

    def mark_sent(self, delivery_ids: list[int], now: float) -> None:
        """Mark deliveries sent in one autocommitted UPDATE (still open ones only)."""
        self._execute(self._sent_statement, {"delivery_ids": list(delivery_ids), "now": now})

    def close(self) -> None:
        """Give every thread's connection back to the pool."""
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()


def postpone_untried(engine: Engine, event_id: int, until: float, give_up_before: float | None = None,
                     reason: str = "") -> None:
    """Deliveries left untried after a connection failure wait with the ones that failed. Their RETRY_MAX_HOURS
    clock starts with this round, and those whose clock started before `give_up_before` fail with `reason`."""
    now = time.time()
    untried = (deliveries.c.event_id == event_id, deliveries.c.status.in_(DELIVERY_OPEN),
               deliveries.c.next_attempt_at <= now)

    def write():
        with engine.begin() as conn:
            if give_up_before is not None:
                conn.execute(deliveries.update().where(*untried, deliveries.c.first_attempt_at < give_up_before)
                             .values(status="failed", reason=reason[:1000]))
            conn.execute(deliveries.update().where(*untried)
                         .values(next_attempt_at=until,
                                 first_attempt_at=sa.func.coalesce(deliveries.c.first_attempt_at, now)))
    with_retries(write)


def delivery_counts(engine: Engine, event_id: int) -> dict[str, int]:
    """Deliveries of one event by status."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(deliveries.c.status, sa.func.count())
                            .where(deliveries.c.event_id == event_id)
                            .group_by(deliveries.c.status)).all()
    return {status: count for status, count in rows}


def next_open_delivery_at(engine: Engine, event_id: int) -> float | None:
    """When the earliest open delivery of an event is due; None when all are final."""
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.min(deliveries.c.next_attempt_at))
                            .where(deliveries.c.event_id == event_id,
                                   deliveries.c.status.in_(DELIVERY_OPEN))).scalar()


# --- member snapshots ----------------------------------------------------------------------

def load_snapshots(engine: Engine, department_ids, userids=None) -> dict[int, tuple[set[int], set[str]]]:
    """Per watched department that has a snapshot: (covered department ids, member userids); with
    `userids`, only those of them that are members (an index lookup, not the whole department)."""
    result: dict[int, tuple[set[int], set[str]]] = {}
    with engine.connect() as conn:
        for row in conn.execute(sa.select(department_snapshots)
                                .where(department_snapshots.c.department_id.in_(list(department_ids)))):
            covered = {int(d) for d in row.covered.split(",") if d}
            result[row.department_id] = (covered or {row.department_id}, set())
        if result:
            query = (sa.select(snapshot_members.c.department_id, snapshot_members.c.userid)
                     .where(snapshot_members.c.department_id.in_(list(result))))
            if userids is not None:
                query = query.where(snapshot_members.c.userid.in_(list(userids)))
            for dept, userid in conn.execute(query):
                result[dept][1].add(userid)
    return result


def save_snapshot(engine: Engine, department_id: int, members, covered) -> None:
    """Replace the member snapshot of one watched department."""
    rows = [{"department_id": department_id, "userid": m.userid, "name": m.name[:255]}
            for m in {m.userid: m for m in members}.values()]
    snapshot = {"taken_at": time.time(), "member_count": len(rows),
                "covered": ",".join(str(d) for d in sorted(covered))}

    def write():
        with engine.begin() as conn:
            conn.execute(snapshot_members.delete().where(snapshot_members.c.department_id == department_id))
            for start in range(0, len(rows), 1000):
                conn.execute(snapshot_members.insert(), rows[start:start + 1000])
            if not conn.execute(department_snapshots.update()
                                .where(department_snapshots.c.department_id == department_id)
                                .values(**snapshot)).rowcount:
                conn.execute(insert_ignore(department_snapshots), {"department_id": department_id, **snapshot})
    with_retries(write)


def event_message(engine: Engine, event_id: int) -> tuple[str, str]:
    """The rendered subject and body of an expanded event."""
    with engine.connect() as conn:
        return tuple(conn.execute(sa.select(events.c.subject, events.c.body)
                                  .where(events.c.id == event_id)).one())
