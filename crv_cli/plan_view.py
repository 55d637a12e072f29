"""The plan for people: levels of the DAG, nodes folded into ranges, the critical path.

A 1,000-node plan has 4,000 steps; listing them helps nobody. Within a level, steps of the same
kind and role are one row, and the nodes of a group are folded into `cluster-group-[0-999]`, so
the output grows with the number of roles and levels, not with the number of nodes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from rich.console import Group as RenderGroup
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from crv.appliance.plan import Plan, node_name


def fold_indices(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def fold_nodes(plan: Plan, names: Iterable[str]) -> str:
    by_group: dict[str, list[int]] = defaultdict(list)
    for name in names:
        node = plan.nodes[name]
        by_group[node.group].append(node.index)
    parts = []
    for group, indices in by_group.items():
        if len(indices) == 1:
            parts.append(node_name(plan.cluster, group, indices[0]))
        else:
            parts.append(f"{plan.cluster}-{group}-[{fold_indices(indices)}]")
    return ", ".join(parts)


def _seconds(value: float) -> str:
    return f"{value:g} s"


def describe(plan: Plan) -> RenderableType:
    a = plan.appliance
    g = plan.graph
    header = Text.assemble(
        ("Cluster ", "bold"),
        (plan.cluster, "bold cyan"),
        f": {len(plan.nodes)} nodes in {len(a.groups)} groups, {g.number_of_nodes()} steps, "
        f"{g.number_of_edges()} edges (appliance {a.name}, {a.source})",
    )

    roles = Table(title="Roles", title_justify="left", expand=False)
    for column in ("role", "node groups", "nodes", "waits for"):
        roles.add_column(column)
    for role in a.roles.values():
        hosts = a.hosts(role.name)
        waits = []
        for dep in role.depends_on:
            if dep.local:
                waits.append(f"{dep.role} on the same node")
            else:
                total = sum(h.count for h in a.hosts(dep.role))
                ready = dep.min_ready or total
                waits.append(
                    f"{dep.role} on {ready} of {total} nodes"
                    if dep.min_ready
                    else f"{dep.role} on all {total} nodes"
                )
        roles.add_row(
            role.name,
            ", ".join(h.name for h in hosts),
            str(sum(h.count for h in hosts)),
            "; ".join(waits) or "-",
        )

    levels = Table(title="Steps by level (each level can run at once)", title_justify="left")
    for column in ("level", "step", "role", "nodes", "count"):
        levels.add_column(column, justify="right" if column in ("level", "count") else "left")
    for number, level in enumerate(plan.levels(), start=1):
        rows: dict[tuple[str, str], list[str]] = defaultdict(list)
        for sid in level:
            data = g.nodes[sid]
            rows[(data["kind"], data["role"] or "")].append(data["node"])
        for i, ((kind, role_name), names) in enumerate(rows.items()):
            levels.add_row(
                str(number) if i == 0 else "",
                kind,
                role_name or "-",
                fold_nodes(plan, names),
                str(len(names)),
            )

    critical = Table(
        title=f"Critical path: {_seconds(plan.critical_seconds)} (lower bound of the deploy time)",
        title_justify="left",
    )
    for column in ("step", "takes", "done at"):
        critical.add_column(column, justify="left" if column == "step" else "right")
    elapsed = 0.0
    for sid in plan.critical_path:
        took = g.nodes[sid]["seconds"]
        elapsed += took
        critical.add_row(sid, _seconds(took), _seconds(elapsed))

    return RenderGroup(header, Text(""), roles, Text(""), levels, Text(""), critical)
