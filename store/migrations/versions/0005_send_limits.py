"""Sending limits shared by all processes: a log of recent messages, a count per day, a lock row.

Revision ID: 0005
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table("wm_send_log",
                    sa.Column("id", Id, primary_key=True, autoincrement=True),
                    sa.Column("sent_at", sa.Double, nullable=False),
                    mysql_charset="utf8mb4")
    op.create_index("ix_wm_send_log_sent_at", "wm_send_log", ["sent_at"])
    op.create_table("wm_send_days",
                    sa.Column("day", sa.String(10), primary_key=True),
                    sa.Column("sent", sa.Integer, nullable=False),
                    mysql_charset="utf8mb4")
    locks = op.create_table("wm_limit_locks",
                            sa.Column("name", sa.String(32), primary_key=True),
                            sa.Column("ticks", sa.BigInteger, nullable=False),
                            mysql_charset="utf8mb4")
    op.bulk_insert(locks, [{"name": "minute", "ticks": 0}])


def downgrade() -> None:
    for name in ("wm_limit_locks", "wm_send_days", "wm_send_log"):
        op.drop_table(name)
