"""The `destroy-cluster` flow: remove every node of a cluster and revoke its certificates."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows import events
from flows.converge import WAIT
from flows.locks import cluster_change
from tasks.deprovision import deprovision


@flow(name="destroy-cluster", persist_result=False)
async def destroy_cluster(
    name: Annotated[str, Field(description="Cluster name")],
    pool: Annotated[str, Field(description="Resource pool")] = "local",
    wait: Annotated[float | None, WAIT] = None,
) -> dict[str, Any]:
    async with cluster_change(name, wait=wait):
        result: dict[str, Any] = deprovision(name, pool)
        events.cluster_event(
            name,
            result["appliance"],
            pool,
            "destroyed",
            nodes=result["destroyed"],
            revoked=result["revoked"],
        )
    return result
