"""Security round three (issue 24): wm_admin_sessions.last_seen_at, for the idle timeout of /admin sessions.

Expand only: a nullable column. The previous release never reads or writes it; this release treats NULL as
"last used when opened" (created_at), so sessions opened before the upgrade keep their idle clock.
Sealed access tokens (wm_access_tokens) need no schema change: a sealed value fits the existing column
(about 330 characters for WeCom's tokens, the column holds 512), and an old clear row is simply refetched.

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("wm_admin_sessions", sa.Column("last_seen_at", sa.Double(), nullable=True))


def downgrade() -> None:
    op.drop_column("wm_admin_sessions", "last_seen_at")
