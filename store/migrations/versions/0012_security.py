"""Security round three: what the admin's sessions and the token store need.

Reserved slot: a no-op until its feature fills it in (each feature owns one revision, so work on several
features can land in any order without two revisions claiming the same parent).

Revision ID: 0012
Revises: 0011
"""
revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
