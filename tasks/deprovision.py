"""The deprovision task: one call that tears a whole cluster down (crv.engine.teardown)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from crv.base import running as daemons
from crv.engine.teardown import teardown
from crv.service.client import Service
from tasks.policy import task_options
from tasks.pools import site_drivers


@task(name="deprovision", cache_policy=NO_CACHE, persist_result=False, **task_options())
def deprovision(cluster: str, pool: str) -> dict[str, Any]:
    """Every pool the cluster's record names is swept, and `pool` too."""
    site = daemons.find_site()
    service = Service(site.home, site.endpoints.service_url)
    result = teardown(cluster, site_drivers(site), service, [pool])
    return {
        "cluster": result.cluster,
        "appliance": result.appliance,
        "destroyed": result.destroyed,
        "revoked": result.revoked,
    }
