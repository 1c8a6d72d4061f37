"""The state tables as they were before Alembic (the hand-kept "schema 2"), created where missing.

A database that the earlier code created already holds them: then this revision changes nothing and only
marks the database as managed by Alembic. The definitions are frozen here on purpose: later revisions
change the tables, store/schema.py always shows the newest shape.

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import MEDIUMTEXT

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")
LongText = sa.Text().with_variant(MEDIUMTEXT(), "mysql", "mariadb")


def _tables():
    return {
        "wm_events": (
            sa.Column("id", Id, primary_key=True, autoincrement=True),
            sa.Column("dedup_key", sa.String(64), nullable=False),
            sa.Column("change_type", sa.String(32), nullable=False),
            sa.Column("user_id", sa.String(64), nullable=False),
            sa.Column("departments", sa.String(255), nullable=False),
            sa.Column("create_time", sa.BigInteger),
            sa.Column("xml", LongText, nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("reason", sa.Text),
            sa.Column("subject", LongText),
            sa.Column("body", LongText),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("received_at", sa.Double, nullable=False),
            sa.Column("first_attempt_at", sa.Double),
            sa.Column("next_attempt_at", sa.Double, nullable=False),
            sa.Column("finished_at", sa.Double),
            sa.Column("lease_owner", sa.String(64)),
            sa.Column("lease_until", sa.Double),
            sa.UniqueConstraint("dedup_key", name="uq_wm_events_dedup"),
        ),
        "wm_deliveries": (
            sa.Column("id", Id, primary_key=True, autoincrement=True),
            sa.Column("event_id", sa.BigInteger, nullable=False),
            sa.Column("userid", sa.String(64), nullable=False),
            sa.Column("name", sa.String(255), nullable=False),
            sa.Column("address", sa.String(320)),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("reason", sa.Text),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("first_attempt_at", sa.Double),
            sa.Column("next_attempt_at", sa.Double, nullable=False),
            sa.Column("sent_at", sa.Double),
            sa.UniqueConstraint("event_id", "address", name="uq_wm_deliveries_event_address"),
        ),
        "wm_department_snapshots": (
            sa.Column("department_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("taken_at", sa.Double, nullable=False),
            sa.Column("member_count", sa.Integer, nullable=False),
            sa.Column("covered", sa.Text, nullable=False),
        ),
        "wm_snapshot_members": (
            sa.Column("department_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("userid", sa.String(64), primary_key=True),
            sa.Column("name", sa.String(255), nullable=False),
        ),
        "wm_address_book": (
            sa.Column("userid", sa.String(64), primary_key=True),
            sa.Column("email", sa.String(320), nullable=False),
            sa.Column("updated_at", sa.Double, nullable=False),
        ),
        "wm_access_tokens": (
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("access_token", sa.String(512), nullable=False),
            sa.Column("expires_at", sa.Double, nullable=False),
        ),
    }


INDEXES = (("ix_wm_events_due", "wm_events", ["status", "next_attempt_at"]),
           ("ix_wm_deliveries_status", "wm_deliveries", ["status", "next_attempt_at"]))


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, columns in _tables().items():
        if not inspector.has_table(name):
            op.create_table(name, *columns, mysql_charset="utf8mb4")
    for index, table, columns in INDEXES:
        if index not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes(table)}:
            op.create_index(index, table, columns)


def downgrade() -> None:
    for name in reversed(list(_tables())):
        op.drop_table(name)
