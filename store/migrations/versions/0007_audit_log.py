"""The audit log (wm_audit_log): one append-only row per state-changing action of /admin or the CLI.

A new table only: the previous release's code never reads it, so it may run beside this one.

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table("wm_audit_log",
                    sa.Column("id", Id, primary_key=True, autoincrement=True),
                    sa.Column("at", sa.Double, nullable=False),
                    sa.Column("actor", sa.String(64), nullable=False),
                    sa.Column("client", sa.String(64), nullable=False),
                    sa.Column("action", sa.String(32), nullable=False),
                    sa.Column("target", sa.String(255), nullable=False),
                    sa.Column("detail", sa.String(255), nullable=False),
                    mysql_charset="utf8mb4")
    op.create_index("ix_wm_audit_log_at", "wm_audit_log", ["at"])
    op.create_index("ix_wm_audit_log_actor", "wm_audit_log", ["actor", "at"])


def downgrade() -> None:
    op.drop_table("wm_audit_log")
