"""/admin sessions kept on the server, shared login throttling, and the generated session-signing secret.

Each table is created where missing (as 0001 does): a database whose alembic_version was lost or reset
already holds them, and upgrading it again must not fail.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "wm_service_secrets" not in existing:
        op.create_table(
            "wm_service_secrets",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("value", sa.String(128), nullable=False),
            sa.Column("created_at", sa.Double, nullable=False),
        )
    if "wm_admin_sessions" not in existing:
        op.create_table(
            "wm_admin_sessions",
            sa.Column("digest", sa.String(64), primary_key=True),
            sa.Column("client", sa.String(64), nullable=False),
            sa.Column("created_at", sa.Double, nullable=False),
            sa.Column("expires_at", sa.Double, nullable=False),
        )
        op.create_index("ix_wm_admin_sessions_expires", "wm_admin_sessions", ["expires_at"])
    if "wm_login_failures" not in existing:
        op.create_table(
            "wm_login_failures",
            sa.Column("id", Id, primary_key=True, autoincrement=True),
            sa.Column("client", sa.String(64), nullable=False),
            sa.Column("failed_at", sa.Double, nullable=False),
        )
        op.create_index("ix_wm_login_failures_client", "wm_login_failures", ["client", "failed_at"])
        op.create_index("ix_wm_login_failures_at", "wm_login_failures", ["failed_at"])


def downgrade() -> None:
    op.drop_table("wm_login_failures")
    op.drop_table("wm_admin_sessions")
    op.drop_table("wm_service_secrets")
