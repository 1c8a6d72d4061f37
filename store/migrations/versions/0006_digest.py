"""The per-recipient digest: a recipient's window, digests, and held deliveries.

`wm_recipients` holds each address's window (no mail but a digest before `window_until`); `wm_digests` one
row per digest (collecting the held deliveries of one address, then sent under a lease). Deliveries get
`digest_id` and events `held_rows` (how many of their deliveries are still held). Every existing row keeps
its meaning: new columns are NULL or 0, and no existing delivery is held.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table("wm_recipients",
                    sa.Column("address", sa.String(320), primary_key=True),
                    sa.Column("window_until", sa.Double, nullable=False),
                    mysql_charset="utf8mb4")
    op.create_table("wm_digests",
                    sa.Column("id", Id, primary_key=True, autoincrement=True),
                    sa.Column("address", sa.String(320), nullable=False),
                    sa.Column("status", sa.String(16), nullable=False),
                    sa.Column("due_at", sa.Double, nullable=False),
                    sa.Column("attempts", sa.Integer, nullable=False),
                    sa.Column("first_attempt_at", sa.Double),
                    sa.Column("created_at", sa.Double, nullable=False),
                    sa.Column("sent_at", sa.Double),
                    sa.Column("changes", sa.Integer, nullable=False),
                    sa.Column("reason", sa.Text),
                    sa.Column("lease_owner", sa.String(64)),
                    sa.Column("lease_until", sa.Double),
                    mysql_charset="utf8mb4")
    op.create_index("ix_wm_digests_due", "wm_digests", ["status", "due_at"])
    op.create_index("ix_wm_digests_address", "wm_digests", ["address", "status"])
    # Nullable or with a server default: instant on MariaDB, a plain ADD COLUMN on SQLite, rows untouched.
    op.add_column("wm_events", sa.Column("held_rows", sa.Integer, nullable=False, server_default="0"))
    op.add_column("wm_deliveries", sa.Column("digest_id", sa.BigInteger))
    op.create_index("ix_wm_deliveries_digest", "wm_deliveries", ["digest_id"])


def downgrade() -> None:
    op.drop_index("ix_wm_deliveries_digest", "wm_deliveries")
    with op.batch_alter_table("wm_deliveries") as table:
        table.drop_column("digest_id")
    with op.batch_alter_table("wm_events") as table:
        table.drop_column("held_rows")
    op.drop_table("wm_digests")
    op.drop_table("wm_recipients")
