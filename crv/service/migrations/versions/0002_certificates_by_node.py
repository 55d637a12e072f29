"""An index on certificates (cluster, node): enrolment, renewal and the first call with a
certificate look up the node's certificates, and read all of the cluster's without it (a
1,000-node deploy spent a quarter of the service's CPU there, seen with py-spy).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_certificates_cluster_node", "certificates", ["cluster", "node"], if_not_exists=True
    )


def downgrade() -> None:
    op.drop_index("ix_certificates_cluster_node", "certificates")
