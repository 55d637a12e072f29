"""The `deploy-appliance` flow: load, plan, then converge the cluster (flows.converge) to it.

The flow holds no pool or domain logic: crv.engine.stages does the steps, crv.engine.executor
keeps them on the DAG's edges, tasks/stages.py makes each stage a task run, flows.converge runs
them all at once along the DAG. The final state is Completed only when every role on every node
was verified.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run
from pydantic import Field

from crv.appliance.loader import NOT_SCALED, load_appliance, locate, with_counts
from crv.appliance.plan import expand
from crv.engine.converge import recorded_counts
from crv.engine.placement import check, place
from crv.engine.stages import Timeouts
from crv.service.client import AsyncService
from flows.converge import (
    ON_FAILURE,
    PROGRESS_LISTENERS,
    WAIT,
    DeployFailed,
    OnFailure,
    converge,
    raise_if_kept,
    running_site,
    status_of,
)
from flows.locks import cluster_change
from tasks.pools import refuse_machine_local

__all__ = ["PROGRESS_LISTENERS", "STARTED_LISTENERS", "deploy_appliance"]

# In-process observers (the CLI's progress bar); a flow started from the UI has none.
STARTED_LISTENERS: list[Callable[[str], None]] = []


@flow(name="deploy-appliance", persist_result=False, log_prints=True)
async def deploy_appliance(
    appliance: Annotated[str, Field(description="Appliance directory or catalog name (webfarm)")],
    pool: Annotated[
        str, Field(description="Resource pool of the node groups no other choice names")
    ] = "local",
    name: Annotated[
        str | None, Field(description="Cluster name (default: the appliance's)")
    ] = None,
    parameters: Annotated[
        dict[str, str] | None, Field(description="Appliance parameters, like --set KEY=VALUE")
    ] = None,
    boot_timeout: Annotated[float, Field(gt=0, le=7200)] = 300.0,
    recipe_timeout: Annotated[float, Field(gt=0, le=86400)] = 1800.0,
    retries: Annotated[int, Field(ge=0, le=10)] = 2,
    counts: Annotated[
        dict[str, int] | None,
        Field(description="Node count per group (default: a resized cluster keeps its counts)"),
    ] = None,
    wait: Annotated[float | None, WAIT] = None,
    on_failure: Annotated[OnFailure | None, ON_FAILURE] = None,
    pools: Annotated[
        dict[str, str] | None,
        Field(
            description="Resource pool per node group, like --pool-for GROUP=POOL (default: "
            "the group's pool in the appliance, else `pool`)"
        ),
    ] = None,
    autoscale_every: Annotated[
        float | None,
        Field(
            ge=5,
            le=86400,
            description="Enable autoscaling once deployed: seconds between autoscale runs "
            "(the appliance needs a scaling section; empty: leave autoscaling as it is)",
        ),
    ] = None,
) -> dict[str, Any]:
    for listener in STARTED_LISTENERS:
        listener(str(flow_run.id))
    site = running_site()
    home, endpoints = site.home, site.endpoints
    if deployment.get_id() is not None and Path(appliance).name != appliance:
        # the deployment's form offers the catalog's names only; a request that turned the
        # schema off must not reach other directories of this machine either
        raise DeployFailed(
            f"appliance: {appliance!r}: a run of the deployment takes an appliance of the "
            "catalog by its name, not a path"
        )
    loaded = load_appliance(locate(appliance), parameters or {})
    cluster = name or loaded.name
    expand(with_counts(loaded, counts or {}), cluster)  # bad input fails before the wait
    placement = place(loaded, pool, pools)
    refuse_machine_local(site, placement.names())  # on a worker elsewhere: not the local pool
    check(home, loaded, placement, pools)
    if autoscale_every is not None and not loaded.scaled:
        raise DeployFailed(f"autoscale_every: appliance {loaded.name}: {NOT_SCALED}")
    async with cluster_change(cluster, wait=wait):
        # a deploy again of a resized cluster keeps the sizes it was given, but those asked for
        service = AsyncService(home, endpoints.service_url)
        try:
            before = await status_of(service, cluster)
            counts = {**recorded_counts(before, loaded.name), **(counts or {})}
        finally:
            await service.close()
        result = await converge(
            loaded,
            cluster,
            placement,
            counts=counts,
            on_failure=on_failure,
            timeouts=Timeouts(boot=boot_timeout, recipe=recipe_timeout),
            retries=retries,
        )
    raise_if_kept(result)
    if autoscale_every is not None:  # the serve process adds the autoscale/<cluster> deployment
        service = AsyncService(home, endpoints.service_url)
        try:
            await service.put_autoscaling(cluster, True, autoscale_every)
        finally:
            await service.close()
        get_run_logger().info("cluster %s: autoscaling every %g s", cluster, autoscale_every)
    return result
