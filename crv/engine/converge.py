"""The decisions a converge takes, as plain functions: state in, decision out, no I/O and no
Prefect (the flows in flows/ carry them out; tests/test_converge.py checks each).

A converge brings a cluster to an appliance with counts: the plan says which nodes it should
have; the records (the cluster status) say which it has. Nodes recorded but not planned are the
victims of a shrink: drained first where a role asks for it, let go by their dependents, then
destroyed. A victim whose drain failed is kept as a member, and its group keeps one more node.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from crv.appliance.loader import Appliance
from crv.appliance.plan import Plan, node_index
from crv.base.states import NodeState, RoleState
from crv.service.models import ClusterStatus, NodeStatus
from crv.service.store import natural_key

# a role in one of these states has nothing to drain: it never ran, is running, failed, or
# was drained already
NOTHING_TO_DRAIN = (
    RoleState.PENDING, RoleState.RELEASED, RoleState.RUNNING, RoleState.FAILED, RoleState.DRAINED
)  # fmt: skip


def recorded_counts(status: ClusterStatus | None, appliance: str) -> dict[str, int]:
    """The group sizes a resize recorded, when the cluster runs the same appliance: a deploy
    again keeps them (those asked for win)."""
    if status is None or status["appliance"] != appliance:
        return {}
    return dict(status.get("counts") or {})


def victims(recorded: Iterable[NodeStatus], planned: Collection[str]) -> list[NodeStatus]:
    """Recorded nodes the plan no longer has, newest first (a shrink removes the newest)."""
    gone = (n for n in recorded if n["name"] not in planned)
    return sorted(gone, key=lambda n: natural_key(n["name"]), reverse=True)


def roles_to_drain(appliance: Appliance, leaving: Iterable[NodeStatus]) -> dict[str, list[str]]:
    """Per victim with a running agent, the roles that ran and have a drain recipe; victims
    with nothing to drain are left out."""
    todo: dict[str, list[str]] = {}
    for v in leaving:
        if v["state"] not in (NodeState.ENROLLED, NodeState.LEAVING):
            continue
        if v["group"] not in appliance.groups:
            continue
        roles = [
            role
            for role, r in v["roles"].items()
            if role in appliance.roles
            and appliance.roles[role].drain is not None
            and r["state"] not in NOTHING_TO_DRAIN
        ]
        if roles:
            todo[v["name"]] = roles
    return todo


def plan_indices(plan: Plan) -> dict[str, list[int]]:
    """The node indices of each group in a plan."""
    out: dict[str, list[int]] = {g: [] for g in plan.appliance.groups}
    for n in plan.nodes.values():
        out[n.group].append(n.index)
    return out


def keep_undrained(
    plan: Plan, leaving: Sequence[NodeStatus], kept: Collection[str]
) -> tuple[Appliance, dict[str, list[int]], dict[str, int]]:
    """The appliance, node indices per group and the changed group sizes once the victims
    whose drain failed (`kept`) stay members: each one's group keeps one more node."""
    grown = plan_indices(plan)
    for v in leaving:
        index = node_index(plan.cluster, v["group"], v["name"])
        if v["name"] in kept and index is not None:
            grown[v["group"]].append(index)
    sizes = {g: len(grown[g]) for g in {v["group"] for v in leaving} & set(grown)}
    a = plan.appliance
    groups = {**a.groups, **{g: replace(a.groups[g], count=n) for g, n in sizes.items()}}
    return replace(a, groups=groups), grown, sizes


def recorded_sizes(appliance: Appliance, sizes: Mapping[str, int]) -> dict[str, int]:
    """The sizes to record: a resizable group's; a fixed one tries again at the next deploy."""
    return {g: n for g, n in sizes.items() if appliance.groups[g].scalable}


def kept_failure(kept: Mapping[str, str], counts: Mapping[str, int]) -> str | None:
    """Why a change that kept nodes whose drain failed is not what was asked, or None."""
    if not kept:
        return None
    node, why = next(iter(kept.items()))
    more = f" (and {len(kept) - 1} more)" if len(kept) > 1 else ""
    sizes = ", ".join(f"{g}={n}" for g, n in sorted(counts.items()))
    return f"{node} was kept{more}: its {why}; the cluster now has {sizes}"


def remake(
    missing: Sequence[dict[str, str]], ended: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """What a repair makes again: the nodes whose certificate ended without a re-join
    (crv.engine.placement.lapsed) and that are not missing already, whose machines are
    destroyed first (the pool holds a machine that can never be trusted again); and every node
    made again, the missing then those."""
    gone = {n["name"] for n in missing}
    destroy = [n for n in ended if n["name"] not in gone]
    again = [{"name": n["name"], "pool": n["pool"], "state": "lapsed"} for n in destroy]
    return destroy, list(missing) + again


# -- a node that fails to join, and too many of them (FAULTS F5, F6) --------------------------

# the steps whose failure for good shuts a new node out: it never got, or never used, the trust
# a member has (a recipe failing again on a member is not a reason to shut it out)
QUARANTINE_KINDS = ("certify", "contextualize")
UNHEALTHY_KINDS = ("provision", "certify", "contextualize")


def quarantines(kind: str, node: str, made: Collection[str]) -> bool:
    """Whether a step of `kind` that failed for good on `node` quarantines it: certify, or a
    contextualize of a node this change made (its first)."""
    return kind == "certify" or (kind == "contextualize" and node in made)


def unhealthy_limit(max_unhealthy: int | str, new: int) -> int:
    """How many of a change's `new` nodes may fail before the brake: a number of nodes, or a
    share of them ("40%", rounded down), as Cluster API's maxUnhealthy."""
    if isinstance(max_unhealthy, str):
        return new * int(max_unhealthy.rstrip("%")) // 100
    return max_unhealthy


def brake(max_unhealthy: int | str, new: int, failed: int) -> str | None:
    """The one line that stops a change whose new nodes fail too often, or None."""
    limit = unhealthy_limit(max_unhealthy, new)
    if failed <= limit:
        return None
    return (
        f"stopped: {failed} of {new} new nodes failed, more than max_unhealthy "
        f"{max_unhealthy} ({limit}); crv makes no more nodes in this change"
    )
