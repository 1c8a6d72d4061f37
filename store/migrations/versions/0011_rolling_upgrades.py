"""Retention and rolling upgrades: what pruning finished events needs.

Reserved slot: a no-op until its feature fills it in (each feature owns one revision, so work on several
features can land in any order without two revisions claiming the same parent).

Revision ID: 0011
Revises: 0010
"""
revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
