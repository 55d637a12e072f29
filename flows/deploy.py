"""The `deploy-appliance` flow: load, plan, then run every stage at once along the DAG.

The flow holds no pool or domain logic: crv.deploy does the steps, crv.executor keeps them on
the DAG's edges, tasks/stages.py makes each stage a task run. The flow adds what Prefect is for:
the run itself, a progress artifact while it runs, a cluster summary table at the end, and a
final state that is Completed only when every role on every node was verified.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.runtime import flow_run
from pydantic import Field

from crv import daemons, events
from crv.appliance import load_appliance, locate, with_counts
from crv.client import AsyncService, ServiceError
from crv.deploy import ClusterRun, Timeouts
from crv.errors import CrvError
from crv.executor import DagRun, StepResult, stages
from crv.home import Home
from crv.locks import cluster_change
from crv.pki import CertificateAuthority
from crv.plan import Plan, expand
from crv.retry import RetryPolicy
from pools import get_pool
from tasks.stages import BY_KIND

# In-process observers (the CLI's progress bar); a flow started from the UI has none.
PROGRESS_LISTENERS: list[Callable[[DagRun], None]] = []
STARTED_LISTENERS: list[Callable[[str], None]] = []


class DeployFailed(CrvError):
    pass


# Every flow that changes a cluster holds its change slot (crv.locks) for its whole run.
WAIT = Field(
    ge=0,
    description="Seconds to wait while another change of this cluster runs (empty: as long as "
    "it takes; 0: refuse at once)",
)


def failure_message(dag: DagRun) -> str:
    failures = dag.failures()
    if not failures:
        return "deploy did not finish"
    first = min(failures, key=lambda f: f[2].finished or 0.0)
    sid, _, result = first
    more = f" (and {len(failures) - 1} more failed steps)" if len(failures) > 1 else ""
    return f"{sid} failed after {result.attempts} attempts: {result.error}{more}"


def summary_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "node": n["name"],
            "group": n["group"],
            "address": n["address"] or "",
            "state": n["state"],
            "roles": ", ".join(f"{r}={v['state']}" for r, v in n["roles"].items()),
        }
        for n in status["nodes"]
    ]


@flow(name="deploy-appliance", persist_result=False, log_prints=True)
async def deploy_appliance(
    appliance: Annotated[str, Field(description="Appliance directory or catalog name (webfarm)")],
    pool: Annotated[str, Field(description="Resource pool")] = "local",
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
) -> dict[str, Any]:
    for listener in STARTED_LISTENERS:
        listener(str(flow_run.id))
    home, endpoints = running_service()
    loaded = load_appliance(locate(appliance), parameters or {})
    cluster = name or loaded.name
    expand(with_counts(loaded, counts or {}), cluster)  # bad input fails before the wait
    async with cluster_change(cluster, wait=wait):
        if counts is None:  # a deploy again of a resized cluster keeps the size it was given
            service = AsyncService(home, endpoints.service_url)
            try:
                counts = dict(await _recorded_counts(service, cluster, loaded.name))
            finally:
                await service.close()
        plan = expand(with_counts(loaded, counts), cluster)
        return await converge(
            plan,
            pool,
            counts=counts,
            timeouts=Timeouts(boot=boot_timeout, recipe=recipe_timeout),
            retries=retries,
        )


def running_service() -> tuple[Home, daemons.Endpoints]:
    home = Home.from_env()
    endpoints = daemons.running(home)
    if endpoints is None:
        raise DeployFailed(f"the crv service is not running for {home.root}: run `crv up`")
    return home, endpoints


async def _recorded_counts(service: AsyncService, cluster: str, appliance: str) -> dict[str, int]:
    try:
        status = await service.status(cluster)
    except ServiceError as e:
        if e.status == 404:
            return {}
        raise
    return dict(status.get("counts") or {}) if status["appliance"] == appliance else {}


async def converge(
    plan: Plan,
    pool: str,
    *,
    counts: dict[str, int],
    timeouts: Timeouts,
    retries: int,
) -> dict[str, Any]:
    """Bring the cluster to `plan`: every step along the DAG, skipping what is already done
    (deploy, resume and resize all come here). Completed only when every verify passed."""
    logger = get_run_logger()
    home, endpoints = running_service()
    pool_driver = get_pool(pool, home.pool_dir(pool))
    ca = CertificateAuthority.create_or_load(home.ca_dir)
    service = AsyncService(home, endpoints.service_url)
    run = ClusterRun(
        plan,
        pool_driver,
        service,
        service_url=endpoints.service_url,
        ca_pem=ca.certificate_pem.decode(),
        ca_sha256=ca.fingerprint_sha256,
        ca_file=str(home.ca_file),
        timeouts=timeouts,
        counts=counts,
    )
    dag = DagRun(plan, RetryPolicy(retries=retries))
    logger.info(
        "cluster %s: %d nodes, %d steps, critical path %.1f s",
        plan.cluster,
        len(plan.nodes),
        dag.total,
        plan.critical_seconds,
    )
    emit_cluster = functools.partial(events.cluster_event, plan.cluster, plan.appliance.name, pool)
    emit_cluster("deploying", nodes=len(plan.nodes), steps=dag.total)
    dag.step_listeners.append(_node_milestones(plan, pool))
    started = time.monotonic()
    try:
        await run.start()
        status = await _run_stages(plan, dag, run)
    finally:
        await run.close()
        await service.close()
    elapsed = time.monotonic() - started
    await publish_summary(plan.cluster, status)
    counted = dag.counts()
    if counted.get("ok", 0) != dag.total:
        message = failure_message(dag)
        emit_cluster("failed", error=message, seconds=round(elapsed, 3))
        raise DeployFailed(message)
    emit_cluster("ready", nodes=len(plan.nodes), seconds=round(elapsed, 3))
    logger.info("cluster %s verified in %.1f s", plan.cluster, elapsed)
    return {
        "cluster": plan.cluster,
        "nodes": len(plan.nodes),
        "steps": dag.total,
        "seconds": round(elapsed, 3),
        "critical_path_seconds": plan.critical_seconds,
    }


def _node_milestones(plan: Plan, pool: str) -> Callable[[str, StepResult], None]:
    """A step listener that emits `crv.node.verified` when a node's last step passed and
    `crv.node.failed` when one of its steps failed for good."""
    left: dict[str, int] = {}
    for _, d in plan.steps():
        left[d["node"]] = left.get(d["node"], 0) + 1

    def on_step(sid: str, result: StepResult) -> None:
        d = plan.graph.nodes[sid]
        node = d["node"]
        if result.state == "ok":
            left[node] -= 1
            if left[node] == 0:
                events.node_event(plan.cluster, plan.appliance.name, pool, node, "verified")
        elif result.state == "failed":
            events.node_event(
                plan.cluster, plan.appliance.name, pool, node, "failed",
                step=sid, attempts=result.attempts, error=result.error,
            )  # fmt: skip

    return on_step


async def publish_summary(cluster: str, status: dict[str, Any]) -> None:
    """The cluster summary table artifact; every flow that changes the cluster updates it."""
    await acreate_table_artifact(
        key=f"cluster-{cluster}",
        table=summary_rows(status),
        description=f"Cluster {cluster} ({status['appliance']}) on pool {status['pool']}: "
        f"{len(status['nodes'])} nodes, {'ready' if status['ready'] else 'not ready'}",
    )


async def _run_stages(plan: Plan, dag: DagRun, run: ClusterRun) -> dict[str, Any]:
    progress_id = await acreate_progress_artifact(
        progress=0.0, key=f"deploy-{plan.cluster}", description="steps done"
    )
    dirty = asyncio.Event()
    dag.listeners.append(lambda _: dirty.set())
    dag.listeners.extend(PROGRESS_LISTENERS)

    async def publish_progress() -> None:
        while True:
            await dirty.wait()
            dirty.clear()
            done = sum(dag.counts().values())
            await aupdate_progress_artifact(progress_id, progress=100.0 * done / dag.total)
            await asyncio.sleep(1.0)  # at most one update a second, whatever the size

    publisher = asyncio.create_task(publish_progress())
    try:
        calls = [
            BY_KIND[s.kind].with_options(task_run_name=s.label)(s, dag, run) for s in stages(plan)
        ]
        await asyncio.gather(*calls, return_exceptions=True)
    finally:
        publisher.cancel()
        done = sum(dag.counts().values())
        await aupdate_progress_artifact(progress_id, progress=100.0 * done / dag.total)
    return await run.service.status(plan.cluster)
