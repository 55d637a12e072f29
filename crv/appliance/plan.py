"""Expanding an appliance into the DAG of steps a deploy runs.

For each node: provision -> certify, then per role certify -> contextualize -> verify; a remote
dependency r -> p adds verify(m, p) -> contextualize(n, r) for every node m hosting p (or the
first `min_ready` of them), a local one adds verify(n, p) -> contextualize(n, r). The plan is a
pure value: the same appliance, overrides and cluster name always give the same step ids,
edges and order, which is what makes re-running a deploy converge instead of duplicate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

from crv.appliance.loader import Appliance
from crv.appliance.spec import NAME_PATTERN, NAME_RULE
from crv.base.errors import PlanError

DEFAULT_ESTIMATES: Mapping[str, float] = {
    "provision": 60.0,
    "certify": 2.0,
    "contextualize": 30.0,
    "verify": 5.0,
}
MAX_STEPS = 200_000
MAX_EDGES = 1_000_000


def step_id(node: str, kind: str, role: str | None = None) -> str:
    return f"{node}:{kind}:{role}" if role else f"{node}:{kind}"


def node_name(cluster: str, group: str, index: int) -> str:
    return f"{cluster}-{group}-{index}"


def node_index(cluster: str, group: str, name: str) -> int | None:
    """The index in `<cluster>-<group>-<index>`; None for a name not of that form."""
    prefix = f"{cluster}-{group}-"
    tail = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class PlanNode:
    name: str
    group: str
    index: int


@dataclass(frozen=True)
class Plan:
    cluster: str
    appliance: Appliance
    graph: nx.DiGraph[str]  # step id -> {kind, node, role, seconds}
    nodes: Mapping[str, PlanNode]
    critical_path: tuple[str, ...]
    critical_seconds: float

    def steps(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(self.graph.nodes(data=True))

    def levels(self) -> list[list[str]]:
        """Steps by topological generation: everything in a level can run at once."""
        return [list(level) for level in nx.topological_generations(self.graph)]

    def to_json(self) -> dict[str, Any]:
        """The `crv plan --json` contract; its shape is relied on by scripts: add, never rename."""
        return {
            "cluster": self.cluster,
            "steps": [
                {"id": sid, "kind": d["kind"], "node": d["node"], "role": d["role"]}
                for sid, d in self.graph.nodes(data=True)
            ],
            "edges": [[u, v] for u, v in self.graph.edges()],
            "critical_path": {
                "steps": list(self.critical_path),
                "seconds": self.critical_seconds,
            },
        }


def _check_names(appliance: Appliance, cluster: str, members: Mapping[str, Sequence[int]]) -> None:
    if not re.fullmatch(NAME_PATTERN, cluster):
        raise PlanError(
            "--name",
            cluster,
            f"not a valid cluster name: {NAME_RULE}",
        )
    for g in appliance.groups.values():
        top = max(g.count, g.scale_max, 1) - 1
        longest = node_name(cluster, g.name, max([top, *members.get(g.name, ())]))
        if len(longest) > 63:
            raise PlanError(
                g.source,
                g.field,
                f"node names such as {longest!r} are {len(longest)} characters; DNS labels "
                "allow 63: shorten the cluster or group name, or lower scale.max",
            )


def _check_size(appliance: Appliance) -> None:
    """Count steps and edges arithmetically, so a plan too big to build is refused unbuilt."""
    steps = sum(g.count * (2 + 2 * len(g.roles)) for g in appliance.groups.values())
    edges = sum(g.count * (1 + 2 * len(g.roles)) for g in appliance.groups.values())
    for role in appliance.roles.values():
        consumers = sum(g.count for g in appliance.hosts(role.name))
        for dep in role.depends_on:
            providers = sum(g.count for g in appliance.hosts(dep.role))
            fan_in = 1 if dep.local else min(providers, dep.min_ready or providers)
            edges += consumers * fan_in
            if consumers * fan_in > MAX_EDGES:
                raise PlanError(
                    role.source,
                    f"{role.field}.depends_on",
                    f"{role.name} on {consumers} nodes waiting for {dep.role} on {fan_in} nodes "
                    f"makes {consumers * fan_in} edges (at most {MAX_EDGES}); set min_ready",
                )
    if steps > MAX_STEPS or edges > MAX_EDGES:
        raise PlanError(
            appliance.source,
            "nodes",
            f"the plan would have {steps} steps and {edges} edges "
            f"(at most {MAX_STEPS} and {MAX_EDGES})",
        )


def _estimate(appliance: Appliance, roles: tuple[str, ...], kind: str) -> float:
    """A node-wide step (provision, certify) lasts as long as its slowest role says."""
    values = [appliance.roles[r].estimates.get(kind) for r in roles]
    given = [v for v in values if v is not None]
    return max(given) if given else DEFAULT_ESTIMATES[kind]


def expand(
    appliance: Appliance,
    cluster: str | None = None,
    members: Mapping[str, Sequence[int]] | None = None,
) -> Plan:
    """The plan of `appliance` as `cluster`. A group's nodes are indices 0..count-1, or the
    indices `members` gives for it (a resized cluster: the nodes it keeps and the new ones)."""
    cluster = cluster or appliance.name
    members = members or {}
    for name, indices in members.items():
        group = appliance.groups.get(name)
        if group is None:
            raise PlanError("members", name, "unknown node group")
        if len(set(indices)) != group.count or min(indices, default=0) < 0:
            raise PlanError(
                "members", name, f"{sorted(indices)}: not {group.count} distinct node indices"
            )
    _check_names(appliance, cluster, members)
    _check_size(appliance)

    steps: list[tuple[str, dict[str, Any]]] = []
    edges: list[tuple[str, str]] = []
    nodes: dict[str, PlanNode] = {}
    hosts: dict[str, list[str]] = {r: [] for r in appliance.roles}
    for g in appliance.groups.values():
        provision = _estimate(appliance, g.roles, "provision")
        certify = _estimate(appliance, g.roles, "certify")
        per_role = [
            (
                r,
                appliance.roles[r].estimates.get(
                    "contextualize", DEFAULT_ESTIMATES["contextualize"]
                ),
                appliance.roles[r].estimates.get("verify", DEFAULT_ESTIMATES["verify"]),
            )
            for r in g.roles
        ]
        for i in sorted(members[g.name]) if g.name in members else range(g.count):
            n = node_name(cluster, g.name, i)
            nodes[n] = PlanNode(n, g.name, i)
            p, c = step_id(n, "provision"), step_id(n, "certify")
            steps.append((p, {"kind": "provision", "node": n, "role": None, "seconds": provision}))
            steps.append((c, {"kind": "certify", "node": n, "role": None, "seconds": certify}))
            edges.append((p, c))
            for r, ctx_s, ver_s in per_role:
                ctx, ver = step_id(n, "contextualize", r), step_id(n, "verify", r)
                steps.append(
                    (ctx, {"kind": "contextualize", "node": n, "role": r, "seconds": ctx_s})
                )
                steps.append((ver, {"kind": "verify", "node": n, "role": r, "seconds": ver_s}))
                edges.append((c, ctx))
                edges.append((ctx, ver))
                hosts[r].append(n)

    for role in appliance.roles.values():
        for dep in role.depends_on:
            providers = hosts[dep.role][: dep.min_ready] if dep.min_ready else hosts[dep.role]
            for n in hosts[role.name]:
                target = step_id(n, "contextualize", role.name)
                if dep.local:
                    edges.append((step_id(n, "verify", dep.role), target))
                else:
                    edges.extend((step_id(m, "verify", dep.role), target) for m in providers)

    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(steps)
    graph.add_edges_from(edges)
    path, seconds = _critical_path(graph)
    return Plan(cluster, appliance, graph, nodes, path, seconds)


def _critical_path(graph: nx.DiGraph[str]) -> tuple[tuple[str, ...], float]:
    """Longest path by step durations (networkx's dag_longest_path weighs edges, not steps)."""
    try:
        order = list(nx.topological_sort(graph))
    except nx.NetworkXUnfeasible:
        cycle = [u for u, _ in nx.find_cycle(graph)]
        raise PlanError("plan", "", f"step cycle: {' -> '.join([*cycle, cycle[0]])}") from None
    finish: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for sid in order:
        start, best = 0.0, None
        for pred in graph.pred[sid]:
            if best is None or finish[pred] > start:
                start, best = finish[pred], pred
        finish[sid] = start + graph.nodes[sid]["seconds"]
        via[sid] = best
    if not finish:
        return (), 0.0
    last: str | None = max(finish, key=finish.__getitem__)
    total = finish[last] if last else 0.0
    path: list[str] = []
    while last is not None:
        path.append(last)
        last = via[last]
    return tuple(reversed(path)), total


def members(
    appliance: Appliance,
    cluster: str,
    existing: Iterable[tuple[str, str]],
    remove_first: Sequence[str] = (),
) -> dict[str, tuple[int, ...]]:
    """The node indices of each group after the change, from the cluster's recorded nodes
    (name, group): a group keeps its oldest nodes up to its count and fills the lowest free
    indices. Its other nodes, and those of groups the appliance no longer has, are left out of
    the plan: they are the change's victims. The nodes named in `remove_first` (the autoscaler's
    idle-first order) are the first victims, in that order, before the newest."""
    first = {name: rank for rank, name in enumerate(remove_first)}
    have: dict[str, list[int]] = {}
    names: dict[tuple[str, int], str] = {}
    for name, group in existing:
        index = node_index(cluster, group, name)
        if group in appliance.groups and index is not None:
            have.setdefault(group, []).append(index)
            names[group, index] = name
    indices: dict[str, tuple[int, ...]] = {}
    for g in appliance.groups.values():

        def keep_order(i: int, group: str = g.name) -> tuple[int, int]:
            # the nodes not named (oldest first), then the named ones, the last-named first
            rank = first.get(names[group, i])
            return (0, i) if rank is None else (1, -rank)

        mine = sorted(have.get(g.name, ()), key=keep_order)
        keep = mine[: g.count]
        taken = set(mine)
        free = (i for i in range(g.count + len(mine)) if i not in taken)
        keep += [next(free) for _ in range(g.count - len(keep))]
        indices[g.name] = tuple(sorted(keep))
    return indices
