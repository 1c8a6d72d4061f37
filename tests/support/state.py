"""What the service wrote: rows of the state database, as a test reads them."""
from __future__ import annotations

import sqlalchemy as sa

from store.schema import deliveries, events


def rows(engine, table, *where):
    """Every row of `table` (matching `where`), oldest first."""
    with engine.connect() as conn:
        return conn.execute(sa.select(table).where(*where).order_by(*table.primary_key.columns)).all()


def count(engine, table, *where) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()


def event_rows(engine):
    return rows(engine, events)


def delivery_rows(engine):
    return rows(engine, deliveries)
