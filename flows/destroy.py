"""The `destroy-cluster` flow: remove every node of a cluster and revoke its certificates."""

from __future__ import annotations

from typing import Any

from prefect import flow

from crv import events
from tasks.deprovision import deprovision


@flow(name="destroy-cluster", persist_result=False)
def destroy_cluster(name: str, pool: str = "local") -> dict[str, Any]:
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
