"""Prefect tasks for the pool calls flows make outside the stages (the stages' own pool calls
run inside the stage tasks): destroying a machine or a whole cluster, asking pools for a
cluster's machines or for their room. As tasks, they show in the Prefect UI with the flow that
made them. They take the flow's `Drivers`, so a pool is opened once per flow run (a pool may
hold the processes it started, to reap them)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from crv.engine.placement import Drift, Drivers, capacities, drift
from crv.engine.teardown import Teardown, teardown
from crv.service.client import Service
from crv.service.models import ClusterStatus


@task(
    name="destroy-machine",
    task_run_name="destroy {node}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def destroy_machine(drivers: Drivers, pool: str, node: str) -> None:
    """Destroy the machine of `node` in `pool` (gone already: nothing to do)."""
    await asyncio.to_thread(drivers(pool).destroy_node, node)


@task(name="pool-drift", cache_policy=NO_CACHE, persist_result=False)
async def pool_drift(drivers: Drivers, status: ClusterStatus) -> Drift:
    """How the pools' view of the cluster differs from crv's records (crv.engine.placement)."""
    return await asyncio.to_thread(drift, status, drivers)


@task(name="pool-capacity", cache_policy=NO_CACHE, persist_result=False)
async def pool_capacities(drivers: Drivers, pools: Sequence[str]) -> dict[str, int | None]:
    """How many more nodes each of `pools` can make now (None: no known limit)."""
    return await asyncio.to_thread(capacities, drivers, pools)


@task(name="teardown", cache_policy=NO_CACHE, persist_result=False)
async def teardown_cluster(
    drivers: Drivers, service: Service, cluster: str, also: Sequence[str] = ()
) -> Teardown:
    """Destroy every node of the cluster in every pool it uses (and `also`), then forget it."""
    return await asyncio.to_thread(teardown, cluster, drivers, service, also)
