"""Prefect tasks: one task run per stage (a step kind of one node group and role), each driving
all of that stage's nodes concurrently along the DAG (crv.engine.executor explains why not one task
run per node). A stage's task run fails when any of its nodes failed, naming them."""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from crv.engine.executor import DagRun, Stage, StageFailed, StageSummary
from crv.engine.stages import ClusterRun


async def _run(stage: Stage, dag: DagRun, run: ClusterRun) -> dict[str, Any]:
    summary: StageSummary = await dag.run_stage(stage, run.step)
    if summary.failed or summary.skipped:
        first_step, first_error = (summary.failed or [("", "")])[0]
        detail = f": {first_step}: {first_error}" if first_step else ""
        raise StageFailed(
            f"{stage.label}: {len(summary.failed)} failed, {summary.skipped} not run "
            f"(a step they wait for failed), {summary.ok} ok{detail}"
        )
    # results carry counts only: never tokens, keys or node output
    return {"stage": stage.label, "ok": summary.ok}


def _stage_task(kind: str) -> Any:
    return task(name=kind, cache_policy=NO_CACHE, retries=0, persist_result=False)(_run)


provision = _stage_task("provision")
certify = _stage_task("certify")
contextualize = _stage_task("contextualize")
verify = _stage_task("verify")

BY_KIND = {
    "provision": provision,
    "certify": certify,
    "contextualize": contextualize,
    "verify": verify,
}


@task(name="drain", cache_policy=NO_CACHE, retries=0, persist_result=False)
async def drain(run: ClusterRun, todo: dict[str, list[str]]) -> dict[str, str]:
    """Drain the nodes a shrink removes, all at once; the nodes whose drain failed, and why
    (they are kept). Node output stays in the store, not in the task's result."""
    logger = get_run_logger()
    results = await asyncio.gather(*(run.drain(node, roles) for node, roles in todo.items()))
    kept = {node: why for node, why in zip(todo, results, strict=True) if why is not None}
    for node in todo:
        if node in kept:
            logger.warning("%s is kept: %s", node, kept[node])
        else:
            logger.info("%s drained (%s)", node, ", ".join(todo[node]))
    return kept
