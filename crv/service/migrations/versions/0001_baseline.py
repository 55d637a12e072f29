"""The store's schema as of crv issue 21 (clusters, nodes with timings, role states,
attributes, certificates, pairings, autoscaling, decisions, events).

A database is made at this revision by crv.service.database.upgrade (the tables' definitions,
then a stamp), so there is nothing to do here; later revisions change it with `op`.

Revision ID: 0001
Revises:
"""

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
