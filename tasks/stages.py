"""Prefect tasks: one task run per stage (a step kind of one node group and role), each driving
all of that stage's nodes concurrently along the DAG (crv.executor explains why not one task
run per node). A stage's task run fails when any of its nodes failed, naming them."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from crv.deploy import ClusterRun
from crv.executor import DagRun, Stage, StageFailed, StageSummary


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
