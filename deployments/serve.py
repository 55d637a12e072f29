"""Serving the deployments: register them with the Prefect server and run their flow runs; or,
with a work pool (CRV_WORK_POOL), register them to that pool for Prefect workers to run.

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

On a work pool (`CRV_WORK_POOL=crv crv up`): this process makes the pool if it is missing (type
`process`; another type is refused), registers the deployments to it (deployments.build), makes
sure the server marks Crashed a run whose heartbeats stopped (`ensure_crash_detection`: a worker
killed with its flow-run process leaves nobody to report the crash), then runs no flow at all: it
stays up only to keep the `autoscale/<cluster>` deployments in line, as above, on the same pool.
The workers (`crv worker`, `prefect worker start --pool crv`) run every run, wherever they are.
Served again later (CRV_WORK_POOL unset), a deployment still on a work pool is deleted first and
made again as a served one (its schedules with it: crv's own deployments have none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from crv.base.running import HEARTBEAT_GRACE, work_pool
from deployments import AUTOSCALE_FLOW, WORKER_TAG, autoscale_deployment, build

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.deployments.runner import RunnerDeployment

log = logging.getLogger("crv.serve")

POLL_SECONDS = 2.0  # how soon a run created through the UI or the API starts
REMOVE_WAIT = 60.0  # how long a removal waits for the deployment's PENDING runs to start


def keep_server_settings(deployments: list[RunnerDeployment]) -> None:
    """Registering replaces a deployment's schedules and its paused flag with the ones given:
    leave the schedules out of the update and carry the paused flag over. A deployment still on
    a work pool that is to be served now is deleted first (module doc)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(d.full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name and not d.work_pool_name:
                log.warning(
                    "%s was on work pool %s: made again as a served deployment",
                    d.full_name, existing.work_pool_name,
                )  # fmt: skip
                with contextlib.suppress(ObjectNotFound):
                    client.delete_deployment(existing.id)
                continue
            d.paused = existing.paused
            # an update sends the fields that were set: `schedules` (set to [] by
            # to_deployment) would replace the server's with none
            d.model_fields_set.discard("schedules")


def serve() -> None:
    """Register the deployments and run their flow runs until SIGTERM or Ctrl-C; with a work
    pool, register them to it and keep the autoscale deployments in line (module doc)."""
    from prefect.exceptions import TerminationSignal

    pool = work_pool()
    deployments = build(work_pool=pool)
    keep_server_settings(deployments)
    with contextlib.suppress(KeyboardInterrupt, TerminationSignal):
        asyncio.run(_serve(deployments) if pool is None else _register(deployments, pool))


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
    _record_work_pool(None)
    print(f"serving {', '.join(d.full_name for d in deployments)}", flush=True)
    watch = asyncio.create_task(AutoscaleWatch(runner.aadd_deployment).loop())
    try:
        await runner.start()
    finally:
        watch.cancel()


async def _register(deployments: list[RunnerDeployment], pool: str) -> None:
    """The deployments on work pool `pool`, then the autoscale watch until stopped."""
    await ensure_work_pool(pool)
    await ensure_crash_detection()
    for d in deployments:
        await d.aapply(work_pool_name=pool)
    _record_work_pool(pool)
    names = ", ".join(d.full_name for d in deployments)
    print(f"registered {names} to work pool {pool}; its workers run them", flush=True)

    async def add(d: RunnerDeployment) -> Any:
        return await d.aapply(work_pool_name=pool)

    await AutoscaleWatch(add, pool).loop()


def _record_work_pool(pool: str | None) -> None:
    """Say in CRV_HOME where the deployments went (crv.base.running.registered_work_pool)."""
    from crv.base.home import Home
    from crv.base.running import work_pool_record

    record = work_pool_record(Home.from_env())
    if pool is None:
        record.unlink(missing_ok=True)
    else:
        record.write_text(f"{pool}\n")


async def ensure_work_pool(pool: str) -> None:
    """The work pool, made with a process worker's default job template if it is missing; one
    of another type is refused (crv's flows run as processes where crv is installed)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from crv.base.running import ENV_WORK_POOL, DaemonError

    async with get_client() as client:
        try:
            found = await client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_work_pool(
                    WorkPoolCreate(name=pool, type="process", base_job_template=template)
                )
            log.info("work pool %s: made (type process)", pool)
            return
        if found.type != "process":
            raise DaemonError(
                f"{ENV_WORK_POOL}={pool}: the work pool {pool} is of type {found.type!r}; crv's "
                "deployments need a `process` work pool: name another one"
            )


CRASH_AUTOMATION = "crv: mark Crashed a worker's run whose heartbeats stopped"


async def ensure_crash_detection() -> None:
    """The automation that marks Crashed a run of a work-pool deployment (tag `crv-worker`) whose
    heartbeats stopped for HEARTBEAT_GRACE seconds: its worker was killed with it, or its
    machine went down, and nobody else tells the server (Prefect's own recipe for "zombie"
    runs, scoped to crv's worker runs, which send a heartbeat every HEARTBEAT_SECONDS).
    Made if missing, put back if edited."""
    from datetime import timedelta

    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    ends = ("Completed", "Failed", "Cancelled", "Crashed")
    wanted = AutomationCore(
        name=CRASH_AUTOMATION,
        description="A run of crv's work-pool deployments sends a heartbeat every 30 s; one that "
        f"sent none for {HEARTBEAT_GRACE} s without ending lost its process (a killed worker, "
        "a machine down): it is marked Crashed, so that it shows as what it is. Its cluster's "
        "change slot frees on its own when the run's lease runs out (flows/locks.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{e}" for e in ends)},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{WORKER_TAG}"}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=HEARTBEAT_GRACE),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {HEARTBEAT_GRACE} s: its worker or machine is gone",
            )
        ],
    )
    async with get_client() as client:
        found = await client.read_automations_by_name(CRASH_AUTOMATION)
        if not found:
            await client.create_automation(wanted)
            return
        first, *others = found
        for extra in others:
            await client.delete_automation(extra.id)
        mine = wanted.model_dump(mode="json")
        if {k: v for k, v in first.model_dump(mode="json").items() if k in mine} != mine:
            await client.update_automation(first.id, wanted)


def _interval(deployment: Any) -> float | None:
    """The interval of a deployment's only schedule, if that is what it has."""
    schedules = list(deployment.schedules or [])
    if len(schedules) != 1:
        return None
    interval = getattr(schedules[0].schedule, "interval", None)
    return None if interval is None else interval.total_seconds()


class AutoscaleWatch:
    """Keeps the `autoscale/<cluster>` deployments in line with the store (module doc)."""

    def __init__(
        self, add: Callable[[RunnerDeployment], Awaitable[Any]], work_pool: str | None = None
    ) -> None:
        from crv.base.home import Home

        self.add = add  # registers a deployment (and serves it, when this process serves)
        self.work_pool = work_pool
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
                deployment = await autoscale_deployment(cluster, every, self.work_pool)
                if current is not None:
                    deployment.paused = current.paused
                    if current.work_pool_name and self.work_pool is None:
                        # served again: an update would leave it on the pool (module doc)
                        await remove_deployment(client, current)
                    elif _interval(current) == every:  # keep the schedule as on the server
                        deployment.model_fields_set.discard("schedules")
                await self.add(deployment)
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
