"""WeCom application messages: a delivery per (event, member, channel), and the limits messages share.

`wm_deliveries.channel` (`email` by default, so every existing row and every row the previous release writes
stays an email delivery); a `wecom` row's address is `wecom:<userid>`, so the unique key (event, address)
already means one row per (event, member, channel) and nothing is dropped or rebuilt. `wm_message_log` counts
each person's messages over the last hour (WeCom drops more than 30 a minute or 1,000 an hour);
`wm_message_days` the recipients per day (WECOM_MESSAGE_MAX_PER_DAY). Expand only: the previous release
ignores all three.

Revision ID: 0009
Revises: 0008
"""
from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    # A server default: instant on MariaDB, a plain ADD COLUMN on SQLite, existing rows read `email`.
    op.add_column("wm_deliveries", sa.Column("channel", sa.String(8), nullable=False, server_default="email"))
    op.create_table("wm_message_log",
                    sa.Column("id", Id, primary_key=True, autoincrement=True),
                    sa.Column("address", sa.String(320), nullable=False),
                    sa.Column("sent_at", sa.Double, nullable=False),
                    mysql_charset="utf8mb4")
    op.create_index("ix_wm_message_log_address", "wm_message_log", ["address", "sent_at"])
    op.create_index("ix_wm_message_log_sent_at", "wm_message_log", ["sent_at"])
    op.create_table("wm_message_days",
                    sa.Column("day", sa.String(10), primary_key=True),
                    sa.Column("sent", sa.Integer, nullable=False),
                    mysql_charset="utf8mb4")


def downgrade() -> None:
    op.drop_table("wm_message_days")
    op.drop_index("ix_wm_message_log_sent_at", "wm_message_log")
    op.drop_index("ix_wm_message_log_address", "wm_message_log")
    op.drop_table("wm_message_log")
    with op.batch_alter_table("wm_deliveries") as table:
        table.drop_column("channel")
