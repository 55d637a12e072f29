"""The guards in the autoscale flow: a cluster's lease, idle_after and node-hours budget
(crv.engine.guards decides; this module announces, acts and records).

The autoscale flow calls `enforce` once per run, inside the cluster's change slot, before its
groups decide. It reads every scaled group's metric or queue (the groups' decisions then use
the same readings), remembers when work was last seen, asks the usage ledger for today's
node-hours, and takes the guards' verdicts:

- **announce**: the Prefect event `crv.cluster.guard-warning` on the cluster (payload: guard,
  action, acts_at as a Unix time and in ISO, reason), a warning in the run's log, and a "none"
  decision with the reason for each scaled group. Once per occurrence: the announcements that
  are out are kept with the autoscaling setting (the admin API's guard state), so later runs
  wait for the announced time instead of announcing again. One that no longer holds (work seen
  again, the lease set again, the guard cleared) is withdrawn: `crv.cluster.guard-withdrawn`.
- **act**, never before `warn_before` after the announcement: `shrink` resizes every scaled
  group above its `scale.min` to it, each a "shrink" decision with the guard's reason, through
  flows.scale.resize (so through the approval gate, as `guard: <name>`); a queue-scaled group
  loses only nodes that run no job. `destroy` (the lease) records a "destroy" decision per
  scaled group, asks the approval gate for every group (flows.approval.gate, `guard: lease`),
  then tears the cluster down as the destroy-cluster flow does (`crv.cluster.destroyed`): the
  run ends there. The store's decisions go with the cluster; the run's `autoscale-<cluster>`
  artifact, its result and the events keep the record. Then `crv.cluster.guard-acted`.
- **hold**: a growth is refused ("none", with the reason, no cooldown) once the lease has run,
  or made smaller or refused when it would spend more than is left of the day's budget
  (`Guarded.limit`, which the groups' decisions call).

A rejected (or unanswered) approval leaves the cluster as it is: the announcement is dropped, so
the guard announces again and acts `warn_before` later.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from prefect import get_run_logger

from crv.appliance.loader import Appliance
from crv.appliance.spec import Scaling
from crv.engine import guards
from crv.engine.autoscale import Decision, Memory, QueueReading, Reading, node_class
from crv.engine.placement import recorded, release_order
from crv.service.client import AsyncService
from crv.service.models import ClusterStatus
from flows import events
from flows.approval import Rejected, gate
from flows.converge import require_cluster
from tasks.deprovision import deprovision

GUARD_WARNING = "crv.cluster.guard-warning"
GUARD_ACTED = "crv.cluster.guard-acted"
GUARD_WITHDRAWN = "crv.cluster.guard-withdrawn"
GUARD_EVENTS = frozenset({GUARD_WARNING, GUARD_ACTED, GUARD_WITHDRAWN})


class GuardedRun(Protocol):
    """What `enforce` needs of the autoscale flow's run (flows.autoscale._Run)."""

    service: AsyncService
    cluster: str
    rows: list[dict[str, Any]]
    done: set[str]

    async def memory(self, group: str) -> tuple[Memory, dict[str, Any] | None]: ...

    async def record(self, group: str, d: Decision, outcome: str | None = None) -> int: ...

    async def act(self, status: ClusterStatus, group: str, d: Decision, by: str) -> str: ...

    async def read(self, group: str, scaling: Scaling) -> Reading | QueueReading: ...


@dataclass
class Guarded:
    """What the guards leave to the groups' own decisions in this run."""

    settings: guards.Settings = field(default_factory=guards.Settings)
    hold: str | None = None  # no growth, and why (the lease has run)
    used: float = 0.0  # node-hours today (UTC) at the start of the run
    every: float = 60.0  # the schedule's interval
    destroyed: bool = False  # the lease destroyed the cluster: the run ends

    def limit(self, d: Decision, nodes: int, scaling: Scaling, before: Memory) -> Decision:
        """A group's growth as the guards allow it (`nodes`: the cluster's nodes now)."""
        d = guards.held(d, self.hold, before)
        if self.settings.budget is None:
            return d
        seconds = guards.horizon(scaling, self.every, d.at)
        return guards.within_budget(d, self.settings.budget, self.used, nodes, seconds, before)


async def enforce(run: GuardedRun, status: ClusterStatus, loaded: Appliance) -> Guarded:
    """Announce, act and hold for the cluster's guards (module doc); inside the change slot."""
    setting = await run.service.guards(run.cluster)
    settings = guards.Settings.of(setting)
    if not settings.any:
        return Guarded(settings)
    autoscaling = await run.service.autoscaling()
    every = next((a["every"] for a in autoscaling if a["cluster"] == run.cluster), None)
    logger = get_run_logger()
    now = time.time()
    readings = {}
    for g in loaded.scaled:
        assert g.scaling is not None
        readings[g.name] = await run.read(g.name, g.scaling)
    seen, work = guards.work_seen(readings, now, setting.get("work_seen"))
    used = float((await run.service.usage(run.cluster))["node_hours"])
    counts = [
        (g.name, sum(1 for n in status["nodes"] if n["group"] == g.name), g.scale_min)
        for g in loaded.scaled
    ]
    facts = guards.Facts(
        now, seen, used, len(status["nodes"]), guards.above_min(counts),
        guards.notices_of(setting.get("notices")),
    )  # fmt: skip
    judgement = guards.judge(settings, facts)
    logger.info("cluster %s: guards: %s; %.3f node-hours used today (UTC)", run.cluster, work, used)
    resource = events.cluster_resource(run.cluster, status["appliance"], status["pool"])
    for v in judgement.verdicts:
        if v.withdraw:
            old = facts.notices[v.guard]
            logger.info("cluster %s: guard %s: withdrawn: %s", run.cluster, v.guard, v.reason)
            payload = {"guard": v.guard, "action": old.action, "announced": old.text,
                       "reason": v.reason}  # fmt: skip
            events._emit(GUARD_WITHDRAWN, resource, [], payload)
            await _note(run, counts, f"guard {v.guard}: withdrawn: {v.reason}")
        if v.announce and v.notice is not None:
            logger.warning("cluster %s: guard %s: %s", run.cluster, v.guard, v.reason)
            events._emit(GUARD_WARNING, resource, [], _announced(v.notice))
            await _note(run, counts, f"guard {v.guard}: {v.reason}")
    acting = judgement.acting()
    notices = judgement.notices()
    if acting is not None:  # its announcement is spent (a rejection announces again)
        for v in judgement.verdicts:
            if v.act and v.action == acting.action:
                notices.pop(v.guard, None)
    rows = {guard: n.row() for guard, n in notices.items()}
    if seen != setting.get("work_seen") or rows != (setting.get("notices") or {}):
        await run.service.put_guard_state(run.cluster, seen, rows)
    out = Guarded(settings, judgement.hold, used, float(every or 60.0))
    if acting is None:
        return out
    logger.warning("cluster %s: guard %s: %s", run.cluster, acting.guard, acting.reason)
    if acting.action == "destroy":
        out.destroyed = await _destroy(run, status, loaded, acting, resource)
    else:
        await _shrink(run, status, loaded, acting, readings, resource)
    return out


def _announced(notice: guards.Notice) -> dict[str, Any]:
    """The payload of a guard's warning event."""
    acts_at = datetime.fromtimestamp(notice.acts_at, timezone.utc).isoformat()
    return {"guard": notice.guard, "action": notice.action, "acts_at": acts_at,
            "acts_at_unix": notice.acts_at, "announced_unix": notice.announced,
            "reason": notice.text}  # fmt: skip


async def _note(run: GuardedRun, counts: list[tuple[str, int, int]], reason: str) -> None:
    """A "none" decision with a guard's word for each scaled group (its memory unchanged)."""
    for group, current, _ in counts:
        memory, _row = await run.memory(group)
        d = Decision(time.time(), None, current, current, current, "none", reason, memory)
        await run.record(group, d)
        run.done.discard(group)  # the group still decides in this run


async def _shrink(
    run: GuardedRun,
    status: ClusterStatus,
    loaded: Appliance,
    verdict: guards.Verdict,
    readings: Mapping[str, Reading | QueueReading],
    resource: dict[str, str],
) -> None:
    """Every scaled group above its minimum to it (a queue's: only nodes that run no job)."""
    outcomes: dict[str, str] = {}
    for g in loaded.scaled:
        status = await require_cluster(run.cluster)
        mine = [n for n in status["nodes"] if n["group"] == g.name]
        current = len(mine)
        if current <= g.scale_min:
            continue
        memory, _ = await run.memory(g.name)
        now = time.time()
        after = Memory(memory.last_scale_up, low_since=now, last_action=now)
        reason = f"guard {verdict.guard}: {verdict.reason}"
        remove: tuple[str, ...] = ()
        reading = readings.get(g.name)
        if isinstance(reading, QueueReading):  # never a node that runs a job
            order = release_order(recorded(status, loaded), g.name, mine)
            free = [n for n in order if node_class(reading.states.get(n)) != "busy"]
            remove = tuple(free[: current - g.scale_min])
            if not remove:
                d = Decision(now, None, current, g.scale_min, current, "none",
                             f"{reason}; every node runs jobs", memory)  # fmt: skip
                await run.record(g.name, d)
                outcomes[g.name] = "every node runs jobs"
                continue
            if len(remove) < current - g.scale_min:
                reason += f"; only {len(remove)} run no job"
            reason += f"; removing {', '.join(remove)}"
        target = current - len(remove) if remove else g.scale_min
        d = Decision(now, None, current, g.scale_min, target, "shrink", reason, after, remove)
        outcomes[g.name] = await run.act(status, g.name, d, by=f"guard: {verdict.guard}")
    payload = {"guard": verdict.guard, "action": "shrink", "reason": verdict.reason,
               "groups": outcomes}  # fmt: skip
    events._emit(GUARD_ACTED, resource, [], payload)


async def _destroy(
    run: GuardedRun,
    status: ClusterStatus,
    loaded: Appliance,
    verdict: guards.Verdict,
    resource: dict[str, str],
) -> bool:
    """The lease's destroy, after the approval gate of every group; whether it was done."""
    logger = get_run_logger()
    reason = f"guard {verdict.guard}: {verdict.reason}"
    seqs: dict[str, int] = {}
    for g in loaded.scaled:
        current = sum(1 for n in status["nodes"] if n["group"] == g.name)
        memory, _ = await run.memory(g.name)
        d = Decision(time.time(), None, current, 0, 0, "destroy", reason, memory)
        seqs[g.name] = await run.record(g.name, d)
    by = f"guard: {verdict.guard}"
    try:
        for group in loaded.groups:  # every node goes: each group is gated as its shrink to 0
            names = [n["name"] for n in status["nodes"] if n["group"] == group]
            await gate(
                run.cluster, group, len(names), names, loaded.approval, by=by,
                appliance=status["appliance"], pool=status["pool"],
            )  # fmt: skip
    except Rejected as exc:
        outcome = f"rejected: {exc}"
        for seq in seqs.values():
            await run.service.set_outcome(run.cluster, seq, outcome)
        _outcomes(run, seqs, outcome)
        logger.warning("cluster %s: the lease's destroy was %s", run.cluster, outcome)
        payload = {"guard": verdict.guard, "action": "destroy", "reason": verdict.reason,
                   "outcome": outcome}  # fmt: skip
        events._emit(GUARD_ACTED, resource, [], payload)
        return False
    result: dict[str, Any] = deprovision(run.cluster, status["pool"])
    outcome = f"destroyed: {result['destroyed']} nodes removed, {result['revoked']} " + (
        "certificates revoked"
    )
    _outcomes(run, seqs, outcome)  # the store's decisions went with the cluster
    events.cluster_event(
        run.cluster, status["appliance"], status["pool"], "destroyed",
        nodes=result["destroyed"], revoked=result["revoked"], by=by,
    )  # fmt: skip
    payload = {"guard": verdict.guard, "action": "destroy", "reason": verdict.reason,
               "outcome": outcome}  # fmt: skip
    events._emit(GUARD_ACTED, resource, [], payload)
    logger.warning("cluster %s: %s (%s)", run.cluster, outcome, reason)
    return True


def _outcomes(run: GuardedRun, seqs: Mapping[str, int], outcome: str) -> None:
    """The run's rows (its artifact and result) of the destroy decisions get `outcome`."""
    for row in run.rows:
        if row["group"] in seqs and row["action"] == "destroy":
            row["outcome"] = outcome
