"""Where a cluster's nodes live: the pool of each node group, and what the pools hold for the
cluster compared with crv's records (drift).

A group's pool is, first to last: `--pool-for GROUP=POOL` (the flow's `pools` parameter), the
group's `pool:` in the appliance, the deploy's `--pool`. The choice is recorded with the
cluster, so a resize puts new nodes where the group's nodes go. A node stays in the pool it was
made in: its record names that pool, and every later step, drift check and teardown asks that
pool about it, whatever the group's pool is now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crv.appliance import Appliance
from crv.errors import CrvError, SpecError
from crv.home import Home
from pools import get_pool
from pools.base import Pool

ALIVE = ("running", "pending")  # what a pool says of a node that is there and not stopped
SETTLED = ("provisioned", "enrolled", "leaving")  # recorded states that mean "the pool has it"


@dataclass(frozen=True)
class Placement:
    default: str  # the deploy's --pool
    groups: Mapping[str, str]  # node group -> pool, where it is not `default`

    def of(self, group: str) -> str:
        return self.groups.get(group, self.default)

    def names(self) -> list[str]:
        return sorted({self.default, *self.groups.values()})


def place(appliance: Appliance, default: str, overrides: Mapping[str, str] | None) -> Placement:
    """The pool of each node group (module doc); an override for an unknown group is refused."""
    overrides = dict(overrides or {})
    for group in overrides:
        if group not in appliance.groups:
            known = ", ".join(appliance.groups)
            raise SpecError("--pool-for", group, f"unknown node group; the groups are {known}")
    chosen = {g.name: overrides.get(g.name) or g.pool or default for g in appliance.groups.values()}
    return Placement(default, {g: p for g, p in chosen.items() if p != default})


def recorded(status: Mapping[str, Any]) -> Placement:
    """The placement recorded with a cluster (a resize places new nodes by it)."""
    return Placement(status["pool"], dict(status.get("pools") or {}))


def check(
    home: Home, appliance: Appliance, placement: Placement, overrides: Mapping[str, str] | None
) -> None:
    """Every pool the placement names exists and its configuration is valid (no network call).
    The error names where the pool name came from: --pool-for, the appliance field or --pool."""
    overrides = overrides or {}
    for name in placement.names():
        try:
            get_pool(name, home.pool_dir(name))
        except SpecError as exc:
            group = next((g for g, p in placement.groups.items() if p == name), None)
            if group is None or exc.file != "--pool":  # the default, or pools.yaml is wrong
                raise
            if group in overrides:
                raise SpecError("--pool-for", f"{group}={name}", exc.message) from None
            g = appliance.groups[group]
            raise SpecError(g.source, f"{g.field}.pool", exc.message) from None


class Drivers:
    """The pool drivers one command or flow uses, each opened once (validate(), no network)."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._open: dict[str, Pool] = {}

    def __call__(self, name: str) -> Pool:
        if name not in self._open:
            self._open[name] = get_pool(name, self.home.pool_dir(name))
        return self._open[name]


def pools_of(status: Mapping[str, Any] | None, *also: str) -> list[str]:
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


def drift(status: Mapping[str, Any], drivers: Drivers) -> Drift:
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
