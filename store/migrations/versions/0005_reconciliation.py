"""Reconciliation (issue 13): the announced membership, the listings' observations, a named lease, and the
source of each event ('callback' for every event recorded so far).

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _tables():
    return {
        "wm_membership": (
            sa.Column("department_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("userid", sa.String(64), primary_key=True),
            sa.Column("state", sa.String(8), nullable=False),
            sa.Column("name", sa.String(255), nullable=False),
            sa.Column("announced_by", sa.String(16), nullable=False),
            sa.Column("announced_at", sa.Double, nullable=False),
            sa.Column("changed_at", sa.Double),
            sa.Column("event_id", sa.BigInteger),
        ),
        "wm_observations": (
            sa.Column("department_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("userid", sa.String(64), primary_key=True),
            sa.Column("kind", sa.String(8), nullable=False),
            sa.Column("listings", sa.Integer, nullable=False),
            sa.Column("since", sa.Double, nullable=False),
            sa.Column("name", sa.String(255), nullable=False),
        ),
        "wm_reconciled_departments": (
            sa.Column("department_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("seeded_at", sa.Double, nullable=False),
            sa.Column("last_round", sa.BigInteger, nullable=False),
            sa.Column("listed_at", sa.Double, nullable=False),
            sa.Column("member_count", sa.Integer, nullable=False),
            sa.Column("fetch_child", sa.Integer, nullable=False),
        ),
        "wm_leases": (
            sa.Column("name", sa.String(32), primary_key=True),
            sa.Column("owner", sa.String(64)),
            sa.Column("lease_until", sa.Double),
            sa.Column("last_run_at", sa.Double),
            sa.Column("runs", sa.BigInteger, nullable=False),
            sa.Column("last_outcome", sa.Text),
        ),
    }


def upgrade() -> None:
    # Each step only where it is missing, as in 0001: a database rebuilt by hand may have some already.
    inspector = sa.inspect(op.get_bind())
    if "source" not in {c["name"] for c in inspector.get_columns("wm_events")}:
        # A server default: instant on MariaDB, and every existing row reads 'callback'.
        op.add_column("wm_events", sa.Column("source", sa.String(16), nullable=False, server_default="callback"))
    for name, columns in _tables().items():
        if not inspector.has_table(name):
            op.create_table(name, *columns, mysql_charset="utf8mb4")


def downgrade() -> None:
    for name in reversed(list(_tables())):
        op.drop_table(name)
    with op.batch_alter_table("wm_events") as batch:
        batch.drop_column("source")
