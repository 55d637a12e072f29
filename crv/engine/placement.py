"""Where a cluster's nodes live: the pool of each node group, and what the pools hold for the
cluster compared with crv's records (drift).

A group's pool is, first to last: `--pool-for GROUP=POOL` (the flow's `pools` parameter), the
group's `pool:` (or `pools:`) in the appliance, the deploy's `--pool`. The choice is recorded
with the cluster, so a resize puts new nodes where the group's nodes go. A node stays in the pool
it was made in: its record names that pool, and every later step, drift check and teardown asks
that pool about it, whatever the group's pool is now.

A group with `pools: [a, b, c]` has an order of preference: each new node goes to the first of
them with capacity left (`capacities`, the pools' optional `capacity()`), and a shrink releases
from the last one first (`release_order`). The cluster record keeps only the first pool; the
list comes back from the recorded appliance (`recorded`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from crv.appliance.loader import Appliance
from crv.base.errors import CrvError, SpecError
from crv.base.home import Home
from crv.service.models import ClusterStatus
from crv.service.store import natural_key
from pools import get_pool
from pools.base import Pool

log = logging.getLogger(__name__)

ALIVE = ("running", "pending")  # what a pool says of a node that is there and not stopped
SETTLED = ("provisioned", "enrolled", "leaving")  # recorded states that mean "the pool has it"


class NoCapacity(CrvError):
    """No pool of a group's preference list has room for its new nodes (nothing was made)."""


@dataclass(frozen=True)
class Placement:
    default: str  # the deploy's --pool
    groups: Mapping[str, str]  # node group -> pool, where it is not `default`
    # node group -> its pools in order of preference (an appliance's `pools:`); the first is
    # the group's pool (`of`)
    orders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def of(self, group: str) -> str:
        order = self.orders.get(group)
        return order[0] if order else self.groups.get(group, self.default)

    def order(self, group: str) -> tuple[str, ...]:
        """The group's pools in order of preference; a group without a list has its one pool."""
        return self.orders.get(group) or (self.of(group),)

    def names(self) -> list[str]:
        listed = {p for order in self.orders.values() for p in order}
        return sorted({self.default, *self.groups.values(), *listed})


def place(appliance: Appliance, default: str, overrides: Mapping[str, str] | None) -> Placement:
    """The pool of each node group (module doc); an override for an unknown group is refused.
    An override replaces the group's list of pools with its one pool."""
    overrides = dict(overrides or {})
    for group in overrides:
        if group not in appliance.groups:
            known = ", ".join(appliance.groups)
            raise SpecError("--pool-for", group, f"unknown node group; the groups are {known}")
    chosen = {g.name: overrides.get(g.name) or g.pool or default for g in appliance.groups.values()}
    orders = {
        g.name: g.pools for g in appliance.groups.values() if g.pools and g.name not in overrides
    }
    return Placement(default, {g: p for g, p in chosen.items() if p != default}, orders)


def recorded(status: ClusterStatus, appliance: Appliance | None = None) -> Placement:
    """The placement recorded with a cluster (a resize places new nodes by it). The record has
    each group's first pool only: a group's `pools:` list in `appliance` (the recorded one) is
    its order again when its first pool is the recorded one (not when --pool-for replaced it)."""
    default = status["pool"]
    groups = dict(status.get("pools") or {})
    orders = {}
    for g in appliance.groups.values() if appliance else ():
        if g.pools and g.pools[0] == groups.get(g.name, default):
            orders[g.name] = g.pools
    return Placement(default, groups, orders)


def capacities(
    drivers: Callable[[str], Pool], names: Iterable[str], group: str | None = None
) -> dict[str, int | None]:
    """How many more nodes each pool can make now (for `group`: a bare-metal pool counts only
    the machines of its class), each asked once: None for no known limit (a pool without the
    optional `capacity()`), 0 for a pool that could not say (logged)."""
    out: dict[str, int | None] = {}
    for name in names:
        if name in out:
            continue
        try:
            capacity = getattr(drivers(name), "capacity", None)
            out[name] = None if capacity is None else capacity(group)
        except CrvError as exc:
            log.warning("pool %s: capacity unknown, counted as none: %s", name, exc)
            out[name] = 0
    return out


def release_order(
    placement: Placement,
    group: str,
    nodes: Iterable[Mapping[str, Any]],
    busy: Mapping[str, float] | None = None,
) -> list[str]:
    """The names of a group's nodes (records with at least name and pool) in the order a shrink
    should release them: nodes in a pool not in the group's order first, then the order's pools
    from the last (the cloud) to the first (power-saved bare metal); within a pool idle-first
    when `busy` is given (a node's published `busy` value, lowest first; a node without one
    counts as busy), then newest first."""
    order = placement.order(group)
    busy = busy or {}

    def rank(node: Mapping[str, Any]) -> tuple[int, float, tuple[Any, ...]]:
        pool = node["pool"]
        newest = tuple(-p if isinstance(p, int) else p for p in natural_key(node["name"]))
        where = -1 - order.index(pool) if pool in order else -1 - len(order)
        return (where, busy.get(node["name"], math.inf), newest)

    return [n["name"] for n in sorted(nodes, key=rank)]


def explicit_victims(
    group: str,
    scale_min: int,
    nodes: Iterable[Mapping[str, Any]],
    count: int,
    remove: Iterable[str],
    source: str = "--remove",
) -> list[str]:
    """The nodes a resize to `count` must remove when it names them (`crv scale ... --remove
    NODE`, as Cluster API's delete-machine annotation): each a node of `group`, named once, and
    exactly as many as the shrink removes; never below `scale_min`. Else a SpecError naming the
    problem (nothing is changed)."""
    names = list(remove)
    mine = sorted((n["name"] for n in nodes if n["group"] == group), key=natural_key)
    for name in names:
        if name not in mine:
            shown = ", ".join(mine[:6]) + (" ..." if len(mine) > 6 else "") or "none"
            raise SpecError(source, name, f"not a node of group {group} (its nodes: {shown})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(source, twice[0], "named twice")
    left = len(mine) - len(names)
    if left < scale_min:
        raise SpecError(
            source, names[0], f"removing {len(names)} of {len(mine)} nodes leaves {left}, "
            f"below the group's scale.min {scale_min}"
        )  # fmt: skip
    if count != left:
        raise SpecError(
            source, names[0], f"removing {len(names)} of {len(mine)} nodes leaves {left}, "
            f"not COUNT {count} (give COUNT {left})"
        )  # fmt: skip
    return names


def check(
    home: Home, appliance: Appliance, placement: Placement, overrides: Mapping[str, str] | None
) -> None:
    """Every pool the placement names exists and its configuration is valid (no network call).
    The error names where the pool name came from: --pool-for, the appliance field or --pool."""
    overrides = overrides or {}
    chosen = {**placement.groups, **placement.orders}
    for name in placement.names():
        try:
            get_pool(name, home.pool_dir(name))
        except SpecError as exc:
            group = next((g for g in chosen if name in placement.order(g)), None)
            if group is None or exc.file != "--pool":  # the default, or pools.yaml is wrong
                raise
            if group in overrides:
                raise SpecError("--pool-for", f"{group}={name}", exc.message) from None
            g = appliance.groups[group]
            at = f"pools[{g.pools.index(name)}]" if name in g.pools else "pool"
            raise SpecError(g.source, f"{g.field}.{at}", exc.message) from None


class Drivers:
    """The pool drivers one command or flow uses, each opened once (validate(), no network)."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._open: dict[str, Pool] = {}

    def __call__(self, name: str) -> Pool:
        if name not in self._open:
            self._open[name] = get_pool(name, self.home.pool_dir(name))
        return self._open[name]


def pools_of(status: ClusterStatus | None, *also: str) -> list[str]:
    """Every pool a cluster uses: its default, its groups', its nodes' (a node stays where it was
    made), and `also`."""
    names = set(also)
    if status:
        names |= {status["pool"], *(status.get("pools") or {}).values()}
        names |= {n["pool"] for n in status["nodes"]}
    return sorted(names)


@dataclass
class Drift:
    """How the pools' view of a cluster differs from crv's records."""

    missing: list[dict[str, str]] = field(default_factory=list)  # recorded; the pool lacks it
    orphans: list[dict[str, str]] = field(default_factory=list)  # in the pool; crv lacks it
    unreachable: dict[str, str] = field(default_factory=dict)  # pool -> why it was not asked

    def __bool__(self) -> bool:
        return bool(self.missing or self.orphans or self.unreachable)

    def to_json(self) -> dict[str, Any]:
        return {"missing": self.missing, "orphans": self.orphans, "unreachable": self.unreachable}


def lapsed(
    status: ClusterStatus, liveness: Mapping[str, Mapping[str, str | None]], now: datetime
) -> list[dict[str, Any]]:
    """Enrolled nodes whose certificate has ended and that have not re-joined (off past their
    grace period, or refused): the pool still holds them, but only a new machine brings them
    back. `crv repair` remakes them like missing nodes."""
    out = []
    for n in status["nodes"]:
        if n["state"] not in ("enrolled", "leaving"):
            continue
        ends = (liveness.get(n["name"]) or {}).get("certificate_ends")
        end = datetime.fromisoformat(ends) if ends else None
        if end is not None and end.tzinfo is None:
            end = end.replace(tzinfo=timezone.utc)
        if end is None or end <= now:
            when = f"{end:%Y-%m-%d %H:%M} UTC" if end else "(no certificate)"
            out.append({"name": n["name"], "pool": n["pool"], "ended": when})
    return sorted(out, key=lambda n: natural_key(n["name"]))


def drift(status: ClusterStatus, drivers: Drivers) -> Drift:
    """Ask each pool the cluster uses for the nodes tagged with it (one list call per pool) and
    compare with the records. A recorded node is missing when its pool does not hold it, or holds
    it stopped; nodes still `planned` or `provisioning` are a change under way, not drift. A node
    the pool holds for the cluster that crv has no record of is an orphan (a killed change's, or
    one made by hand)."""
    cluster = status["name"]
    recorded_nodes = {n["name"]: n for n in status["nodes"]}
    out = Drift()
    for name in pools_of(status):
        try:
            held = {n.name: n for n in drivers(name).list_nodes(cluster)}
        except CrvError as exc:
            out.unreachable[name] = str(exc)
            continue
        for n in status["nodes"]:
            if n["pool"] != name or n["state"] not in SETTLED:
                continue
            info = held.get(n["name"])
            if info is None or info.state not in ALIVE:
                state = "absent" if info is None else info.state
                out.missing.append({"name": n["name"], "pool": name, "state": state})
        out.orphans += [
            {"name": node, "pool": name} for node in sorted(held) if node not in recorded_nodes
        ]
    return out
