"""The guards (issue 23): a cluster's lease, idle_after, node-hours budget and their state in
new columns of `autoscaling`; the usage ledger `node_usage`, one row per node from when the
store recorded it to when it was deleted.

The nodes already there get their ledger row: from their first recorded phase (`timings`, when
the pool was first asked for them) or, without one, from their cluster's creation, so a budget
does not start from nothing on the day of the upgrade.

Revision ID: 0004
Revises: 0003
"""

import time
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

GUARD_COLUMNS = (
    ("lease", sa.Float),
    ("lease_from", sa.Float),
    ("on_lease", lambda: sa.String(16)),
    ("idle_after", sa.Float),
    ("idle_from", sa.Float),
    ("budget", sa.Float),
    ("warn_before", sa.Float),
    ("work_seen", sa.Float),
    ("notices", sa.JSON),
)
INDEX = "ix_node_usage_cluster"


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    have = {c["name"] for c in inspector.get_columns("autoscaling")}
    for name, kind in GUARD_COLUMNS:
        if name not in have:  # a database made from the tables of today has them
            op.add_column("autoscaling", sa.Column(name, kind()))
    if not inspector.has_table("node_usage"):
        op.create_table(
            "node_usage",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("cluster", sa.String(63), nullable=False),
            sa.Column("node", sa.String(63), nullable=False),
            sa.Column("grp", sa.String(63), nullable=False),
            sa.Column("pool", sa.String(63), nullable=False),
            sa.Column("started", sa.Float, nullable=False),
            sa.Column("ended", sa.Float),
        )
        op.create_index(INDEX, "node_usage", ["cluster"])
    _backfill(bind)


def _backfill(bind: sa.engine.Connection) -> None:
    """A ledger row for every node without an open one."""
    meta = sa.MetaData()
    nodes = sa.Table("nodes", meta, autoload_with=bind)
    clusters = sa.Table("clusters", meta, autoload_with=bind)
    usage = sa.Table("node_usage", meta, autoload_with=bind)
    open_rows = {
        (r.cluster, r.node)
        for r in bind.execute(
            sa.select(usage.c.cluster, usage.c.node).where(usage.c.ended.is_(None))
        )
    }
    created = {r.name: r.created_at for r in bind.execute(sa.select(clusters))}
    rows = []
    for n in bind.execute(sa.select(nodes)).all():
        if (n.cluster, n.name) in open_rows:
            continue
        timings = getattr(n, "timings", None) or {}
        started = min((float(t) for t in timings.values()), default=None)
        if started is None:
            started = _unix(created.get(n.cluster))
        rows.append(
            {"cluster": n.cluster, "node": n.name, "grp": n.grp, "pool": n.pool,
             "started": started, "ended": None}
        )  # fmt: skip
    if rows:
        bind.execute(usage.insert(), rows)


def _unix(at: datetime | None) -> float:
    if at is None:
        return time.time()
    if at.tzinfo is None:  # SQLite hands back naive datetimes; everything stored is UTC
        at = at.replace(tzinfo=timezone.utc)
    return at.timestamp()


def downgrade() -> None:
    op.drop_index(INDEX, table_name="node_usage")
    op.drop_table("node_usage")
    for name, _ in reversed(GUARD_COLUMNS):
        op.drop_column("autoscaling", name)
