"""The `scale-role` flow: resize one node group of a running cluster.

Growing converges the cluster onto the bigger plan: the new nodes go through provision ->
certify -> contextualize -> verify, the nodes already verified are left alone, and a role that
reads the group (the web farm's load balancer) runs again because what it reads changed — the
service compares a digest of each role's inputs (`refresh`), so only those dependents run.

Shrinking takes its victims in crv.engine.placement.release_order: the last preferred pool first,
then idle-first by the `busy` attribute the group's roles publish (the web farm's web servers
publish their requests per second; a node without a fresh reading counts as busy), then the
newest (highest index). It runs their roles' `drain` recipes first (a node whose drain fails
is kept and reported, and the group keeps it). Then it marks the victims `leaving` (they keep
running, but the service leaves them out of every read), converges the cluster onto the
smaller plan (the dependents run again without them), and only then destroys the victims in
the pool and revokes their certificates. The machinery is flows.converge.converge, the same as a
deploy's: this flow picks the counts and reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import deployment
from pydantic import Field

from crv.appliance.loader import Group, load_recorded
from crv.base.retry import DEFAULT_POLICY
from crv.engine.autoscale import number
from crv.engine.placement import explicit_victims, recorded, release_order
from crv.engine.stages import Timeouts
from crv.service.client import AsyncService, ServiceError
from crv.service.models import ClusterStatus
from flows import events
from flows.approval import gate
from flows.converge import (
    ON_FAILURE,
    WAIT,
    OnFailure,
    converge,
    raise_if_kept,
    require_cluster,
    running_service,
)
from flows.locks import cluster_change

BUSY_STALE = 300.0  # seconds a node's busy reading counts for, in a group without scaling


@flow(name="scale-role", persist_result=False, log_prints=True)
async def scale_role(
    name: Annotated[str, Field(description="Cluster name")],
    group: Annotated[str, Field(description="Node group to resize (worker)")],
    count: Annotated[int, Field(ge=0, le=100_000, description="Nodes the group should have")],
    boot_timeout: Annotated[float, Field(gt=0, le=7200)] = 300.0,
    recipe_timeout: Annotated[float, Field(gt=0, le=86400)] = 1800.0,
    retries: Annotated[int, Field(ge=0, le=10)] = 2,
    wait: Annotated[float | None, WAIT] = None,
    on_failure: Annotated[OnFailure | None, ON_FAILURE] = None,
    remove: Annotated[
        list[Annotated[str, Field(max_length=63)]] | None,
        Field(
            max_length=1000,
            description="Remove exactly these nodes of the group (COUNT must be the group's "
            "size less these)",
        ),
    ] = None,
) -> dict[str, Any]:
    async with cluster_change(name, wait=wait):
        result = await resize(
            name,
            await require_cluster(name),
            group,
            count,
            on_failure=on_failure,
            timeouts=Timeouts(boot=boot_timeout, recipe=recipe_timeout),
            retries=retries,
            remove=remove or (),
            by="crv scale" if deployment.id is None else "a run of scale-role/crv",
        )
    raise_if_kept(result)
    return result


async def resize(
    name: str,
    status: ClusterStatus,
    group: str,
    count: int,
    *,
    timeouts: Timeouts,
    retries: int,
    on_failure: OnFailure | None = None,
    remove: Sequence[str] = (),
    by: str = "crv scale",
) -> dict[str, Any]:
    """Resize one group of a cluster (`status`: its record), inside the caller's
    `cluster_change`: the scale-role and autoscale flows both come here. A shrink takes the
    nodes named in `remove` (crv.engine.placement.explicit_victims: exactly those), else its
    victims in crv.engine.placement.release_order (module doc). A shrink of more nodes than the
    appliance's `approval` allows waits for approval first (flows.approval.gate; `by`: who
    asked, as it records it)."""
    logger = get_run_logger()
    counts = {**(status.get("counts") or {}), group: count}
    loaded = load_recorded(status["source"], status["parameters"] or {}, counts)
    placement = recorded(status, loaded)
    mine = [n for n in status["nodes"] if n["group"] == group]
    before = len(mine)
    if remove:
        g = loaded.groups[group]
        victims = explicit_victims(group, g.scale_min, mine, count, remove, "remove")
        logger.info("removing the nodes named: %s", ", ".join(victims))
    elif count < before:
        busy = await busy_values(name, status, loaded.groups[group])
        if busy:
            logger.info("busy: %s", ", ".join(f"{n} {v:g}" for n, v in sorted(busy.items())))
        victims = release_order(placement, group, mine, busy)
    else:
        victims = []
    logger.info("cluster %s: group %s from %d to %d nodes", name, group, before, count)
    # a shrink that removes more than the appliance's `approval` allows waits for a person
    # here, before any drain or destroy; rejected or unanswered: Rejected, nothing was done
    approval = await gate(
        name, group, before, victims[: max(0, before - count)], loaded.approval, by=by,
        appliance=status["appliance"], pool=status["pool"],
    )  # fmt: skip
    result = await converge(
        loaded,
        name,
        placement,
        counts=counts,
        on_failure=on_failure,
        timeouts=timeouts,
        retries=retries,
        remove_first=victims,
    )
    after = result["counts"].get(group, count)
    events.cluster_event(
        name, status["appliance"], status["pool"], "scaled",
        group=group, before=before, after=after, removed=result["removed"],
    )  # fmt: skip
    logger.info(
        "cluster %s: group %s now has %d nodes (%d removed, %d certificates revoked)",
        name,
        group,
        after,
        len(result["removed"]),
        result["revoked"],
    )
    return {**result, "group": group, "before": before, "after": after, "approval": approval}


async def busy_values(cluster: str, status: ClusterStatus, group: Group) -> dict[str, float]:
    """node -> the `busy` value its roles publish (the highest of its roles; readings older
    than the group's metric's stale_after, else BUSY_STALE, left out)."""
    mine = {n["name"] for n in status["nodes"] if n["group"] == group.name}
    stale_after = group.scaling.stale_after if group.scaling else BUSY_STALE
    home, endpoints = running_service()
    service = AsyncService(home, endpoints.service_url)
    busy: dict[str, float] = {}
    try:
        for role in group.roles:
            for r in await _busy_readings(service, cluster, role):
                value, age = number(r.get("value")), r.get("age")
                if (
                    r["node"] in mine
                    and value is not None
                    and age is not None
                    and age <= stale_after
                ):
                    busy[r["node"]] = max(busy.get(r["node"], value), value)
    finally:
        await service.close()
    return busy


async def _busy_readings(service: AsyncService, cluster: str, role: str) -> list[dict[str, Any]]:
    """The role's `busy` readings, a temporary service error (a loaded service's 5xx) tried
    again by the one retry policy; none if they cannot be read (logged: the order then falls
    back to the newest)."""
    try:
        return await DEFAULT_POLICY.call(lambda: service.attribute_readings(cluster, role, "busy"))
    except ServiceError as exc:
        get_run_logger().warning("busy of role %s not read: %s", role, exc)
        return []
