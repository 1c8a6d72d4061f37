"""WeCom application messages: a delivery per (event, member, channel).

Reserved slot: a no-op until its feature fills it in (each feature owns one revision, so work on several
features can land in any order without two revisions claiming the same parent).

Revision ID: 0009
Revises: 0008
"""
revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
