"""Bounce intake: where the IMAP poll of the bounce mailbox stands (UIDVALIDITY and the last UID processed).

Reserved slot: a no-op until its feature fills it in (each feature owns one revision, so work on several
features can land in any order without two revisions claiming the same parent).

Revision ID: 0013
Revises: 0012
"""
revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
