"""The deprovision task: one call that tears a whole cluster down (crv.engine.teardown)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from crv.base import running as daemons
from crv.base.home import Home
from crv.engine.placement import Drivers
from crv.engine.teardown import teardown
from crv.service.client import Service
from tasks.policy import task_options


@task(name="deprovision", cache_policy=NO_CACHE, persist_result=False, **task_options())
def deprovision(cluster: str, pool: str) -> dict[str, Any]:
    """Every pool the cluster's record names is swept, and `pool` too."""
    home = Home.from_env()
    endpoints = daemons.running(home)
    if endpoints is None:
        raise daemons.DaemonError(f"the crv service is not running for {home.root}: run `crv up`")
    service = Service(home, endpoints.service_url)
    result = teardown(cluster, Drivers(home), service, [pool])
    return {
        "cluster": result.cluster,
        "appliance": result.appliance,
        "destroyed": result.destroyed,
        "revoked": result.revoked,
    }
