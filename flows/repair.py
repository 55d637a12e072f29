"""The `repair-cluster` flow: bring a cluster back to its records when its pools drifted.

Drift (crv.engine.placement.drift) is what the pools hold for the cluster against what crv recorded:
a node missing from its pool (deleted by hand, lost with its host, stopped) and a node its pool
holds tagged for the cluster that crv has no record of (an orphan). Repair says what it found,
destroys the orphans, then converges the cluster on its recorded appliance, parameters, counts
and placement: a missing node is made again through the normal steps (provision, certify with a
new certificate - the lost machine's is revoked - contextualize, verify), and the roles that read
it run again if what they read changed. It holds the cluster's change slot like any change.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from crv.appliance.loader import load_recorded
from crv.engine.converge import remake
from crv.engine.placement import lapsed, recorded
from crv.engine.stages import Timeouts
from crv.service.client import AsyncService
from flows import events
from flows.converge import (
    WAIT,
    DeployFailed,
    converge,
    raise_if_kept,
    require_cluster,
    running_site,
)
from flows.locks import cluster_change
from tasks.pools import destroy_machine, pool_drift, site_drivers


@flow(name="repair-cluster", persist_result=False, log_prints=True)
async def repair_cluster(
    name: Annotated[str, Field(description="Cluster name")],
    boot_timeout: Annotated[float, Field(gt=0, le=7200)] = 300.0,
    recipe_timeout: Annotated[float, Field(gt=0, le=86400)] = 1800.0,
    retries: Annotated[int, Field(ge=0, le=10)] = 2,
    wait: Annotated[float | None, WAIT] = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    site = running_site()
    home, endpoints = site.home, site.endpoints
    drivers = site_drivers(site)
    async with cluster_change(name, wait=wait):
        status = await require_cluster(name)
        found = await pool_drift(drivers, status)
        if found.unreachable:
            pool, why = next(iter(found.unreachable.items()))
            raise DeployFailed(f"cannot repair {name}: pool {pool} was not reachable: {why}")
        for n in found.missing:
            logger.warning(
                "%s is missing from pool %s (%s): it will be made again", n["name"], n["pool"],
                n["state"],
            )  # fmt: skip
        # nodes whose certificate ended without a re-join: the pool holds a machine that can
        # never be trusted again; it is destroyed here and made again below
        service = AsyncService(home, endpoints.service_url)
        try:
            liveness = await service.liveness(name)
        finally:
            await service.close()
        ended, found.missing = remake(
            found.missing, lapsed(status, liveness, datetime.now(timezone.utc))
        )
        for n in ended:
            logger.warning(
                "%s: its certificate ended at %s and it did not re-join: it will be made again",
                n["name"], n["ended"],
            )  # fmt: skip
            await destroy_machine(drivers, n["pool"], n["name"])
        for n in found.orphans:
            logger.warning(
                "%s in pool %s is tagged for cluster %s but crv has no record of it: destroying it",
                n["name"], n["pool"], name,
            )  # fmt: skip
            await destroy_machine(drivers, n["pool"], n["name"])
            events.node_event(name, status["appliance"], n["pool"], n["name"], "destroyed")
        counts = dict(status.get("counts") or {})
        loaded = load_recorded(status["source"], status["parameters"] or {}, counts)
        result = await converge(
            loaded,
            name,
            recorded(status, loaded),
            counts=counts,
            on_failure="keep",  # a repair that fails leaves what it made for a run again
            timeouts=Timeouts(boot=boot_timeout, recipe=recipe_timeout),
            retries=retries,
        )
        events.cluster_event(
            name, status["appliance"], status["pool"], "repaired",
            remade=[n["name"] for n in found.missing],
            orphans_destroyed=[n["name"] for n in found.orphans],
        )  # fmt: skip
    raise_if_kept(result)
    logger.info(
        "cluster %s repaired: %d nodes made again, %d orphans destroyed",
        name, len(found.missing), len(found.orphans),
    )  # fmt: skip
    return {
        **result,
        "remade": [n["name"] for n in found.missing],
        "orphans_destroyed": [n["name"] for n in found.orphans],
    }
