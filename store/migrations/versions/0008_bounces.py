"""Bounces: suppressed addresses, soft-bounce counts, stored reports, the IMAP folder's position.

Reserved slot: a no-op until its feature fills it in (each feature owns one revision, so work on several
features can land in any order without two revisions claiming the same parent).

Revision ID: 0008
Revises: 0007
"""
revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
