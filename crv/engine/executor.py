"""Runs a plan's steps exactly along its edges: each step starts when its own predecessors are
done, never when a whole stage is.

Prefect task runs are the unit the UI shows, but one task run per node-step does not reach a
thousand nodes (measured ~30x the critical path, docs/deploy.md). So a task run drives a *stage*
(one step kind of one group, and one role) and, inside it, every node's step is its own
coroutine that waits only on that node's predecessors in the DAG. Stages therefore overlap
freely, no node waits for a sibling, and each node-step keeps its own outcome, retries and
error, which the flow turns into the summary and the failure message.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from crv.appliance.plan import Plan
from crv.base.errors import CrvError
from crv.base.retry import RetryPolicy

StepFn = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Stage:
    kind: str
    group: str
    role: str | None
    steps: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.group}{'/' + self.role if self.role else ''}]"


@dataclass
class StepResult:
    state: str  # "ok", "failed", "skipped"
    attempts: int = 0
    error: str | None = None
    started: float | None = None
    finished: float | None = None


@dataclass
class StageSummary:
    label: str
    ok: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (step, error)
    skipped: int = 0


class StageFailed(CrvError):
    """Raised by a stage after all its nodes ran, when some failed or could not run."""


class Halted(CrvError):
    """A step not run, or given up, because its node was quarantined or the change was
    stopped by its brake (crv.engine.converge.brake): it is skipped, not failed."""


def stages(plan: Plan) -> list[Stage]:
    """Stages in the plan's topological order of their first step (for a readable UI)."""
    by_key: dict[tuple[str, str, str | None], list[str]] = {}
    for sid, d in plan.steps():
        key = (d["kind"], plan.nodes[d["node"]].group, d["role"])
        by_key.setdefault(key, []).append(sid)
    return [Stage(k, g, r, tuple(s)) for (k, g, r), s in by_key.items()]


class DagRun:
    def __init__(self, plan: Plan, policy: RetryPolicy) -> None:
        self.plan = plan
        self.policy = policy
        loop = asyncio.get_running_loop()
        self._done: dict[str, asyncio.Future[bool]] = {
            sid: loop.create_future() for sid in plan.graph
        }
        self.results: dict[str, StepResult] = {}
        self.listeners: list[Callable[[DagRun], None]] = []
        self.step_listeners: list[Callable[[str, StepResult], None]] = []  # each finished step
        self.started = time.monotonic()
        self.halted: str | None = None  # why no step starts any more (the brake)
        self.halted_steps = 0  # steps the brake kept from starting
        self._stopped: dict[str, str] = {}  # node -> why none of its steps starts any more

    def halt(self, reason: str) -> None:
        """From now on no step starts (those running finish); the first reason stays."""
        if self.halted is None:
            self.halted = reason

    def stop_node(self, node: str, reason: str) -> None:
        """From now on no step of `node` starts (a quarantined node)."""
        self._stopped.setdefault(node, reason)

    @property
    def total(self) -> int:
        return len(self._done)

    def counts(self) -> Counter[str]:
        return Counter(r.state for r in self.results.values() if r.finished is not None)

    def skip_all(self, reason: str) -> None:
        """Fail every step not yet finished (the run was aborted)."""
        for sid, fut in self._done.items():
            if not fut.done():
                self.results[sid] = StepResult("skipped", error=reason, finished=time.monotonic())
                fut.set_result(False)

    async def run_stage(self, stage: Stage, fn: StepFn) -> StageSummary:
        outcomes = await asyncio.gather(*(self._run_step(sid, fn) for sid in stage.steps))
        summary = StageSummary(stage.label)
        for sid, result in zip(stage.steps, outcomes, strict=True):
            if result.state == "ok":
                summary.ok += 1
            elif result.state == "skipped":
                summary.skipped += 1
            else:
                summary.failed.append((sid, result.error or "failed"))
        return summary

    async def _run_step(self, sid: str, fn: StepFn) -> StepResult:
        preds = [self._done[p] for p in self.plan.graph.pred[sid]]
        if preds and not all(await asyncio.gather(*preds)):
            return self._finish(sid, StepResult("skipped", error="a step it waits for failed"))
        node = self.plan.graph.nodes[sid]["node"]
        result = StepResult("ok", started=time.monotonic())
        for attempt in range(self.policy.retries + 1):
            why = self._stopped.get(node) or self.halted
            if why is not None:
                self.halted_steps += node not in self._stopped
                return self._finish(sid, StepResult("skipped", attempt, why))
            result.attempts = attempt + 1
            try:
                await fn(sid)
                return self._finish(sid, result)
            except asyncio.CancelledError:
                raise
            except Halted as e:
                self.halted_steps += self.halted is not None and node not in self._stopped
                return self._finish(sid, StepResult("skipped", result.attempts, str(e)))
            except Exception as e:  # every failure is recorded per node, never lost
                result.error = str(e) if isinstance(e, CrvError) else f"{type(e).__name__}: {e}"
                if attempt == self.policy.retries or not self.policy.retryable(e):
                    break
                await asyncio.sleep(self.policy.delay(attempt, e))
        result.state = "failed"
        return self._finish(sid, result)

    def _finish(self, sid: str, result: StepResult) -> StepResult:
        result.finished = time.monotonic()
        self.results[sid] = result
        self._done[sid].set_result(result.state == "ok")
        for step_listener in self.step_listeners:
            step_listener(sid, result)
        for listener in self.listeners:
            listener(self)
        return result

    def failures(self) -> list[tuple[str, dict[str, Any], StepResult]]:
        return [
            (sid, self.plan.graph.nodes[sid], r)
            for sid, r in self.results.items()
            if r.state == "failed"
        ]
