"""/admin for a team: WeCom sign-in state, who a session belongs to, template versions, and the version
each event was rendered from.

Expand only: two new tables and two new columns, nullable or with a server default, so the previous
release's code runs beside this one (its sessions read as `token` sessions; it never reads the rest).

Revision ID: 0010
Revises: 0009
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import MEDIUMTEXT

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")
LongText = sa.Text().with_variant(MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.add_column("wm_admin_sessions", sa.Column("actor", sa.String(64), nullable=False, server_default="token"))
    op.add_column("wm_events", sa.Column("template_version", sa.BigInteger))
    op.add_column("wm_digests", sa.Column("template_version", sa.BigInteger))
    op.create_table("wm_sign_in_states",
                    sa.Column("state_digest", sa.String(64), primary_key=True),
                    sa.Column("visitor_digest", sa.String(64), nullable=False),
                    sa.Column("created_at", sa.Double, nullable=False),
                    sa.Column("expires_at", sa.Double, nullable=False),
                    mysql_charset="utf8mb4")
    op.create_index("ix_wm_sign_in_states_expires", "wm_sign_in_states", ["expires_at"])
    op.create_table("wm_template_versions",
                    sa.Column("id", Id, primary_key=True, autoincrement=True),
                    sa.Column("app", sa.String(64), nullable=False),
                    sa.Column("change_type", sa.String(32), nullable=False),
                    sa.Column("email_title", sa.Text, nullable=False),
                    sa.Column("email_body", LongText, nullable=False),
                    sa.Column("digest", sa.String(64), nullable=False),
                    sa.Column("saved_by", sa.String(64), nullable=False),
                    sa.Column("saved_at", sa.Double, nullable=False),
                    sa.Column("action", sa.String(16), nullable=False),
                    sa.Column("restored_from", sa.BigInteger),
                    mysql_charset="utf8mb4")
    op.create_index("ix_wm_template_versions_type", "wm_template_versions", ["app", "change_type", "id"])
    op.create_index("ix_wm_template_versions_digest", "wm_template_versions", ["app", "change_type", "digest"])


def downgrade() -> None:
    op.drop_table("wm_template_versions")
    op.drop_table("wm_sign_in_states")
    with op.batch_alter_table("wm_digests") as table:
        table.drop_column("template_version")
    with op.batch_alter_table("wm_events") as table:
        table.drop_column("template_version")
    with op.batch_alter_table("wm_admin_sessions") as table:
        table.drop_column("actor")
