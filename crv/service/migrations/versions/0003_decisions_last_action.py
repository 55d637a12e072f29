"""decisions.last_action: when a group's last scale action (growth or shrink) was decided, so
that the autoscaler's cooldown covers any action (FAULTS F13), not only growth.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("decisions")}
    if "last_action" not in columns:  # a database made from the tables of today has it
        op.add_column("decisions", sa.Column("last_action", sa.Float))


def downgrade() -> None:
    op.drop_column("decisions", "last_action")
