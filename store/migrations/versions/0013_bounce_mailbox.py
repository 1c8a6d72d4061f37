"""Bounce intake: where the IMAP poll of the bounce mailbox stands (UIDVALIDITY and the last UID processed).

`wm_bounce_mailbox` holds one row per polled folder (keyed by user@host:port/FOLDER): the folder's
UIDVALIDITY and the highest UID up to which every message has been processed, so each message is read once
across restarts. A new table only: the previous release never reads it.

Revision ID: 0013
Revises: 0012
"""
from alembic import op
import sqlalchemy as sa

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("wm_bounce_mailbox",
                    sa.Column("folder", sa.String(255), primary_key=True),
                    sa.Column("uidvalidity", sa.BigInteger, nullable=False),
                    sa.Column("last_uid", sa.BigInteger, nullable=False),
                    sa.Column("updated_at", sa.Double, nullable=False),
                    mysql_charset="utf8mb4")


def downgrade() -> None:
    op.drop_table("wm_bounce_mailbox")
