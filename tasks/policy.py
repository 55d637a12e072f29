"""The shared retry policy in Prefect's terms, for tasks that are one call (register, destroy).

Stage tasks retry each node-step themselves with the same `RetryPolicy` (crv.engine.executor): a
Prefect retry of a stage would re-run every node of it, the ones that succeeded included.
"""

from __future__ import annotations

from typing import Any

from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task

from crv.base.retry import DEFAULT_POLICY, RetryPolicy


def task_options(policy: RetryPolicy = DEFAULT_POLICY) -> dict[str, Any]:
    def only_temporary(task: Task[Any, Any], run: TaskRun, state: State[Any]) -> bool:
        try:
            state.result()
        except Exception as e:
            return policy.retryable(e)
        return False

    return {
        "retries": policy.retries,
        "retry_delay_seconds": policy.delays(),
        "retry_jitter_factor": policy.jitter,
        "retry_condition_fn": only_temporary,
    }
