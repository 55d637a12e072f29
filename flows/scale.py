"""The `scale-role` flow: resize one node group of a running cluster.

Growing converges the cluster onto the bigger plan: the new nodes go through provision ->
certify -> contextualize -> verify, the nodes already verified are left alone, and a role that
reads the group (the web farm's load balancer) runs again because what it reads changed — the
service compares a digest of each role's inputs (`refresh`), so only those dependents run.

Shrinking takes the newest nodes (highest index) as victims. It marks them `leaving` (they keep
running, but the service leaves them out of every read), converges the cluster onto the
smaller plan (the dependents run again without them), then destroys the victims in the pool
and revokes their certificates. A victim goes only after its dependents have let it go.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from crv import events
from crv.appliance import load_recorded
from crv.client import AsyncService, ServiceError
from crv.deploy import Timeouts
from crv.home import Home
from crv.locks import cluster_change
from crv.plan import expand
from crv.store import LEAVING
from flows.deploy import WAIT, DeployFailed, converge, publish_summary, running_service
from pools import get_pool


@flow(name="scale-role", persist_result=False, log_prints=True)
async def scale_role(
    name: Annotated[str, Field(description="Cluster name")],
    group: Annotated[str, Field(description="Node group to resize (worker)")],
    count: Annotated[int, Field(ge=0, le=100_000, description="Nodes the group should have")],
    boot_timeout: Annotated[float, Field(gt=0, le=7200)] = 300.0,
    recipe_timeout: Annotated[float, Field(gt=0, le=86400)] = 1800.0,
    retries: Annotated[int, Field(ge=0, le=10)] = 2,
    wait: Annotated[float | None, WAIT] = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    home, endpoints = running_service()
    service = AsyncService(home, endpoints.service_url)
    async with cluster_change(name, wait=wait):
        timeouts = Timeouts(boot=boot_timeout, recipe=recipe_timeout)
        return await _scale(logger, home, service, name, group, count, timeouts, retries)


async def _scale(
    logger: Any,
    home: Home,
    service: AsyncService,
    name: str,
    group: str,
    count: int,
    timeouts: Timeouts,
    retries: int,
) -> dict[str, Any]:
    try:
        try:
            status = await service.status(name)
        except ServiceError as e:
            if e.status == 404:
                raise DeployFailed(f"no cluster {name!r}") from None
            raise
        counts = {**(status.get("counts") or {}), group: count}
        plan = expand(load_recorded(status["source"], status["parameters"] or {}, counts), name)
        wanted = set(plan.nodes)
        members = [n for n in status["nodes"] if n["group"] == group]
        victims = sorted(
            (n for n in members if n["name"] not in wanted),
            key=lambda n: _index(n["name"]),
            reverse=True,  # newest first
        )
        pool = status["pool"]
        before = len(members)
        logger.info(
            "cluster %s: group %s from %d to %d nodes%s",
            name,
            group,
            before,
            count,
            f" (victims: {', '.join(v['name'] for v in victims)})" if victims else "",
        )
        if victims:  # they stop feeding their dependents before these run again
            await service.put_nodes(
                name,
                [
                    {
                        "name": v["name"],
                        "group": group,
                        "roles": list(v["roles"]),
                        "pool": v["pool"],
                        "state": LEAVING,
                    }
                    for v in victims
                ],
            )
        result = await converge(
            plan,
            pool,
            counts=counts,
            timeouts=timeouts,
            retries=retries,
        )
        revoked = await _remove(service, home, name, victims)
        for v in victims:
            events.node_event(name, status["appliance"], pool, v["name"], "destroyed")
        events.cluster_event(
            name, status["appliance"], pool, "scaled",
            group=group, before=before, after=count, removed=[v["name"] for v in victims],
        )  # fmt: skip
        if victims:
            await publish_summary(name, await service.status(name))
    finally:
        await service.close()
    logger.info(
        "cluster %s: group %s now has %d nodes (%d added, %d removed, %d certificates revoked)",
        name,
        group,
        count,
        max(0, count - before),
        len(victims),
        revoked,
    )
    return {
        **result,
        "group": group,
        "before": before,
        "after": count,
        "removed": [v["name"] for v in victims],
    }


def _index(node: str) -> int:
    tail = node.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


async def _remove(
    service: AsyncService, home: Home, cluster: str, victims: list[dict[str, Any]]
) -> int:
    """Destroy the victims in their pools, then forget them (which revokes their certificates
    and purges their attributes)."""
    revoked = 0
    loop = asyncio.get_running_loop()
    for v in victims:
        driver = get_pool(v["pool"], home.pool_dir(v["pool"]))
        await loop.run_in_executor(None, driver.destroy_node, v["name"])
        revoked += len(await service.delete_node(cluster, v["name"]))
    return revoked
