"""Bounces: suppressed addresses, soft-bounce counts, stored reports, bad pattern guesses, address sources.

New tables, and one nullable column on wm_deliveries (`address_source`): the previous release's code never
reads them and writes deliveries without the column, so it may run beside this one. 'bounced' is a new value
of wm_deliveries.status (a plain string column): the previous release counts such rows as finished, not open.

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import MEDIUMTEXT

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")
LongText = sa.Text().with_variant(MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table("wm_suppressions",
                    sa.Column("address", sa.String(320), primary_key=True),
                    sa.Column("reason", sa.String(1000), nullable=False),
                    sa.Column("since", sa.Double, nullable=False),
                    sa.Column("source", sa.String(16), nullable=False),
                    sa.Column("delivery_id", sa.BigInteger),
                    mysql_charset="utf8mb4")
    op.create_table("wm_soft_bounces",
                    sa.Column("address", sa.String(320), primary_key=True),
                    sa.Column("day", sa.String(10), primary_key=True),
                    sa.Column("at", sa.Double, nullable=False),
                    sa.Column("reason", sa.String(1000), nullable=False),
                    mysql_charset="utf8mb4")
    op.create_table("wm_bounce_reports",
                    sa.Column("id", Id, primary_key=True, autoincrement=True),
                    sa.Column("report_key", sa.String(64), nullable=False),
                    sa.Column("received_at", sa.Double, nullable=False),
                    sa.Column("source", sa.String(16), nullable=False),
                    sa.Column("kind", sa.String(16), nullable=False),
                    sa.Column("delivery_id", sa.BigInteger),
                    sa.Column("digest_id", sa.BigInteger),
                    sa.Column("address", sa.String(320)),
                    sa.Column("reason", sa.String(1000), nullable=False),
                    sa.Column("subject", sa.String(255), nullable=False),
                    sa.Column("raw", LongText),
                    sa.UniqueConstraint("report_key", name="uq_wm_bounce_reports_key"),
                    mysql_charset="utf8mb4")
    op.create_index("ix_wm_bounce_reports_kind", "wm_bounce_reports", ["kind", "received_at"])
    op.create_index("ix_wm_bounce_reports_at", "wm_bounce_reports", ["received_at"])
    op.create_table("wm_bad_guesses",
                    sa.Column("userid", sa.String(64), primary_key=True),
                    sa.Column("address", sa.String(320), primary_key=True),
                    sa.Column("since", sa.Double, nullable=False),
                    mysql_charset="utf8mb4")
    # Nullable: instant on MariaDB, a plain ADD COLUMN on SQLite, existing rows untouched.
    op.add_column("wm_deliveries", sa.Column("address_source", sa.String(16)))


def downgrade() -> None:
    with op.batch_alter_table("wm_deliveries") as table:
        table.drop_column("address_source")
    op.drop_table("wm_bad_guesses")
    op.drop_table("wm_bounce_reports")
    op.drop_table("wm_soft_bounces")
    op.drop_table("wm_suppressions")
