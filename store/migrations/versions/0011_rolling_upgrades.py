"""Retention (RETENTION_DAYS): an index on wm_events.received_at, the order in which old events are pruned.

Expand only: one new secondary index. The previous release never names it, and InnoDB builds it in place
without blocking writes (online DDL), so it may run while that release is still serving.

Revision ID: 0011
Revises: 0010
"""
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_wm_events_received", "wm_events", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_wm_events_received", table_name="wm_events")
