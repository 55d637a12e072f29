"""Prefect tasks for the pool calls flows make outside the stages (the stages' own pool calls
run inside the stage tasks): destroying a machine or a whole cluster, asking pools for a
cluster's machines or for their room. As tasks, they show in the Prefect UI with the flow that
made them. They take the flow's `Drivers`, so a pool is opened once per flow run (a pool may
hold the processes it started, to reap them).

`site_drivers` opens the pools of the run's site (crv.base.running.Site). On a Prefect worker
elsewhere (a worker configuration, no CRV_HOME) a pool whose state is the crv machine's own is
refused with one line saying why (`MACHINE_LOCAL`): the local pool's nodes are processes of
that machine, the manual pool's ledger of paired machines and a bare-metal pool's leases and
boot service are there too. Every other pool is opened from the configuration's pools.yaml."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from crv.base.errors import SpecError
from crv.base.running import Site
from crv.engine.placement import Drift, Drivers, capacities, drift
from crv.engine.teardown import Teardown, teardown
from crv.service.client import Service
from crv.service.models import ClusterStatus
from pools import config
from pools.base import Pool

# driver -> why a worker on another machine cannot use a pool of it
MACHINE_LOCAL = {
    "local": "its nodes are processes of the crv machine, kept under its CRV_HOME",
    "manual": "its machines were paired on the crv machine, whose CRV_HOME keeps their ledger",
    "baremetal": "its machine leases and its boot service are the crv machine's",
}


class SiteDrivers(Drivers):
    """The pool drivers of one flow run, opened from its site's pools.yaml and state dirs; on a
    worker elsewhere, a machine-local pool is refused (module doc)."""

    def __init__(self, site: Site) -> None:
        super().__init__(site.home)
        self.site = site

    def __call__(self, name: str) -> Pool:
        if self.site.remote and name not in self._open:
            refuse_machine_local(self.site, [name])
        return super().__call__(name)


def site_drivers(site: Site) -> Drivers:
    return SiteDrivers(site)


def refuse_machine_local(site: Site, names: Sequence[str]) -> None:
    """On a worker elsewhere, a SpecError for the first of `names` that is a machine-local pool
    (at once, before anything is made); on the crv machine, nothing."""
    if not site.remote:
        return
    known = config.load(config.config_file(site.home.root))
    for name in names:
        found = known.get(name)
        driver = "manual" if name == "manual" else found.driver if found else None
        if driver in MACHINE_LOCAL:
            raise SpecError(
                "pool",
                name,
                f"cannot be used by a Prefect worker on another machine ({site.describe()}): "
                f"{MACHINE_LOCAL[driver]}; run this change from the crv machine (the served "
                "deployments, or a worker there with CRV_HOME), or use a pool every worker "
                "reaches (docs/workers.md)",
            )


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
async def pool_capacities(
    drivers: Drivers, pools: Sequence[str], group: str | None = None
) -> dict[str, int | None]:
    """How many more nodes each of `pools` can make now (None: no known limit)."""
    return await asyncio.to_thread(capacities, drivers, pools, group)


@task(name="teardown", cache_policy=NO_CACHE, persist_result=False)
async def teardown_cluster(
    drivers: Drivers, service: Service, cluster: str, also: Sequence[str] = ()
) -> Teardown:
    """Destroy every node of the cluster in every pool it uses (and `also`), then forget it."""
    return await asyncio.to_thread(teardown, cluster, drivers, service, also)
