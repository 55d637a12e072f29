"""The `deploy-appliance` flow: load, plan, then run every stage at once along the DAG.

The flow holds no pool or domain logic: crv.deploy does the steps, crv.executor keeps them on
the DAG's edges, tasks/stages.py makes each stage a task run. The flow adds what Prefect is for:
the run itself, a progress artifact while it runs, a cluster summary table at the end, and a
final state that is Completed only when every role on every node was verified.
"""

from __future__ import annotations

import asyncio
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

from crv import daemons
from crv.appliance import load_appliance, locate
from crv.client import AsyncService
from crv.deploy import ClusterRun, Timeouts
from crv.errors import CrvError
from crv.executor import DagRun, stages
from crv.home import Home
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
) -> dict[str, Any]:
    logger = get_run_logger()
    for listener in STARTED_LISTENERS:
        listener(str(flow_run.id))
    home = Home.from_env()
    endpoints = daemons.running(home)
    if endpoints is None:
        raise DeployFailed(f"the crv service is not running for {home.root}: run `crv up`")
    plan = expand(load_appliance(locate(appliance), parameters or {}), name)
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
        timeouts=Timeouts(boot=boot_timeout, recipe=recipe_timeout),
    )
    dag = DagRun(plan, RetryPolicy(retries=retries))
    logger.info(
        "cluster %s: %d nodes, %d steps, critical path %.1f s",
        plan.cluster,
        len(plan.nodes),
        dag.total,
        plan.critical_seconds,
    )
    started = time.monotonic()
    try:
        await run.start()
        status = await _run_stages(plan, dag, run)
    finally:
        await run.close()
        await service.close()
    elapsed = time.monotonic() - started
    await acreate_table_artifact(
        key=f"cluster-{plan.cluster}",
        table=summary_rows(status),
        description=f"Cluster {plan.cluster} ({plan.appliance.name}) on pool {pool}",
    )
    counts = dag.counts()
    if counts.get("ok", 0) != dag.total:
        raise DeployFailed(failure_message(dag))
    logger.info("cluster %s verified in %.1f s", plan.cluster, elapsed)
    return {
        "cluster": plan.cluster,
        "nodes": len(plan.nodes),
        "steps": dag.total,
        "seconds": round(elapsed, 3),
        "critical_path_seconds": plan.critical_seconds,
    }


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
