"""The service's state: clusters, nodes, role states, attributes, certificates and events.

SQLAlchemy Core over SQLite by default (WAL, one writer: the service process) or PostgreSQL
(crv.service.database); the schema uses only portable types and the code is the same for both.
Everything a deploy needs to resume lives here, so a restarted service carries on: attributes,
node and role states, and which certificates are valid. Bootstrap tokens are stored as SHA-256
only.

Every public method is one transaction (or a few, each complete). On PostgreSQL the writes to
one cluster take turns under an advisory lock (`Store._writing`): several service processes
may change the same rows. A transaction PostgreSQL refuses as a serialization failure or a
deadlock runs again from the start. The service calls them on its worker threads
(crv.service.state), never on its event loop.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from crv.base.errors import CrvError
from crv.base.states import DRAIN_STATES, REMADE_FROM, NodeState, RoleState
from crv.service.models import PAIR_TTL, ClusterStatus, NodeStatus, RoleStatus

METADATA = sa.MetaData()

clusters = sa.Table(
    "clusters",
    METADATA,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("appliance", sa.String(63), nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("pool", sa.String(63), nullable=False),
    sa.Column("parameters", sa.JSON, nullable=False),
    sa.Column("counts", sa.JSON),  # group -> node count chosen by a resize (none: the appliance's)
    sa.Column("pools", sa.JSON),  # group -> the pool its new nodes go to (none: `pool`)
    sa.Column("roles", sa.JSON, nullable=False),  # role -> {recipe, drain, appdir, env, depends_on}
    sa.Column("bundle", sa.LargeBinary, nullable=False),
    sa.Column("bundle_digest", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

nodes = sa.Table(
    "nodes",
    METADATA,
    sa.Column("cluster", sa.String(63), primary_key=True),
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("grp", sa.String(63), nullable=False),
    sa.Column("roles", sa.JSON, nullable=False),
    sa.Column("pool", sa.String(63), nullable=False),
    sa.Column("address", sa.String(64)),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, default=1),
    sa.Column("token_hash", sa.String(64)),
    sa.Column("token_expires", sa.DateTime(timezone=True)),
    sa.Column("stop", sa.Boolean, nullable=False, default=False),
    sa.Column("last_seen", sa.DateTime(timezone=True)),
    # the enrolment that spent the token (hashes of the token and the CSR, and when): the same
    # request again within ENROL_REPLAY gets the same certificate (its answer was lost)
    sa.Column("enrol_token", sa.String(64)),
    sa.Column("enrol_csr", sa.String(64)),
    sa.Column("enrolled_at", sa.DateTime(timezone=True)),
    # when the node reached each phase of its making: {phase: UNIX time} (NodeItem.timings)
    sa.Column("timings", sa.JSON),
)

role_states = sa.Table(
    "role_states",
    METADATA,
    sa.Column("cluster", sa.String(63), primary_key=True),
    sa.Column("node", sa.String(63), primary_key=True),
    sa.Column("role", sa.String(63), primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("release", sa.Integer, nullable=False),
    sa.Column("exit_code", sa.Integer),
    sa.Column("output", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # digest of what the role read when it was last released: its dependencies' nodes and
    # their attributes. A `refresh` re-runs the role only when this changed (a resize).
    sa.Column("inputs", sa.String(64)),
    # a verify the node's agent runs and reports (`verify: {on_node: ...}`): the newest one
    # asked, its command, and its result once reported (none: not yet)
    sa.Column("check_id", sa.Integer),
    sa.Column("check_command", sa.Text),
    sa.Column("check_exit", sa.Integer),
    sa.Column("check_output", sa.Text),
)

attributes = sa.Table(
    "attributes",
    METADATA,
    sa.Column("cluster", sa.String(63), primary_key=True),
    sa.Column("node", sa.String(63), primary_key=True),
    sa.Column("role", sa.String(63), primary_key=True),
    sa.Column("key", sa.String(63), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated", sa.Float),  # Unix time of the last set, even of the same value
)

certificates = sa.Table(
    "certificates",
    METADATA,
    sa.Column("serial", sa.String(40), primary_key=True),  # hex
    sa.Column("cluster", sa.String(63), nullable=False, index=True),
    sa.Column("node", sa.String(63), nullable=False),
    sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Column("issued_at", sa.DateTime(timezone=True)),
    sa.Column("pem", sa.Text),  # the certificate itself (public): a lost answer is sent again
    # why it was revoked: "superseded" (a renewal's certificate was used), else removed
    sa.Column("reason", sa.String(16)),
)
# every enrolment, renewal and first call of a node's certificate looks up the node's
# certificates: without it each one read all of its cluster's (a 1,000-node deploy: quadratic)
sa.Index("ix_certificates_cluster_node", certificates.c.cluster, certificates.c.node)

events = sa.Table(
    "events",
    METADATA,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("cluster", sa.String(63), nullable=False, index=True),
    sa.Column("node", sa.String(63)),
    sa.Column("role", sa.String(63)),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(32)),
    sa.Column("release", sa.Integer),
    sa.Column("exit_code", sa.Integer),
    sa.Column("output", sa.Text),
    sa.Column("attributes", sa.JSON),
)

# Pairing (`crv pair`): a one-time PIN with which a machine crv did not make joins a group of a
# cluster. Only the PIN's hash is kept; a PIN is used once, ends after a few minutes, and every
# wrong PIN sent counts against all open ones (PAIR_TRIES wrong ones lock them out).
pairings = sa.Table(
    "pairings",
    METADATA,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("pin_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("cluster", sa.String(63), nullable=False, index=True),
    sa.Column("grp", sa.String(63), nullable=False),
    sa.Column("roles", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("used_at", sa.DateTime(timezone=True)),
    sa.Column("node", sa.String(63)),  # the node it made
    sa.Column("csr", sa.String(64)),  # digest of the CSR it was used with
)

# Autoscaling: whether the `autoscale/<cluster>` deployment should exist, and how often it runs
# (`crv autoscale enable/disable`; the serve process makes the deployment match this row).
autoscaling = sa.Table(
    "autoscaling",
    METADATA,
    sa.Column("cluster", sa.String(63), primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("every", sa.Float, nullable=False),  # seconds between runs
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # the guards (crv.engine.guards; `crv autoscale enable --lease/--idle-after/--budget`):
    # none set, none enforced. Durations in seconds, times Unix times, the budget in node-hours
    # per UTC day
    sa.Column("lease", sa.Float),
    sa.Column("lease_from", sa.Float),  # when the lease was set: it runs from then
    sa.Column("on_lease", sa.String(16)),  # "destroy" (none: destroy) or "shrink"
    sa.Column("idle_after", sa.Float),
    sa.Column("idle_from", sa.Float),  # when idle_after was set: idle counts from then at most
    sa.Column("budget", sa.Float),
    sa.Column("warn_before", sa.Float),  # none: crv.engine.guards.WARN_BEFORE (5 min)
    # what the autoscale flow keeps between runs: when it last saw work, and the guards'
    # announcements that are out ({guard: crv.engine.guards.Notice.row()})
    sa.Column("work_seen", sa.Float),
    sa.Column("notices", sa.JSON),
)
GUARD_SETTINGS = ("lease", "on_lease", "idle_after", "budget", "warn_before")

# The usage ledger: one row per node, from when the store recorded it to when it was deleted
# (crv.service.usage counts node-hours from it). It outlives its cluster (a cost record) for
# USAGE_KEPT after its end.
node_usage = sa.Table(
    "node_usage",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster", sa.String(63), nullable=False, index=True),
    sa.Column("node", sa.String(63), nullable=False),
    sa.Column("grp", sa.String(63), nullable=False),
    sa.Column("pool", sa.String(63), nullable=False),
    sa.Column("started", sa.Float, nullable=False),  # Unix time
    sa.Column("ended", sa.Float),  # none: still there
)
USAGE_KEPT = 35 * 86400.0  # seconds a closed row is kept after its end

# Every decision an autoscale run took, "none" ones included; the newest of a group also holds
# what the next decision needs (crv.engine.autoscale.Memory).
decisions = sa.Table(
    "decisions",
    METADATA,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster", sa.String(63), nullable=False, index=True),
    sa.Column("grp", sa.String(63), nullable=False),
    sa.Column("at", sa.Float, nullable=False),  # Unix time
    sa.Column("metric", sa.Float),
    sa.Column("current", sa.Integer, nullable=False),
    sa.Column("desired", sa.Integer, nullable=False),
    sa.Column("target", sa.Integer, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text),  # what the resize did (none yet: under way or no action)
    sa.Column("flow_run", sa.String(64)),
    sa.Column("last_scale_up", sa.Float),
    sa.Column("low_since", sa.Float),
    sa.Column("last_action", sa.Float),  # when the last growth or shrink was decided
)
DECISIONS_KEPT = 2000  # per cluster; older ones are dropped
_GUARD_COLUMNS = (
    "lease", "lease_from", "on_lease", "idle_after", "idle_from", "budget", "warn_before",
    "work_seen",
)  # fmt: skip

ROLE_STATES = tuple(RoleState)  # the order a role on a node moves through (crv.base.states)
MAX_KEYS_PER_ROLE = 256
OUTPUT_TAIL = 4096
LEAVING = NodeState.LEAVING  # during a shrink: it still runs, but no longer feeds anyone
TOUCH_EVERY = 10.0  # seconds between writes of a node's last_seen
ENROL_REPLAY = timedelta(minutes=10)  # the same enrolment again gets the same certificate
REJOIN_GRACE = timedelta(days=30)  # a certificate ended this long ago can still re-join
MANUAL_POOL = "manual"  # where paired machines are recorded: crv did not make them
PAIR_TRIES = 10  # wrong PINs sent while a pairing is open, after which it is locked out
PIN_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base32: no I, L, O or U
PIN_LENGTH = 8  # 40 bits; with PAIR_TRIES guesses, 1 in 10^11 per open PIN


_DECISION_FIELDS = (
    "group", "at", "metric", "current", "desired", "target", "action", "reason", "outcome",
    "flow_run", "last_scale_up", "low_since", "last_action",
)  # fmt: skip


# what a pool reports of the machine's current boot: a machine that replaced a failed one
# (bare metal) has its own times, which replace the first machine's
MACHINE_PHASES = frozenset({"power_on", "script", "kernel", "initrd", "callback"})


def merge_timings(
    old: Mapping[str, float] | None, new: Mapping[str, float] | None
) -> dict[str, float] | None:
    """A node's phase times after a report: the first time of each of crv's phases stays (a
    re-run does not move them), the machine's phases are the newest report's, and a new
    `provision` starts the record again (the node is made anew)."""
    if not new:
        return dict(old) if old else None
    if "provision" in new or not old:
        return dict(new)
    machine = {p: t for p, t in new.items() if p in MACHINE_PHASES}
    return {**new, **old, **machine}


@dataclass
class _NodeWrites:
    """What one put_nodes writes, gathered to be written in one executemany per kind."""

    cluster: str
    at: datetime
    changed: set[str] = field(default_factory=set)
    new_nodes: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    node_events: list[dict[str, Any]] = field(default_factory=list)
    new_roles: list[dict[str, Any]] = field(default_factory=list)
    remade: list[str] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)

    def add_node(self, item: Mapping[str, Any]) -> None:
        self.new_nodes.append(
            {
                "cluster": self.cluster,
                "name": item["name"],
                "grp": item["group"],
                "roles": list(item["roles"]),
                "pool": item["pool"],
                "address": item.get("address"),
                "state": item.get("state") or "planned",
                "generation": 1,
                "stop": False,
                "timings": merge_timings(None, item.get("timings")),
            }
        )
        self.usage.append(
            _usage_row(self.cluster, item["name"], item["group"], item["pool"], self.at)
        )
        self.changed.add(item["name"])

    def write(self, c: Connection) -> None:
        if self.new_nodes:
            c.execute(nodes.insert(), self.new_nodes)
            c.execute(node_usage.insert(), self.usage)
        if self.updates:
            c.execute(
                nodes.update()
                .where(nodes.c.cluster == self.cluster, nodes.c.name == sa.bindparam("_name"))
                .values(
                    roles=sa.bindparam("_roles"),
                    grp=sa.bindparam("_grp"),
                    address=sa.bindparam("_address"),
                    generation=sa.bindparam("_generation"),
                    state=sa.bindparam("_state"),
                    timings=sa.bindparam("_timings"),
                ),
                self.updates,
            )
        if self.node_events:
            c.execute(events.insert(), self.node_events)
        if self.new_roles:
            c.execute(role_states.insert(), self.new_roles)


def _usage_row(cluster: str, node: str, group: str, pool: str, at: datetime) -> dict[str, Any]:
    """The ledger's row of a node the store records now (crv.service.usage)."""
    return {"cluster": cluster, "node": node, "grp": group, "pool": pool,
            "started": at.timestamp(), "ended": None}  # fmt: skip


class StoreError(CrvError):
    """A request the state forbids; `status` is the HTTP status the service answers with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class WrongPin(StoreError):
    """A PIN that matches no pairing: counted against the open ones, answered slowly."""

    def __init__(self) -> None:
        super().__init__(403, "pairing refused: wrong PIN")


def now() -> datetime:
    return datetime.now(timezone.utc)


def natural_key(name: str) -> tuple[Any, ...]:
    """`web-2` before `web-10`: recipes that list backends expect the plan's order."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def token_hash(token: str) -> str:
    # 256 random bits need no slow hash: nothing to brute-force, only to not store in clear.
    return hashlib.sha256(token.encode()).hexdigest()


def _pairing_state(row: sa.Row[Any], at: datetime) -> str:
    if row.used_at is not None:
        return "paired"
    if row.failures >= PAIR_TRIES:
        return "locked"
    expires = _utc(row.expires_at)
    return "expired" if expires is None or expires <= at else "open"


def normal_pin(pin: str) -> str:
    """What a person typed, as the PIN was made: upper case, without spaces and dashes, and
    the letters Crockford's base32 reads as digits (O as 0, I and L as 1)."""
    text = pin.upper().replace("-", "").replace(" ", "")
    return text.translate(str.maketrans("OIL", "011"))


def new_pin() -> str:
    """A PIN as shown: two groups of four, `7KQ2-M9XD`."""
    raw = "".join(secrets.choice(PIN_ALPHABET) for _ in range(PIN_LENGTH))
    return f"{raw[:4]}-{raw[4:]}"


def pin_hash(pin: str) -> str:
    return hashlib.sha256(b"crv-pin\x00" + normal_pin(pin).encode()).hexdigest()


def pairing_token(pin: str) -> str:
    """The enrolment token a pairing gives its node, derived from the PIN, so that the same PIN
    and CSR again (the answer was lost) get the same certificate through `enrol`'s replay."""
    return hmac.new(normal_pin(pin).encode(), b"crv-pair-token", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Enrolment:
    cluster: str
    node: str
    roles: tuple[str, ...]
    address: str | None


@dataclass(frozen=True)
class Issued:
    """A node certificate `sign` made: what the store records of it."""

    serial: str  # hex
    not_after: datetime
    pem: str


Signer = Callable[[Enrolment], Issued]


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def add_missing_columns(c: Connection) -> None:
    """Columns added before the store had migrations (create_all only makes missing tables):
    each is nullable, so ADD COLUMN is all it takes, on SQLite and PostgreSQL alike. Changes
    since are Alembic revisions (crv/service/migrations)."""
    inspector = sa.inspect(c)
    for table in METADATA.sorted_tables:
        have = {col["name"] for col in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                kind = column.type.compile(dialect=c.dialect)
                c.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")


def _revoke(c: Connection, serials: Sequence[str], reason: str | None = None) -> None:
    if serials:
        c.execute(
            certificates.update()
            .where(certificates.c.serial.in_(list(serials)))
            .values(revoked_at=now(), reason=reason)
        )


def _feeding(table: sa.Table, cluster: str, role: str, *columns: Any) -> sa.Select[Any]:
    """`columns` of `table` (attributes or role_states) for `role`, over the nodes that feed
    others: a node `leaving` (a shrink's victim) still runs but no longer counts."""
    return (
        sa.select(*columns)
        .join(nodes, (nodes.c.cluster == table.c.cluster) & (nodes.c.name == table.c.node))
        .where(table.c.cluster == cluster, table.c.role == role, nodes.c.state != LEAVING)
    )


def _role_key(cluster: str, node: str, role: str) -> tuple[Any, ...]:
    """The where-clause of one role on one node."""
    return (
        role_states.c.cluster == cluster,
        role_states.c.node == node,
        role_states.c.role == role,
    )


def _as_is(row: sa.Row[Any]) -> dict[str, Any]:
    """The answer to a release (refresh, drain) that changed nothing: the role as it is."""
    return {
        "node": row.node,
        "role": row.role,
        "release": row.release,
        "state": row.state,
        "released": False,
    }


def _new_work(c: Connection, cluster: str, node: str) -> str:
    """Bump the node's work generation, so that its agent's long poll answers; the node."""
    c.execute(
        nodes.update()
        .where(nodes.c.cluster == cluster, nodes.c.name == node)
        .values(generation=nodes.c.generation + 1)
    )
    return node


def _lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key (signed 64 bits) for a cluster's writers, or PAIRINGS."""
    digest = hashlib.sha256(b"crv-store:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


PAIRINGS = ""  # the lock of the pairings table's writers: no cluster is named ""
WRITE_OPTION = "crv_write"  # a write transaction: SQLite begins it IMMEDIATE (its write lock)


class Store:
    def __init__(self, engine: Engine) -> None:
        self._touched: dict[tuple[str, str], float] = {}
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"

    @contextlib.contextmanager
    def _writing(self, cluster: str | None) -> Iterator[Connection]:
        """A write transaction. SQLite: its single writer serializes every write. PostgreSQL:
        READ COMMITTED under the cluster's advisory lock (None: the pairings'), so the writers
        of one cluster go one at a time, as on SQLite, and each statement sees what the ones
        before committed; clusters are written in parallel. (SERIALIZABLE everywhere was tried
        first: a 1,000-node deploy on 2 service processes aborted put_nodes 20 times in a row
        as a pivot among the agents' writes, and the deploy stalled.) Reads are REPEATABLE
        READ snapshots (the engine's default): consistent, never blocked, never aborted."""
        if not self._postgres:  # BEGIN IMMEDIATE (crv.service.database)
            with self.engine.connect().execution_options(**{WRITE_OPTION: True}) as c, c.begin():
                yield c
            return
        conn = self.engine.connect().execution_options(isolation_level="READ COMMITTED")
        with conn as c, c.begin():
            self._lock(c, PAIRINGS if cluster is None else cluster)
            yield c

    def _glance(self) -> Connection:
        """A connection for a read that is a statement or two on hot routes (an agent's poll,
        the check of its certificate) or a blind one-row write: on PostgreSQL each statement
        commits by itself, without the round trips of BEGIN and ROLLBACK (a transaction's
        snapshot across them matters less than their cost there)."""
        if self._postgres:
            return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self.engine.connect()

    def _lock(self, c: Connection, name: str) -> None:
        if self._postgres:
            c.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(name)})

    # -- clusters ---------------------------------------------------------------------------

    def put_cluster(
        self,
        name: str,
        *,
        appliance: str,
        source: str,
        pool: str,
        parameters: Mapping[str, Any],
        roles: Mapping[str, Any],
        bundle: bytes,
        counts: Mapping[str, int] | None = None,
        pools: Mapping[str, str] | None = None,
    ) -> tuple[str, bool]:
        """Register or update; returns (bundle digest, whether the bundle changed). A changed
        bundle bumps every node's generation so agents fetch it again."""
        digest = hashlib.sha256(bundle).hexdigest()
        values = {
            "appliance": appliance,
            "source": source,
            "pool": pool,
            "parameters": dict(parameters),
            "counts": dict(counts or {}),
            "pools": dict(pools or {}),
            "roles": dict(roles),
            "bundle": bundle,
            "bundle_digest": digest,
        }
        with self._writing(name) as c:
            old = c.execute(
                sa.select(clusters.c.bundle_digest, clusters.c.roles).where(clusters.c.name == name)
            ).first()
            if old is None:
                c.execute(clusters.insert().values(name=name, created_at=now(), **values))
                return digest, True
            changed = old.bundle_digest != digest or old.roles != dict(roles)
            c.execute(clusters.update().where(clusters.c.name == name).values(**values))
            if changed:
                c.execute(
                    nodes.update()
                    .where(nodes.c.cluster == name)
                    .values(generation=nodes.c.generation + 1)
                )
            return digest, changed

    def cluster(self, name: str) -> sa.Row[Any] | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(clusters).where(clusters.c.name == name)).first()

    def require_cluster(self, name: str) -> sa.Row[Any]:
        row = self.cluster(name)
        if row is None:
            raise StoreError(404, f"no cluster {name!r}")
        return row

    def list_clusters(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(clusters.c.name, clusters.c.appliance, clusters.c.pool).order_by(
                    clusters.c.name
                )
            ).all()
            out = []
            for r in rows:
                counts = self._role_counts(c, r.name)
                out.append(
                    {
                        "name": r.name,
                        "appliance": r.appliance,
                        "pool": r.pool,
                        "nodes": counts["nodes"],
                        "ready": counts["ready"],
                    }
                )
            return out

    def _role_counts(self, c: Connection, cluster: str) -> dict[str, Any]:
        n = c.execute(
            sa.select(sa.func.count()).select_from(nodes).where(nodes.c.cluster == cluster)
        ).scalar_one()
        not_verified = c.execute(
            sa.select(sa.func.count())
            .select_from(role_states)
            .where(role_states.c.cluster == cluster, role_states.c.state != "verified")
        ).scalar_one()
        return {"nodes": n, "ready": n > 0 and not_verified == 0}

    def delete_cluster(self, name: str) -> list[str]:
        with self._writing(name) as c:
            names = c.execute(sa.select(nodes.c.name).where(nodes.c.cluster == name)).scalars()
            revoked = [s for n in list(names) for s in self._delete_node(c, name, n)]
            c.execute(clusters.delete().where(clusters.c.name == name))
            c.execute(events.delete().where(events.c.cluster == name))
            c.execute(autoscaling.delete().where(autoscaling.c.cluster == name))
            c.execute(decisions.delete().where(decisions.c.cluster == name))
            c.execute(pairings.delete().where(pairings.c.cluster == name))
            return revoked  # its usage ledger stays: a cost record (USAGE_KEPT)

    # -- nodes ------------------------------------------------------------------------------

    def put_nodes(self, cluster: str, items: Sequence[Mapping[str, Any]]) -> set[str]:
        """Upsert nodes (the flow's view of them); returns the nodes whose work changed.
        In bulk: one read of the cluster's nodes and roles, then one executemany per kind of
        write (a deploy puts a thousand nodes at a time)."""
        w = _NodeWrites(cluster, now())
        with self._writing(cluster) as c:
            rows = {
                r.name: r for r in c.execute(sa.select(nodes).where(nodes.c.cluster == cluster))
            }
            held: dict[str, set[str]] = {}
            for r in c.execute(
                sa.select(role_states.c.node, role_states.c.role).where(
                    role_states.c.cluster == cluster
                )
            ):
                held.setdefault(r.node, set()).add(r.role)
            for item in items:
                row = rows.get(item["name"])
                if row is None:
                    w.add_node(item)
                else:
                    self._update_node(c, row, item, w)
                self._roles_of_node(c, item, held.get(item["name"], set()), w)
            w.write(c)
            for name in w.remade:
                self._forget_machine(c, cluster, name)
        return w.changed

    def _update_node(
        self, c: Connection, row: sa.Row[Any], item: Mapping[str, Any], w: _NodeWrites
    ) -> None:
        name = row.name
        address, generation, state = row.address, row.generation, row.state
        if item.get("address") is not None and item["address"] != row.address:
            address, generation = item["address"], row.generation + 1
            w.changed.add(name)
        wanted = item.get("state")
        if row.state == LEAVING and wanted == "provisioned" and self._has_cert(c, w.cluster, name):
            wanted = "enrolled"  # a member again (a rollback, or a resize undone)
        # an enrolled node stays enrolled when the flow reports it provisioned again
        if (
            wanted
            and wanted != row.state
            and not (row.state == "enrolled" and wanted == "provisioned")
        ):
            if wanted == "provisioning" and row.state in REMADE_FROM:
                w.remade.append(name)
            state = wanted
            w.node_events.append(
                {"at": w.at, "cluster": w.cluster, "node": name, "role": None, "kind": "node",
                 "state": state}
            )  # fmt: skip
        w.updates.append(
            {"_name": name, "_roles": list(item["roles"]), "_grp": item["group"],
             "_address": address, "_generation": generation, "_state": state,
             "_timings": merge_timings(row.timings, item.get("timings"))}
        )  # fmt: skip

    def _roles_of_node(
        self, c: Connection, item: Mapping[str, Any], have: set[str], w: _NodeWrites
    ) -> None:
        """A role the node left no longer feeds anyone (nor holds its state); a new one is
        pending."""
        name, roles = item["name"], list(item["roles"])
        gone = have - set(roles)
        if gone:
            for table in (attributes, role_states):
                c.execute(
                    table.delete().where(
                        table.c.cluster == w.cluster,
                        table.c.node == name,
                        table.c.role.in_(gone),
                    )
                )
        w.new_roles.extend(
            {"cluster": w.cluster, "node": name, "role": role, "state": "pending", "release": 0,
             "output": "", "updated_at": w.at}
            for role in roles
            if role not in have
        )  # fmt: skip

    def _forget_machine(self, c: Connection, cluster: str, name: str) -> None:
        """The node is being made again (its machine was lost: drift, repair): the old machine's
        certificate is revoked, what its roles published is purged, and every role runs again
        on the new machine (the release counter goes on, so a late report of the old one is
        refused)."""
        self._revoke_node_certs(c, cluster, name)
        c.execute(
            attributes.delete().where(attributes.c.cluster == cluster, attributes.c.node == name)
        )
        c.execute(
            role_states.update()
            .where(role_states.c.cluster == cluster, role_states.c.node == name)
            .values(state="pending", exit_code=None, output="", inputs=None, updated_at=now())
        )
        for r in c.execute(
            sa.select(role_states.c.role, role_states.c.release).where(
                role_states.c.cluster == cluster, role_states.c.node == name
            )
        ).all():
            self._event(
                c, cluster, name, r.role, "role",
                state="pending", release=r.release, output="", attributes={},
            )  # fmt: skip

    @staticmethod
    def _has_cert(c: Connection, cluster: str, name: str) -> bool:
        """The node enrolled and its certificate still stands."""
        return (
            c.execute(
                sa.select(certificates.c.serial).where(
                    certificates.c.cluster == cluster,
                    certificates.c.node == name,
                    certificates.c.revoked_at.is_(None),
                )
            ).first()
            is not None
        )

    def node_names(self, cluster: str) -> list[str]:
        with self.engine.connect() as c:
            return list(
                c.execute(sa.select(nodes.c.name).where(nodes.c.cluster == cluster)).scalars()
            )

    def node(self, cluster: str, name: str) -> sa.Row[Any] | None:
        with self.engine.connect() as c:
            return c.execute(
                sa.select(nodes).where(nodes.c.cluster == cluster, nodes.c.name == name)
            ).first()

    def issue_tokens(self, cluster: str, names: Iterable[str], ttl: timedelta) -> dict[str, str]:
        tokens: dict[str, str] = {}
        expires = now() + ttl
        with self._writing(cluster) as c:
            for name in names:
                token = secrets.token_urlsafe(32)  # 43 characters, 256 bits
                result = c.execute(
                    nodes.update()
                    .where(nodes.c.cluster == cluster, nodes.c.name == name)
                    .values(token_hash=token_hash(token), token_expires=expires)
                )
                if result.rowcount != 1:
                    raise StoreError(404, f"no node {name!r} in cluster {cluster!r}")
                tokens[name] = token
        return tokens

    def check_token(self, cluster: str, name: str, token: str) -> Enrolment:
        """Checks without consuming; `enrol` consumes. Raises StoreError 401 with the real
        reason (logged by the service; the node gets one message for all)."""
        row = self.node(cluster, name)
        if row is None:
            raise StoreError(401, f"enrolment for unknown node {cluster}/{name}")
        if row.token_hash is None:
            raise StoreError(401, f"enrolment for {cluster}/{name}: no unused token (reused?)")
        if not hmac.compare_digest(row.token_hash, token_hash(token)):
            raise StoreError(401, f"enrolment for {cluster}/{name}: wrong token")
        expires = _utc(row.token_expires)
        if expires is None or expires <= now():
            raise StoreError(401, f"enrolment for {cluster}/{name}: token expired")
        if row.state not in ("provisioned", "enrolled") or row.stop:
            raise StoreError(409, f"{cluster}/{name} is not provisioned yet")
        return Enrolment(cluster, name, tuple(row.roles), row.address)

    def enrol(
        self,
        cluster: str,
        name: str,
        token: str,
        csr_digest: str,
        sign: Signer,
        *,
        peer: str | None = None,
    ) -> tuple[str, list[str]]:
        """Consume the token and record the certificate `sign` made; earlier certificates of
        the node are revoked. The same token with the same CSR again within ENROL_REPLAY (the
        answer to the first one was lost on the way) gets the same certificate instead of a
        refusal: nothing new is issued, and only the holder of the CSR's key can use it.
        `peer`, the address the enrolment came from, becomes the node's address if its pool
        gave it none. Returns (the certificate's PEM, the revoked serials).
        A replay is answered from a read, without waiting for the cluster's turn to write: when
        a burst of enrolments queues for that turn longer than the agents wait, their retries
        must not queue behind it too (10,000 nodes at once on PostgreSQL did, until the replay
        window closed on them)."""
        with self._glance() as c:
            again = self._enrolled_again(c, cluster, name, token, csr_digest)
        if again is not None:
            return again, []
        with self._writing(cluster) as c:
            again = self._enrolled_again(c, cluster, name, token, csr_digest)
            if again is not None:
                return again, []
            enrolment = self.check_token(cluster, name, token)
            if enrolment.address is None and peer is not None:  # its certificate names it too
                enrolment = replace(enrolment, address=peer)
            at = now()
            consumed = c.execute(
                nodes.update()
                .where(
                    nodes.c.cluster == cluster,
                    nodes.c.name == name,
                    nodes.c.token_hash == token_hash(token),
                )
                .values(
                    token_hash=None,
                    token_expires=None,
                    state="enrolled",
                    last_seen=at,
                    generation=nodes.c.generation + 1,
                    enrol_token=token_hash(token),
                    enrol_csr=csr_digest,
                    enrolled_at=at,
                    address=sa.func.coalesce(nodes.c.address, peer),
                )
            )
            if consumed.rowcount != 1:  # a concurrent enrolment won the race
                raise StoreError(401, f"enrolment for {cluster}/{name}: token already used")
            issued = sign(enrolment)
            revoked = self._revoke_node_certs(c, cluster, name)
            self._record(c, cluster, name, issued)
            self._event(c, cluster, name, None, "enrolled", state="enrolled")
            return issued.pem, revoked

    @staticmethod
    def _enrolled_again(
        c: Connection, cluster: str, name: str, token: str, csr_digest: str
    ) -> str | None:
        """The certificate of the enrolment that spent `token` with this very CSR, if that was
        within ENROL_REPLAY and the certificate still stands; else None."""
        row = c.execute(
            sa.select(
                nodes.c.token_hash, nodes.c.enrol_token, nodes.c.enrol_csr, nodes.c.enrolled_at
            ).where(nodes.c.cluster == cluster, nodes.c.name == name)
        ).first()
        if row is None or row.token_hash is not None or row.enrol_token is None:
            return None
        if not (
            hmac.compare_digest(row.enrol_token, token_hash(token))
            and hmac.compare_digest(row.enrol_csr or "", csr_digest)
        ):
            return None
        at = _utc(row.enrolled_at)
        if at is None or now() - at > ENROL_REPLAY:
            return None
        pem: str | None = c.execute(
            sa.select(certificates.c.pem)
            .where(
                certificates.c.cluster == cluster,
                certificates.c.node == name,
                certificates.c.revoked_at.is_(None),
                certificates.c.issued_at >= at,
            )
            .order_by(certificates.c.issued_at)
            .limit(1)
        ).scalar()
        return pem

    def renew(self, cluster: str, name: str, serial: str, sign: Signer) -> Issued:
        """A new certificate for a member whose current one (`serial`, checked by mutual TLS)
        still stands. The old one stays valid until the new one is first used (see
        `current_roles`), so an agent killed before it saved the answer still has a working
        certificate."""
        with self._writing(cluster) as c:
            enrolment = self._member(c, cluster, name, serial, "renewal")
            issued = sign(enrolment)
            self._record(c, cluster, name, issued)
            self._event(c, cluster, name, None, "renewed", output=issued.serial)
            return issued

    def rejoin(
        self,
        cluster: str,
        name: str,
        serial: str,
        sign: Signer,
        grace: timedelta = REJOIN_GRACE,
    ) -> Issued:
        """A new certificate for a member whose certificate `serial` ended while it was off
        (the caller has checked that the CA issued it and that the node holds its key): only
        if the node is still a member, that certificate was never revoked, and it ended less
        than `grace` ago. Raises StoreError 403 with the reason otherwise."""
        with self._writing(cluster) as c:
            enrolment = self._member(c, cluster, name, serial, "re-join")
            ended = c.execute(
                sa.select(certificates.c.not_after).where(certificates.c.serial == serial)
            ).scalar_one()
            ended = _utc(ended)
            if ended is not None and ended + grace < now():
                raise StoreError(
                    403,
                    f"re-join of {cluster}/{name} refused: certificate {serial} ended at "
                    f"{ended:%Y-%m-%d %H:%M} UTC, more than {grace.days} days ago",
                )
            issued = sign(enrolment)
            self._record(c, cluster, name, issued)
            c.execute(
                nodes.update()
                .where(nodes.c.cluster == cluster, nodes.c.name == name)
                .values(last_seen=now())
            )
            self._event(c, cluster, name, None, "rejoined", output=issued.serial)
            return issued

    def refused(self, cluster: str, name: str, message: str) -> None:
        """Record a member's refused re-join as an event of its cluster (the node has proved
        who it is, so this is no stranger's noise): status shows it, `crv repair` remakes it."""
        with self._writing(cluster) as c:
            known = c.execute(
                sa.select(nodes.c.name).where(nodes.c.cluster == cluster, nodes.c.name == name)
            ).first()
            if known is not None:
                self._event(c, cluster, name, None, "rejoin_refused", output=message[-OUTPUT_TAIL:])

    @staticmethod
    def _member(c: Connection, cluster: str, name: str, serial: str, what: str) -> Enrolment:
        row = c.execute(
            sa.select(nodes).where(nodes.c.cluster == cluster, nodes.c.name == name)
        ).first()
        if row is None or row.stop or row.state not in ("enrolled", LEAVING):
            state = "unknown" if row is None else ("stopping" if row.stop else row.state)
            raise StoreError(403, f"{what} of {cluster}/{name} refused: not a member ({state})")
        cert = c.execute(
            sa.select(certificates.c.revoked_at).where(
                certificates.c.serial == serial,
                certificates.c.cluster == cluster,
                certificates.c.node == name,
            )
        ).first()
        if cert is None:
            raise StoreError(
                403, f"{what} of {cluster}/{name} refused: certificate {serial} is not its"
            )
        if cert.revoked_at is not None:
            raise StoreError(
                403, f"{what} of {cluster}/{name} refused: certificate {serial} is revoked"
            )
        return Enrolment(cluster, name, tuple(row.roles), row.address)

    @staticmethod
    def _record(c: Connection, cluster: str, name: str, issued: Issued) -> None:
        c.execute(
            certificates.insert().values(
                serial=issued.serial,
                cluster=cluster,
                node=name,
                not_after=issued.not_after,
                issued_at=now(),
                pem=issued.pem,
            )
        )

    def _revoke_node_certs(self, c: Connection, cluster: str, name: str) -> list[str]:
        serials = list(
            c.execute(
                sa.select(certificates.c.serial).where(
                    certificates.c.cluster == cluster,
                    certificates.c.node == name,
                    certificates.c.revoked_at.is_(None),
                )
            ).scalars()
        )
        _revoke(c, serials)
        return serials

    def quarantine(self, cluster: str, name: str, reason: str) -> list[str]:
        """Shut a node out for good (FAULTS F5): its bootstrap token is spent, its certificates
        revoked (returned), what its roles published purged, and its state `quarantined`, which
        every node route refuses (not a member). Its machine stays for inspection until the
        next change of the cluster remakes it or a destroy removes it."""
        with self._writing(cluster) as c:
            found = c.execute(
                nodes.update()
                .where(nodes.c.cluster == cluster, nodes.c.name == name)
                .values(
                    state=NodeState.QUARANTINED.value,
                    token_hash=None,
                    token_expires=None,
                    enrol_token=None,
                    enrol_csr=None,
                    generation=nodes.c.generation + 1,
                )
            ).rowcount
            if found != 1:
                raise StoreError(404, f"no node {name!r} in cluster {cluster!r}")
            self._touched.pop((cluster, name), None)
            revoked = self._revoke_node_certs(c, cluster, name)
            c.execute(
                attributes.delete().where(
                    attributes.c.cluster == cluster, attributes.c.node == name
                )
            )
            self._event(
                c, cluster, name, None, "node", state=NodeState.QUARANTINED.value,
                output=reason[:2000],
            )  # fmt: skip
            return revoked

    def delete_node(self, cluster: str, name: str) -> list[str]:
        with self._writing(cluster) as c:
            return self._delete_node(c, cluster, name)

    def _delete_node(self, c: Connection, cluster: str, name: str) -> list[str]:
        self._touched.pop((cluster, name), None)
        revoked = self._revoke_node_certs(c, cluster, name)
        for table in (attributes, role_states):
            c.execute(table.delete().where(table.c.cluster == cluster, table.c.node == name))
        deleted = c.execute(
            nodes.delete().where(nodes.c.cluster == cluster, nodes.c.name == name)
        ).rowcount
        at = time.time()  # its usage ends (a released bare-metal machine's included)
        c.execute(
            node_usage.update()
            .where(
                node_usage.c.cluster == cluster,
                node_usage.c.node == name,
                node_usage.c.ended.is_(None),
            )
            .values(ended=at)
        )
        c.execute(  # the ledger is kept USAGE_KEPT after a row's end
            node_usage.delete().where(
                node_usage.c.cluster == cluster, node_usage.c.ended < at - USAGE_KEPT
            )
        )
        if deleted or revoked:
            self._event(c, cluster, name, None, "revoked", state="deleted")
        return revoked

    def touch(self, cluster: str, name: str, *, every: float = TOUCH_EVERY) -> None:
        """Record that the node called; written at most every `every` seconds per node
        (`last_seen` is a heartbeat, not a log: a busy agent must not cost a write a call)."""
        at = time.monotonic()
        if at - self._touched.get((cluster, name), -every) < every:
            return
        self._touched[(cluster, name)] = at
        with self._glance() as c:  # one row, blindly: no turn to wait for
            c.execute(
                nodes.update()
                .where(nodes.c.cluster == cluster, nodes.c.name == name)
                .values(last_seen=now())
            )
            c.commit()

    def touch_due(self, cluster: str, name: str, every: float = TOUCH_EVERY) -> bool:
        """Whether `touch` would write now (no store call: this process's own record)."""
        return time.monotonic() - self._touched.get((cluster, name), -every) >= every

    @staticmethod
    def _work_rows(c: Connection, cluster: str, name: str) -> tuple[Any, Any, dict[str, Any]]:
        """A node's row, its cluster's roles and bundle, and its role states. A node or a
        cluster not there (a destroy between two statements included) is refused alike."""
        node = c.execute(
            sa.select(nodes).where(nodes.c.cluster == cluster, nodes.c.name == name)
        ).first()
        cl = None
        if node is not None:
            cl = c.execute(
                sa.select(clusters.c.roles, clusters.c.bundle_digest).where(
                    clusters.c.name == cluster
                )
            ).first()
        if node is None or cl is None:
            raise StoreError(403, f"node {cluster}/{name} is not part of a cluster")
        states = {
            r.role: r
            for r in c.execute(
                sa.select(role_states).where(
                    role_states.c.cluster == cluster, role_states.c.node == name
                )
            )
        }
        return node, cl, states

    def touch_and_work(self, cluster: str, name: str) -> dict[str, Any]:
        """`touch`, then `work`: an agent's poll in one trip to a store thread."""
        self.touch(cluster, name)
        return self.work(cluster, name)

    # -- pairing ----------------------------------------------------------------------------

    def create_pairing(
        self, cluster: str, group: str, roles: Sequence[str], ttl: timedelta = PAIR_TTL
    ) -> dict[str, Any]:
        """A one-time PIN for a machine to join `group` (whose nodes hold `roles`) of `cluster`:
        {id, pin, expires_at}. The PIN itself is shown once and kept only as a hash."""
        at = now()
        pin, ident = new_pin(), secrets.token_hex(8)
        with self._writing(None) as c:  # the pairings' lock, then (as pair does) the cluster's
            self._lock(c, cluster)
            if (
                c.execute(sa.select(clusters.c.name).where(clusters.c.name == cluster)).first()
                is None
            ):
                raise StoreError(404, f"no cluster {cluster!r}")
            c.execute(
                pairings.insert().values(
                    id=ident, pin_hash=pin_hash(pin), cluster=cluster, grp=group,
                    roles=list(roles), created_at=at, expires_at=at + ttl, failures=0,
                )
            )  # fmt: skip
        return {"id": ident, "pin": pin, "expires_at": (at + ttl).isoformat()}

    def pairing(self, ident: str) -> dict[str, Any]:
        """A pairing's state: open, paired (with its node), expired or locked."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(pairings).where(pairings.c.id == ident)).first()
        if row is None:
            raise StoreError(404, f"no pairing {ident!r}")
        return {
            "id": row.id,
            "cluster": row.cluster,
            "group": row.grp,
            "state": _pairing_state(row, now()),
            "node": row.node,
            "failures": row.failures,
            "expires_at": (_utc(row.expires_at) or now()).isoformat(),
        }

    def pair(
        self, pin: str, csr_digest: str, address: str | None, sign: Signer
    ) -> tuple[str, str, str, list[str]]:
        """Use a PIN: the machine becomes the next node of the pairing's group (state enrolled,
        pool `manual`, its group's count one more) and gets its certificate. The same PIN with
        the same CSR again within ENROL_REPLAY gets the same certificate; anything else with a
        used, expired or locked-out PIN is refused (403, the reason for the service log), and a
        PIN that matches no pairing counts as a wrong try against every open one.
        Returns (cluster, node, the certificate's PEM, revoked serials)."""
        at = now()
        refusal: StoreError | None = None
        node: str | None = None
        with self._writing(None) as c:
            row = c.execute(sa.select(pairings).where(pairings.c.pin_hash == pin_hash(pin))).first()
            state = "wrong" if row is None else _pairing_state(row, at)
            if state == "wrong":
                c.execute(
                    pairings.update()
                    .where(pairings.c.used_at.is_(None), pairings.c.expires_at > at)
                    .values(failures=pairings.c.failures + 1)
                )
                refusal = WrongPin()
            elif row is not None and state == "paired":
                same = hmac.compare_digest(row.csr or "", csr_digest)
                if not (same and at - (_utc(row.used_at) or at) <= ENROL_REPLAY):
                    refusal = StoreError(
                        403, f"pairing refused: PIN already used (by {row.cluster}/{row.node})"
                    )
            elif state == "locked":
                refusal = StoreError(
                    403, f"pairing refused: PIN locked out after {PAIR_TRIES} wrong PINs"
                )
            elif state == "expired":
                refusal = StoreError(403, "pairing refused: PIN expired")
            else:
                assert row is not None
                self._lock(c, row.cluster)  # it adds a node: the cluster's writers wait
                node = self._claim(c, row, pairing_token(pin), csr_digest, address, at)
        if refusal is not None:  # after the commit: the wrong try is counted
            raise refusal
        assert row is not None
        node = node or row.node
        pem, revoked = self.enrol(row.cluster, node, pairing_token(pin), csr_digest, sign)
        return row.cluster, node, pem, revoked

    def _claim(
        self,
        c: Connection,
        row: sa.Row[Any],
        token: str,
        csr_digest: str,
        address: str | None,
        at: datetime,
    ) -> str:
        """Mark the pairing used and record its node: the next free index of the group, its
        roles pending, an enrolment token derived from the PIN; the group's count grows."""
        cluster, group = row.cluster, row.grp
        names = set(c.execute(sa.select(nodes.c.name).where(nodes.c.cluster == cluster)).scalars())
        prefix, index = f"{cluster}-{group}-", 0
        while f"{prefix}{index}" in names:
            index += 1
        node = f"{prefix}{index}"
        if len(node) > 63:
            raise StoreError(409, f"pairing refused: node name {node!r} is too long")
        used = c.execute(
            pairings.update()
            .where(pairings.c.id == row.id, pairings.c.used_at.is_(None))
            .values(used_at=at, node=node, csr=csr_digest)
        )
        if used.rowcount != 1:
            raise StoreError(403, "pairing refused: PIN already used")
        c.execute(
            nodes.insert().values(
                cluster=cluster, name=node, grp=group, roles=list(row.roles), pool=MANUAL_POOL,
                address=address, state="provisioned", generation=1, stop=False,
                token_hash=token_hash(token),
                token_expires=at + ENROL_REPLAY,
            )
        )  # fmt: skip
        c.execute(node_usage.insert().values(_usage_row(cluster, node, group, MANUAL_POOL, at)))
        if row.roles:
            c.execute(
                role_states.insert(),
                [
                    {"cluster": cluster, "node": node, "role": role, "state": "pending",
                     "release": 0, "output": "", "updated_at": at}
                    for role in row.roles
                ],
            )  # fmt: skip
        members = c.execute(
            sa.select(sa.func.count()).where(
                nodes.c.cluster == cluster, nodes.c.grp == group, nodes.c.state != LEAVING
            )
        ).scalar_one()
        counts = c.execute(sa.select(clusters.c.counts).where(clusters.c.name == cluster)).scalar()
        c.execute(
            clusters.update()
            .where(clusters.c.name == cluster)
            .values(counts={**(counts or {}), group: int(members)})
        )
        self._event(c, cluster, node, None, "node", state="provisioned", output="paired")
        return node

    # -- certificates -----------------------------------------------------------------------

    def current_roles(
        self, serial: str, cluster: str, node: str
    ) -> tuple[tuple[str, ...] | None, list[str]]:
        """(the node's roles if this certificate is current, else None; the serials it
        supersedes). Current: recorded for the node, not revoked, node still known. The first
        use of a renewed certificate revokes the node's older ones ("superseded"): until then
        they stay valid, so an agent that lost the renewal's answer is not locked out."""
        with self._glance() as c:
            rows = c.execute(
                sa.select(nodes.c.roles, certificates.c.serial, certificates.c.issued_at)
                .join(
                    certificates,
                    (certificates.c.cluster == nodes.c.cluster)
                    & (certificates.c.node == nodes.c.name),
                )
                .where(
                    certificates.c.cluster == cluster,
                    certificates.c.node == node,
                    certificates.c.revoked_at.is_(None),
                    nodes.c.state
                    != NodeState.QUARANTINED.value,  # its certificates are revoked too
                )
            ).all()
        mine = next((r for r in rows if r.serial == serial), None)
        if mine is None:
            return None, []
        issued = _utc(mine.issued_at) or now()
        older = [
            r.serial for r in rows if r.serial != serial and (_utc(r.issued_at) or issued) <= issued
        ]
        if older:
            with self._writing(cluster) as c:
                _revoke(c, older, "superseded")
        return tuple(mine.roles), older

    def liveness(self, cluster: str) -> dict[str, dict[str, str | None]]:
        """Per node: when its agent last called, and when its newest standing certificate
        ends (what a change waiting on the node reads when the node goes quiet)."""
        with self.engine.connect() as c:
            seen = c.execute(
                sa.select(nodes.c.name, nodes.c.last_seen).where(nodes.c.cluster == cluster)
            ).all()
            ends = dict(
                c.execute(
                    sa.select(certificates.c.node, sa.func.max(certificates.c.not_after))
                    .where(certificates.c.cluster == cluster, certificates.c.revoked_at.is_(None))
                    .group_by(certificates.c.node)
                )
                .tuples()
                .all()
            )
        out: dict[str, dict[str, str | None]] = {}
        for name, last_seen in seen:
            at, end = _utc(last_seen), _utc(ends.get(name))
            out[name] = {
                "last_seen": at.isoformat() if at else None,
                "certificate_ends": end.isoformat() if end else None,
            }
        return out

    def revoked(self, cluster: str | None = None) -> list[tuple[int, datetime]]:
        """(serial, when) of the revoked node certificates, of one cluster or all."""
        query = sa.select(certificates.c.serial, certificates.c.revoked_at).where(
            certificates.c.revoked_at.is_not(None)
        )
        if cluster is not None:
            query = query.where(certificates.c.cluster == cluster)
        with self.engine.connect() as c:
            rows = c.execute(query).all()
        return [(int(r.serial, 16), _utc(r.revoked_at) or now()) for r in rows]

    # -- roles ------------------------------------------------------------------------------

    def work(self, cluster: str, name: str) -> dict[str, Any]:
        with self._glance() as c:
            node, cl, states = self._work_rows(c, cluster, name)
        if any(role not in cl.roles for role in node.roles):
            # on PostgreSQL each of the glance's statements saw its own moment: a change of the
            # cluster came between them. Read again, in one snapshot.
            with self.engine.connect() as c:
                node, cl, states = self._work_rows(c, cluster, name)
        roles = []
        for role in node.roles:
            spec, st = cl.roles[role], states.get(role)
            draining = st is not None and st.state in DRAIN_STATES and spec.get("drain")
            roles.append(
                {
                    "role": role,
                    "release": st.release if st else 0,
                    "state": st.state if st else "pending",
                    # a drain is a release like any other whose recipe is the drain recipe
                    "recipe": spec["drain"] if draining else spec["recipe"],
                    "appdir": spec["appdir"],
                    "env": {**spec["env"], "CRV_ACTION": "drain"} if draining else spec["env"],
                    # what the agent does once it renewed the node's certificate
                    "renew": spec.get("renew"),
                    # a verify for the agent to run and report, while it is not reported
                    "check": (
                        {"id": st.check_id, "command": st.check_command}
                        if st is not None and st.check_id and st.check_exit is None
                        else None
                    ),
                }
            )
        return {
            "generation": node.generation,
            "cluster": cluster,
            "node": name,
            "group": node.grp,
            "address": node.address,
            "stop": node.stop,
            "bundle": cl.bundle_digest,
            "roles": roles,
        }

    def generation(self, cluster: str, name: str) -> int | None:
        with self._glance() as c:
            gen: int | None = c.execute(
                sa.select(nodes.c.generation).where(
                    nodes.c.cluster == cluster, nodes.c.name == name
                )
            ).scalar()
            return gen

    def update_roles(
        self, cluster: str, updates: Sequence[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], set[str]]:
        """Apply release/verified/verify_failed in order, all or nothing. A release waits for
        the role's dependencies to be verified (the DAG's edges, checked again here so that no
        caller can contextualize a role early). Returns results and the nodes to wake."""
        with self._writing(cluster) as c:
            cl = c.execute(sa.select(clusters.c.roles).where(clusters.c.name == cluster)).first()
            if cl is None:
                raise StoreError(404, f"no cluster {cluster!r}")
            woken: set[str] = set()
            results = [self._update_role(c, cluster, cl.roles, u, woken) for u in updates]
            return results, woken

    def _update_role(
        self, c: Connection, cluster: str, roles: Mapping[str, Any], u: Mapping[str, Any],
        woken: set[str],
    ) -> dict[str, Any]:  # fmt: skip
        """One update of update_roles: its result; the nodes it gives new work join `woken`."""
        node, role, op = u["node"], u["role"], u["op"]
        row = c.execute(sa.select(role_states).where(*_role_key(cluster, node, role))).first()
        if row is None:
            raise StoreError(404, f"no role {role!r} on node {node!r}")
        release, message = row.release, u.get("message") or ""
        extra: dict[str, Any] = {}
        if op in ("release", "refresh"):
            depends_on = roles[role]["depends_on"]
            inputs = self._inputs(c, cluster, node, depends_on, roles)
            if (
                op == "refresh"
                and row.state in ("done", "verified", "verify_failed")
                and row.inputs == inputs
            ):  # converged, and what it read has not changed: leave it alone
                return _as_is(row)
            self._check_dependencies(c, cluster, node, depends_on)
            release, state = row.release + 1, "released"
            extra = {"exit_code": None, "inputs": inputs}
            woken.add(_new_work(c, cluster, node))
        elif op == "drain":
            if not roles[role].get("drain"):
                raise StoreError(409, f"role {role!r} has no drain recipe")
            if row.state in ("draining", "drained"):  # asked again (a resumed shrink)
                return _as_is(row)
            release, state = row.release + 1, "draining"
            extra = {"exit_code": None}
            woken.add(_new_work(c, cluster, node))
        elif op == "check":  # a verify the agent runs: asked here, reported by it
            check = (row.check_id or 0) + 1
            c.execute(
                role_states.update()
                .where(*_role_key(cluster, node, role))
                .values(
                    check_id=check, check_command=message, check_exit=None,
                    check_output=None,
                )
            )  # fmt: skip
            woken.add(_new_work(c, cluster, node))
            return {**_as_is(row), "check": check}
        elif op == "verified":
            state = "verified"
        elif op == "verify_failed":
            state = "verify_failed"
        else:
            raise StoreError(400, f"unknown op {op!r}")
        c.execute(
            role_states.update()
            .where(*_role_key(cluster, node, role))
            .values(
                state=state,
                release=release,
                updated_at=now(),
                **({"output": message[-OUTPUT_TAIL:]} if message else {}),
                **extra,
            )
        )
        if state in ("verified", "verify_failed"):
            self._event(c, cluster, node, role, "verified", state=state, output=message)
        return (
            {"node": node, "role": role, "release": release, "state": state,
             "released": state in ("released", "draining")}
        )  # fmt: skip

    def _inputs(
        self,
        c: Connection,
        cluster: str,
        node: str,
        depends_on: Sequence[Mapping[str, Any]],
        roles: Mapping[str, Mapping[str, Any]],
    ) -> str:
        """Digest of what a role on `node` can read: for each dependency, the nodes that feed
        it (not leaving) and the attributes they published, except the dependency's `metrics`
        (measurements such as an autoscaling metric or `busy`, which change all the time)."""
        if not depends_on:
            return hashlib.sha256(b"[]").hexdigest()
        view = []
        for dep in depends_on:
            a = attributes.c
            q = _feeding(attributes, cluster, dep["role"], a.node, a.key, a.value)
            hosts = _feeding(role_states, cluster, dep["role"], role_states.c.node)
            if dep["local"]:
                q = q.where(attributes.c.node == node)
                hosts = hosts.where(role_states.c.node == node)
            measured = set(roles.get(dep["role"], {}).get("metrics") or ())
            view.append(
                [
                    dep["role"],
                    sorted(r.node for r in c.execute(hosts)),  # a role may publish nothing
                    sorted((r.node, r.key, r.value) for r in c.execute(q) if r.key not in measured),
                ]
            )
        return hashlib.sha256(json.dumps(view).encode()).hexdigest()

    def _check_dependencies(
        self, c: Connection, cluster: str, node: str, depends_on: Sequence[Mapping[str, Any]]
    ) -> None:
        for dep in depends_on:
            q = _feeding(role_states, cluster, dep["role"], role_states.c.node, role_states.c.state)
            if dep["local"]:
                q = q.where(role_states.c.node == node)
            rows = c.execute(q).all()
            verified = sum(1 for r in rows if r.state == "verified")
            needed = min(dep["min_ready"] or len(rows), len(rows)) if rows else 1
            if verified < needed:
                raise StoreError(
                    409,
                    f"{node}: dependency {dep['role']} is verified on {verified} of the "
                    f"{needed} nodes it needs",
                )

    def report_status(
        self,
        cluster: str,
        node: str,
        role: str,
        *,
        release: int,
        state: str,
        exit_code: int | None,
        output: str,
    ) -> None:
        with self._writing(cluster) as c:
            row = c.execute(
                sa.select(role_states.c.release, role_states.c.state).where(
                    *_role_key(cluster, node, role)
                )
            ).first()
            if row is None:
                raise StoreError(403, f"{node} does not host role {role!r}")
            if row.release != release or release == 0:
                raise StoreError(409, f"{node}/{role}: release {release} is not current")
            if row.state in DRAIN_STATES:  # the agent ran this release's drain recipe
                state = {"running": "draining", "done": "drained"}.get(state, "drain_failed")
            tail = output[-OUTPUT_TAIL:]
            c.execute(
                role_states.update()
                .where(*_role_key(cluster, node, role))
                .values(state=state, exit_code=exit_code, output=tail, updated_at=now())
            )
            attrs: dict[str, str] | None = None
            if state == "done":
                attrs = dict(
                    c.execute(
                        sa.select(attributes.c.key, attributes.c.value).where(
                            attributes.c.cluster == cluster,
                            attributes.c.node == node,
                            attributes.c.role == role,
                        )
                    )
                    .tuples()
                    .all()
                )
            self._event(
                c,
                cluster,
                node,
                role,
                "role",
                state=state,
                release=release,
                exit_code=exit_code,
                output=tail if state != "running" else None,
                attributes=attrs,
            )

    def report_check(
        self, cluster: str, node: str, role: str, *, check: int, exit_code: int, output: str
    ) -> None:
        """The result of the verify the node's agent ran (`update_roles` op check): only the
        newest one asked, and only once."""
        tail = output[-OUTPUT_TAIL:]
        with self._writing(cluster) as c:
            done = c.execute(
                role_states.update()
                .where(
                    *_role_key(cluster, node, role),
                    role_states.c.check_id == check,
                    role_states.c.check_exit.is_(None),
                )
                .values(check_exit=exit_code, check_output=tail)
            )
            if done.rowcount != 1:
                raise StoreError(409, f"{node}/{role}: check {check} is not awaited")
            self._event(
                c, cluster, node, role, "check", state="checked", release=check,
                exit_code=exit_code, output=tail,
            )  # fmt: skip

    # -- attributes -------------------------------------------------------------------------

    def set_attribute(self, cluster: str, node: str, role: str, key: str, value: str) -> None:
        with self._writing(cluster) as c:
            where = (
                attributes.c.cluster == cluster,
                attributes.c.node == node,
                attributes.c.role == role,
            )
            exists = c.execute(
                sa.select(attributes.c.value).where(*where, attributes.c.key == key)
            ).first()
            now = time.time()
            if exists is not None:  # the same value again still says it is current (a metric)
                c.execute(
                    attributes.update()
                    .where(*where, attributes.c.key == key)
                    .values(value=value, updated=now)
                )
                return
            count = c.execute(
                sa.select(sa.func.count()).select_from(attributes).where(*where)
            ).scalar_one()
            if count >= MAX_KEYS_PER_ROLE:
                raise StoreError(413, f"{node}/{role} already has {count} attributes")
            c.execute(
                attributes.insert().values(
                    cluster=cluster, node=node, role=role, key=key, value=value, updated=now
                )
            )

    def attribute_readings(
        self, cluster: str, role: str, key: str
    ) -> list[tuple[str, str, float | None]]:
        """(node, value, seconds since it was last set) over the nodes that host `role` and
        are not leaving: what an autoscaling metric is made of."""
        a = attributes.c
        with self.engine.connect() as c:
            rows = c.execute(
                _feeding(attributes, cluster, role, a.node, a.value, a.updated).where(a.key == key)
            ).all()
        now = time.time()
        found = [
            (r.node, r.value, None if r.updated is None else max(0.0, now - r.updated))
            for r in rows
        ]
        return sorted(found, key=lambda item: natural_key(item[0]))

    def get_attribute(self, cluster: str, role: str, key: str) -> list[tuple[str, str]]:
        with self.engine.connect() as c:
            rows = c.execute(
                _feeding(attributes, cluster, role, attributes.c.node, attributes.c.value).where(
                    attributes.c.key == key
                )
            ).all()
        return sorted(((r.node, r.value) for r in rows), key=lambda nv: natural_key(nv[0]))

    # -- autoscaling ------------------------------------------------------------------------

    def put_autoscaling(self, cluster: str, enabled: bool, every: float) -> dict[str, Any]:
        self.require_cluster(cluster)
        row = {"enabled": enabled, "every": every, "updated_at": now()}
        with self._writing(cluster) as c:
            done = c.execute(
                autoscaling.update().where(autoscaling.c.cluster == cluster).values(**row)
            )
            if not done.rowcount:
                c.execute(autoscaling.insert().values(cluster=cluster, **row))
        return {"cluster": cluster, "enabled": enabled, "every": every}

    def autoscaling(self, cluster: str | None = None) -> list[dict[str, Any]]:
        """Autoscaling settings (of one cluster, or all), clusters by name."""
        query = sa.select(autoscaling).order_by(autoscaling.c.cluster)
        if cluster is not None:
            query = query.where(autoscaling.c.cluster == cluster)
        with self.engine.connect() as c:
            rows = c.execute(query).all()
        return [{"cluster": r.cluster, "enabled": r.enabled, "every": r.every} for r in rows]

    def guards(self, cluster: str) -> dict[str, Any]:
        """The cluster's guards and what the autoscale flow keeps for them (crv.engine.guards):
        every key None (notices: {}) when none was ever set."""
        query = sa.select(autoscaling).where(autoscaling.c.cluster == cluster)
        with self.engine.connect() as c:
            r = c.execute(query).first()
        found = {k: None if r is None else getattr(r, k) for k in _GUARD_COLUMNS}
        return {
            "cluster": cluster,
            **found,
            "notices": (r.notices if r is not None else None) or {},
        }

    def put_guards(self, cluster: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change the guard settings named in `changes` (GUARD_SETTINGS; None or 0: clear it,
        the others are kept). A lease given starts again now (it runs from when it was set), and
        idle_after given counts from now at most; their announcements that are out are
        withdrawn by the next run (their occurrence changed). A cluster without an autoscaling
        setting gets one, disabled."""
        self.require_cluster(cluster)
        at = time.time()
        values: dict[str, Any] = {}
        for key in GUARD_SETTINGS:
            if key in changes:
                value = changes[key]
                values[key] = None if value in (None, 0) and key != "warn_before" else value
        if "lease" in values:
            values["lease_from"] = at if values["lease"] is not None else None
        if "idle_after" in values:
            values["idle_from"] = at if values["idle_after"] is not None else None
        with self._writing(cluster) as c:
            done = c.execute(
                autoscaling.update().where(autoscaling.c.cluster == cluster).values(**values)
            )
            if not done.rowcount:
                c.execute(
                    autoscaling.insert().values(
                        cluster=cluster, enabled=False, every=60.0, updated_at=now(), **values
                    )
                )
        return self.guards(cluster)

    def put_guard_state(
        self, cluster: str, work_seen: float | None, notices: Mapping[str, Any]
    ) -> None:
        """What the autoscale flow keeps between runs for the guards (no setting: nothing)."""
        with self._writing(cluster) as c:
            c.execute(
                autoscaling.update()
                .where(autoscaling.c.cluster == cluster)
                .values(work_seen=work_seen, notices=dict(notices))
            )

    def usage(self, cluster: str, since: float, until: float) -> list[dict[str, Any]]:
        """The ledger's rows of `cluster` that overlap [since, until], oldest first; the cluster
        may be gone (the ledger outlives it)."""
        query = (
            sa.select(node_usage)
            .where(
                node_usage.c.cluster == cluster,
                node_usage.c.started <= until,
                sa.or_(node_usage.c.ended.is_(None), node_usage.c.ended >= since),
            )
            .order_by(node_usage.c.id)
        )
        with self.engine.connect() as c:
            rows = c.execute(query).all()
        return [
            {"node": r.node, "group": r.grp, "pool": r.pool, "started": r.started,
             "ended": r.ended}
            for r in rows
        ]  # fmt: skip

    def add_decision(self, cluster: str, row: Mapping[str, Any]) -> int:
        self.require_cluster(cluster)
        values = {k: row.get(k) for k in _DECISION_FIELDS if k != "group"}
        with self._writing(cluster) as c:
            done = c.execute(decisions.insert().values(cluster=cluster, grp=row["group"], **values))
            key = done.inserted_primary_key
            assert key is not None
            seq = int(key[0])
            oldest_kept = (
                sa.select(decisions.c.seq)
                .where(decisions.c.cluster == cluster)
                .order_by(decisions.c.seq.desc())
                .offset(DECISIONS_KEPT - 1)
                .limit(1)
                .scalar_subquery()
            )  # the seq counter is shared by every cluster: count this cluster's own rows
            c.execute(
                decisions.delete().where(
                    decisions.c.cluster == cluster, decisions.c.seq < oldest_kept
                )
            )
        return seq

    def set_outcome(self, cluster: str, seq: int, outcome: str) -> None:
        with self._writing(cluster) as c:
            done = c.execute(
                decisions.update()
                .where(decisions.c.cluster == cluster, decisions.c.seq == seq)
                .values(outcome=outcome)
            )
        if not done.rowcount:
            raise StoreError(404, f"no decision {seq} of cluster {cluster!r}")

    def decisions(
        self, cluster: str, group: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest decisions first."""
        query = sa.select(decisions).where(decisions.c.cluster == cluster)
        if group is not None:
            query = query.where(decisions.c.grp == group)
        with self.engine.connect() as c:
            rows = c.execute(query.order_by(decisions.c.seq.desc()).limit(limit)).all()
        return [
            {"seq": r.seq, "group": r.grp, **{k: getattr(r, k) for k in _DECISION_FIELDS[1:]}}
            for r in rows
        ]

    # -- status and events ------------------------------------------------------------------

    def status(self, cluster: str) -> ClusterStatus:
        with self.engine.connect() as c:
            cl = c.execute(sa.select(clusters).where(clusters.c.name == cluster)).first()
            if cl is None:
                raise StoreError(404, f"no cluster {cluster!r}")
            node_rows = c.execute(sa.select(nodes).where(nodes.c.cluster == cluster)).all()
            roles: dict[str, dict[str, RoleStatus]] = {}
            for r in c.execute(sa.select(role_states).where(role_states.c.cluster == cluster)):
                roles.setdefault(r.node, {})[r.role] = {
                    "state": r.state,
                    "release": r.release,
                    "exit_code": r.exit_code,
                    "output": r.output,
                    "attributes": {},
                }
            for a in c.execute(sa.select(attributes).where(attributes.c.cluster == cluster)):
                slot = roles.get(a.node, {}).get(a.role)
                if slot is not None:
                    slot["attributes"][a.key] = a.value
            counts = self._role_counts(c, cluster)
        out_nodes: list[NodeStatus] = []
        for n in sorted(node_rows, key=lambda r: natural_key(r.name)):
            seen = _utc(n.last_seen)
            out_nodes.append(
                {
                    "name": n.name,
                    "group": n.grp,
                    "pool": n.pool,
                    "address": n.address,
                    "state": n.state,
                    "last_seen": seen.isoformat() if seen else None,
                    "roles": {
                        r: roles.get(n.name, {}).get(r, RoleStatus(state="pending"))
                        for r in n.roles
                    },
                    "timings": {
                        phase: datetime.fromtimestamp(t, timezone.utc).isoformat()
                        for phase, t in sorted((n.timings or {}).items(), key=lambda p: p[1])
                    },
                }
            )
        return {
            "name": cl.name,
            "appliance": cl.appliance,
            "source": cl.source,
            "pool": cl.pool,
            "parameters": cl.parameters,
            "counts": cl.counts or {},
            "pools": cl.pools or {},
            "ready": counts["ready"],
            "nodes": out_nodes,
        }

    def events_after(self, cluster: str, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(events)
                .where(events.c.cluster == cluster, events.c.seq > after)
                .order_by(events.c.seq)
                .limit(limit)
            ).all()
        return [
            {
                "seq": r.seq,
                "at": (_utc(r.at) or now()).isoformat(),
                "node": r.node,
                "role": r.role,
                "kind": r.kind,
                "state": r.state,
                "release": r.release,
                "exit_code": r.exit_code,
                "output": r.output,
                "attributes": r.attributes,
            }
            for r in rows
        ]

    def last_event(self, cluster: str) -> int:
        with self.engine.connect() as c:
            return int(
                c.execute(
                    sa.select(sa.func.coalesce(sa.func.max(events.c.seq), 0)).where(
                        events.c.cluster == cluster
                    )
                ).scalar_one()
            )

    def _event(
        self,
        c: Connection,
        cluster: str,
        node: str | None,
        role: str | None,
        kind: str,
        **fields: Any,
    ) -> None:
        c.execute(
            events.insert().values(
                at=now(), cluster=cluster, node=node, role=role, kind=kind, **fields
            )
        )


RETRIES = 20  # serialization failures in a row before the error reaches the caller
_RETRY_STATES = ("40001", "40P01")  # PostgreSQL: serialization_failure, deadlock_detected


def _retried(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Store, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(RETRIES):
            try:
                return method(self, *args, **kwargs)
            except sa.exc.DBAPIError as e:
                # a connection PostgreSQL dropped (its restart) is replaced by the pool: again
                again = (
                    e.connection_invalidated or getattr(e.orig, "sqlstate", None) in _RETRY_STATES
                )
                if not again or attempt + 1 == RETRIES:
                    raise
                time.sleep(0.001 * (attempt + 1) * (1 + secrets.randbelow(8)))
        raise AssertionError("unreachable")

    return call


for _name, _method in list(vars(Store).items()):  # every public method: one retried transaction
    if not _name.startswith("_") and callable(_method):
        setattr(Store, _name, _retried(_method))
