"""MEDIUMTEXT for event XML and messages on MySQL; the hand-kept schema table goes.

The first hand-kept schema stored event XML and rendered messages in TEXT (64 KB), which MySQL's
INSERT IGNORE cut short without a word; "schema 2" widened them at start-up. A database still on
schema 1 is widened here. `wm_schema` (the hand-kept version number) is replaced by alembic_version.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import MEDIUMTEXT

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WIDE = {"xml": False, "subject": True, "body": True}  # column: nullable


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name in ("mysql", "mariadb"):
        narrow = bind.execute(sa.text(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = DATABASE() "
            "AND table_name = 'wm_events' AND column_name IN ('xml', 'subject', 'body') "
            "AND data_type = 'text'")).scalars().all()
        for name in narrow:
            op.alter_column("wm_events", name.lower(), type_=MEDIUMTEXT(), existing_type=sa.Text(),
                            existing_nullable=WIDE[name.lower()])
    op.drop_table("wm_schema", if_exists=True)


def downgrade() -> None:
    pass  # narrowing would cut stored XML; the hand-kept version table is not coming back
