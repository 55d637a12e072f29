"""Serving the deployments: register them with the Prefect server and run their flow runs.

`crv up` runs this as its third background process (`python -m deployments`), `crv serve` in
the foreground. Both need `PREFECT_API_URL` (and `CRV_HOME`) in the environment before Prefect is
imported; every flow run is a child process that inherits that environment, so a run started
from the UI, a schedule or the API finds the same crv home as the CLI.

A deployment registered again (each start) keeps what people set on the server: its schedules
(`prefect deployment schedule create`, the UI) and whether it is paused.

Autoscaling: while it serves, this process makes the `autoscale/<cluster>` deployments match the
clusters' autoscaling settings in the crv store (`crv autoscale enable/disable`), every
POLL_SECONDS: it adds (and from then on runs) the deployment of a cluster enabled, with an
interval schedule of its `every`; applies a new `every`; and deletes the deployment of a cluster
disabled or destroyed. It alone creates and updates those deployments (`crv autoscale disable`
also removes one at once, `enable` resumes a paused one). A pause in the UI is kept.

Removing one (`remove_deployment`) pauses it first and deletes it once none of its runs is
PENDING. A run the runner has taken from the schedule is PENDING while its process starts and
loads the flow through the deployment; deleting the deployment then crashed the run
(ObjectNotFound, seen in the e2e test). Paused first, such a run loads, sees the pause and
decides nothing; Prefect deletes the runs still SCHEDULED on pause and on delete.

A pass reads the settings, then the deployments, then adds or deletes: `crv autoscale
enable/disable` change a setting (and `disable` removes the deployment) under the same file lock
(`Home.autoscale_lock`) as a whole pass, so a pass never acts on a setting read before a change
that finished before it acts. Without it a pass that had read "enabled" just before a `disable`
made the deployment again after `disable` had deleted it (seen in CI: `status` right after
`disable` still showed `autoscale/<cluster>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from deployments import AUTOSCALE_FLOW, autoscale_deployment, build

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner import Runner

log = logging.getLogger("crv.serve")

POLL_SECONDS = 2.0  # how soon a run created through the UI or the API starts
REMOVE_WAIT = 60.0  # how long a removal waits for the deployment's PENDING runs to start


def keep_server_settings(deployments: list[RunnerDeployment]) -> None:
    """Registering replaces a deployment's schedules and its paused flag with the ones given:
    leave the schedules out of the update and carry the paused flag over."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(d.full_name)
            except ObjectNotFound:
                continue
            d.paused = existing.paused
            # an update sends the fields that were set: `schedules` (set to [] by
            # to_deployment) would replace the server's with none
            d.model_fields_set.discard("schedules")


def serve() -> None:
    """Register the deployments and run their flow runs until SIGTERM or Ctrl-C."""
    from prefect.exceptions import TerminationSignal

    deployments = build()
    keep_server_settings(deployments)
    with contextlib.suppress(KeyboardInterrupt, TerminationSignal):
        asyncio.run(_serve(deployments))


async def _serve(deployments: list[RunnerDeployment]) -> None:
    """prefect.serve's work (a Runner with the deployments), with the autoscale watch beside it
    in the same event loop."""
    from prefect.runner import Runner

    runner = Runner(
        pause_on_shutdown=False,  # a schedule should survive `crv down` / `crv up`
        query_seconds=POLL_SECONDS,
    )
    for d in deployments:
        await runner.aadd_deployment(d)
    print(f"serving {', '.join(d.full_name for d in deployments)}", flush=True)
    watch = asyncio.create_task(AutoscaleWatch(runner).loop())
    try:
        await runner.start()
    finally:
        watch.cancel()


def _interval(deployment: Any) -> float | None:
    """The interval of a deployment's only schedule, if that is what it has."""
    schedules = list(deployment.schedules or [])
    if len(schedules) != 1:
        return None
    interval = getattr(schedules[0].schedule, "interval", None)
    return None if interval is None else interval.total_seconds()


class AutoscaleWatch:
    """Keeps the `autoscale/<cluster>` deployments in line with the store (module doc)."""

    def __init__(self, runner: Runner) -> None:
        from crv.base.home import Home

        self.runner = runner
        self.applied: dict[str, float] = {}  # cluster -> the `every` this process applied
        self.lock = Home.from_env().autoscale_lock

    async def loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the service or Prefect restarting: try again
                log.warning("autoscale deployments: %s", exc)
            await asyncio.sleep(POLL_SECONDS)

    async def tick(self) -> None:
        """One pass, under the settings' lock (module doc)."""
        from crv.base.flock import exclusive_async

        async with exclusive_async(self.lock):
            await self._apply()

    async def _apply(self) -> None:
        from prefect import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        wanted = await asyncio.to_thread(_enabled)
        async with get_client() as client:
            found = await client.read_deployments(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[AUTOSCALE_FLOW]))
            )
            existing = {d.name: d for d in found}
            for cluster, every in wanted.items():
                current = existing.get(cluster)
                if current is not None and self.applied.get(cluster) == every:
                    continue
                deployment = await autoscale_deployment(cluster, every)
                if current is not None:
                    deployment.paused = current.paused
                    if _interval(current) == every:  # keep the schedule as it is on the server
                        deployment.model_fields_set.discard("schedules")
                await self.runner.aadd_deployment(deployment)
                self.applied[cluster] = every
                log.info("autoscale/%s: every %g s", cluster, every)
            for name, d in existing.items():
                if name not in wanted:
                    await remove_deployment(client, d)
                    self.applied.pop(name, None)
                    log.info("autoscale/%s: removed", name)


async def remove_deployment(client: PrefectClient, deployment: DeploymentResponse) -> None:
    """Pause, wait until none of its runs is PENDING (up to REMOVE_WAIT), delete (module doc).
    Gone already is fine."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    try:
        if not deployment.paused:
            await client.pause_deployment(deployment.id)
        deadline = time.monotonic() + REMOVE_WAIT
        while await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING]))
            ),
            limit=1,
        ):
            if time.monotonic() > deadline:
                log.warning(
                    "%s: a run still PENDING after %g s; deleting it anyway",
                    deployment.name, REMOVE_WAIT,
                )  # fmt: skip
                break
            await asyncio.sleep(0.5)
        await client.delete_deployment(deployment.id)
    except ObjectNotFound:
        pass


def _enabled() -> dict[str, float]:
    """cluster -> every, of the clusters whose autoscaling is enabled."""
    from crv.base import running as daemons
    from crv.base.home import Home
    from crv.service.client import Service

    home = Home.from_env()
    endpoints = daemons.running(home)
    if endpoints is None:
        raise RuntimeError(f"the crv service is not running for {home.root}")
    settings = Service(home, endpoints.service_url).autoscaling()
    return {s["cluster"]: float(s["every"]) for s in settings if s["enabled"]}
