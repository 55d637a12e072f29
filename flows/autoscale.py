"""The `autoscale` flow: size each node group that has a `scaling` section from its metric.

One run takes one decision per scaled group and records every one of them, "none" included, in
the store (`crv autoscale status`, the admin API) and in the cluster's `autoscale-<cluster>`
table artifact. The rules are crv.engine.autoscale.decide, the same the what-if replay uses; what a
decision needs from the ones before it (when the group last grew, since when the metric has
asked for fewer nodes) is read back from the group's newest recorded decision, so a run carries
no state of its own.

A run holds the cluster's change slot (flows.locks) from reading the cluster to the end of the
resize, so it never interleaves with a deploy, resize, repair or destroy: with `wait=0` (the
schedule's default) a run that finds another change under way records "skipped" and ends; the
next scheduled run decides again. The resize itself is flows.scale.resize, the scale-role
flow's: new nodes go through every step, and a shrink takes its victims in
crv.engine.placement.release_order (the last preferred pool first, then idle-first by the `busy`
attribute the group's roles publish, then the newest), runs their `drain` recipes (a node whose
drain fails is kept and reported in the decision's outcome), re-runs the dependents without
them, and only then destroys them.

Before the groups decide, the cluster's guards (a lease, idle_after, a node-hours budget per
day) are enforced in the same slot by flows.guards: announced a few minutes ahead as Prefect
events, then acted on (the cluster destroyed, or its scaled groups shrunk to their minimum),
each recorded as a decision with its reason; a growth a guard holds is "none" with the reason.

`crv autoscale enable NAME --every 60s` records the setting with the cluster; the serve process
(deployments.serve) makes a deployment `autoscale/NAME` with that interval, which the Prefect UI
shows and can pause like any other.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from prefect.runtime import flow_run
from pydantic import Field

from crv.appliance.loader import NOT_SCALED, Appliance, load_recorded
from crv.appliance.spec import QUEUE_KEYS, Scaling
from crv.base.errors import CrvError
from crv.base.home import Home
from crv.base.states import NodeState
from crv.engine import autoscale as policy
from crv.engine.placement import recorded, release_order
from crv.engine.stages import Timeouts
from crv.service.client import AsyncService, ServiceError
from crv.service.models import ClusterStatus
from crv.service.store import natural_key
from flows import guards
from flows.approval import Rejected
from flows.converge import (
    WAIT,
    DeployFailed,
    publish_summary,
    require_cluster,
    running_service,
    running_site,
    status_of,
)
from flows.locks import ClusterBusy, cluster_change
from flows.scale import resize
from tasks.pools import pool_capacities, site_drivers

HTTP_LIMIT = 64 * 1024  # bytes of an HTTP metric's answer that are read
HTTP_TIMEOUT = 10.0


@flow(name="autoscale", persist_result=False, log_prints=True)
async def autoscale(
    name: Annotated[str, Field(description="Cluster name")],
    wait: Annotated[float | None, WAIT] = 0.0,
    boot_timeout: Annotated[float, Field(gt=0, le=7200)] = 300.0,
    recipe_timeout: Annotated[float, Field(gt=0, le=86400)] = 1800.0,
    retries: Annotated[int, Field(ge=0, le=10)] = 2,
) -> dict[str, Any]:
    logger = get_run_logger()
    home, endpoints = running_service()
    service = AsyncService(home, endpoints.service_url)
    try:
        stopped = await _stopped_schedule(service, name)
        if stopped is not None:
            why = STOPPED[stopped]
            logger.info("cluster %s: %s; this scheduled run decides nothing", name, why)
            return {"cluster": name, "decisions": [], stopped: True}
        status = await require_cluster(name)
        scaled = _scaled_groups(name, status)
        run = _Run(service, name, Timeouts(boot=boot_timeout, recipe=recipe_timeout), retries)
        guarded = guards.Guarded()
        try:
            try:
                async with cluster_change(name, wait=wait):
                    status = await require_cluster(name)  # the guards first (flows.guards)
                    guarded = await guards.enforce(run, status, _loaded(status))
                    for group in scaled:
                        if guarded.destroyed:
                            break
                        if group in run.done:  # a guard shrank it in this run
                            continue
                        status = await require_cluster(name)
                        await run.group(status, group, guarded)
            except ClusterBusy as busy:
                logger.info("cluster %s: %s; skipped", name, busy)
                counts = {g.name: g.count for g in _loaded(status).groups.values()}
                for group in scaled:
                    if group not in run.done:
                        await run.skipped(group, counts[group], f"skipped: {busy}")
        except (ServiceError, DeployFailed):
            # destroyed meanwhile (the change that held it was its destroy): nothing to decide
            if await status_of(service, name) is not None:
                raise
            logger.info("cluster %s: destroyed during this run; it decides nothing more", name)
            return {"cluster": name, "decisions": run.rows, "destroyed": True}
        await acreate_table_artifact(
            key=f"autoscale-{name}",
            table=run.rows,
            description=f"Autoscale decisions of cluster {name}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}",
        )
        if guarded.destroyed:  # its lease ended: the artifact keeps the record (flows.guards)
            return {"cluster": name, "decisions": run.rows, "destroyed": True, "guard": "lease"}
        await _draw(service, home, name, _loaded(status), run)
    finally:
        await service.close()
    if run.failed:
        raise DeployFailed("; ".join(run.failed))
    return {"cluster": name, "decisions": run.rows}


PLOT_EVERY = 60.0  # seconds: a group's plot is redrawn after an action, else at most this often
PLOT_DECISIONS = 1000  # the newest decisions a plot shows


async def _draw(
    service: AsyncService, home: Home, cluster: str, loaded: Appliance, run: _Run
) -> None:
    """Redraw each scaled group's plot (nodes against its metric or queue over time, from the
    recorded decisions: crv.base.home.Home.autoscale_plot) after an action, or when it is older
    than PLOT_EVERY; then the cluster's summary artifact, which links the plots. A plot that
    cannot be drawn is logged, never fails the run."""
    acted = {r["group"] for r in run.rows if r["action"] != "none"}
    drawn = False
    for group in loaded.scaled:
        path = home.autoscale_plot(cluster, group.name)
        try:
            fresh = time.time() - path.stat().st_mtime < PLOT_EVERY
        except OSError:
            fresh = False
        if fresh and group.name not in acted:
            continue
        rows = await service.decisions(cluster, group.name, limit=PLOT_DECISIONS)
        if not rows:
            continue
        queue = group.scaling is not None and group.scaling.queue is not None
        label = "nodes the waiting jobs ask for" if queue else "metric"
        title = f"cluster {cluster}, group {group.name}: nodes and {label}"
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            await asyncio.to_thread(policy.plot, policy.recorded(rows), path, title, label)
        except (OSError, ValueError) as exc:
            get_run_logger().warning("the autoscaling plot %s was not drawn: %s", path, exc)
            continue
        drawn = True
    if drawn:
        await publish_summary(cluster, await require_cluster(cluster))


STOPPED = {
    "paused": "the deployment is paused",
    "removed": "the deployment is removed",
    "disabled": "autoscaling is disabled or the cluster is gone",
}


async def _stopped_schedule(service: AsyncService, name: str) -> str | None:
    """Why this run, if it came from the deployment's schedule, must not decide (a key of
    STOPPED): its deployment is paused or removed, or the cluster's autoscaling setting is off
    or gone (`crv autoscale disable`, `crv destroy`; the serve process removes the deployment
    soon after). Pausing or deleting a deployment deletes its scheduled runs, but not one the
    scheduler was inserting meanwhile (a loaded CI machine saw two minutes of them) nor one the
    runner had taken already. A run started by hand (UI, API) still decides."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    if flow_run.id is None:  # called as a plain function or a subflow: no schedule
        return None
    async with get_client() as client:
        run = await client.read_flow_run(flow_run.id)
        if not run.auto_scheduled or run.deployment_id is None:
            return None
        try:  # a run keeps its deployment's id after the deployment is deleted
            deployment = await client.read_deployment(run.deployment_id)
        except ObjectNotFound:
            return "removed"
    if deployment.paused:
        return "paused"
    if not any(s["cluster"] == name and s["enabled"] for s in await service.autoscaling()):
        return "disabled"
    return None


def _scaled_groups(name: str, status: ClusterStatus) -> list[str]:
    scaled = [g.name for g in _loaded(status).scaled]
    if not scaled:
        raise DeployFailed(f"cluster {name}: its appliance {status['appliance']}: {NOT_SCALED}")
    return scaled


def _loaded(status: ClusterStatus) -> Appliance:
    return load_recorded(status["source"], status["parameters"] or {}, status.get("counts") or {})


class _Run:
    """One run's decisions, recorded as they are taken."""

    def __init__(self, service: AsyncService, cluster: str, timeouts: Timeouts, retries: int):
        self.service, self.cluster = service, cluster
        self.timeouts, self.retries = timeouts, retries
        self.rows: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self.failed: list[str] = []
        self.logger = get_run_logger()
        self.readings: dict[str, policy.Reading | policy.QueueReading] = {}

    async def read(self, group: str, scaling: Scaling) -> policy.Reading | policy.QueueReading:
        """The group's metric or queue, read once per run (the guards and the group's decision
        see the same reading)."""
        if group not in self.readings:
            if scaling.queue is not None:
                self.readings[group] = await read_queue(self.service, self.cluster, scaling)
            else:
                self.readings[group] = await read_metric(self.service, self.cluster, scaling)
        return self.readings[group]

    async def memory(self, group: str) -> tuple[policy.Memory, dict[str, Any] | None]:
        last = await self.service.decisions(self.cluster, group, limit=1)
        if not last:
            return policy.Memory(), None
        row = last[0]
        memory = policy.Memory(row["last_scale_up"], row["low_since"], row.get("last_action"))
        return memory, row

    async def record(self, group: str, d: policy.Decision, outcome: str | None = None) -> int:
        row = {
            "group": group,
            **d.row(),
            "outcome": outcome,
            "flow_run": str(flow_run.id) if flow_run.id else None,
            "last_scale_up": d.memory.last_scale_up,
            "low_since": d.memory.low_since,
            "last_action": d.memory.last_action,
        }
        seq = await self.service.add_decision(self.cluster, row)
        self.rows.append({"group": group, **d.row(), "outcome": outcome or ""})
        self.done.add(group)
        level = self.logger.info if d.action == "none" else self.logger.warning
        level(
            "cluster %s, group %s: %s (metric %s, %d nodes, %d wanted): %s",
            self.cluster, group, d.action, d.metric, d.current, d.desired, d.reason,
        )  # fmt: skip
        return seq

    async def skipped(self, group: str, current: int, reason: str) -> None:
        memory, _ = await self.memory(group)
        d = policy.Decision(time.time(), None, current, current, current, "none", reason, memory)
        await self.record(group, d)

    async def group(
        self, status: ClusterStatus, name: str, guarded: guards.Guarded | None = None
    ) -> None:
        loaded = _loaded(status)
        group = loaded.groups[name]
        scaling = group.scaling
        assert scaling is not None
        memory, _ = await self.memory(name)
        placement = recorded(status, loaded)
        if scaling.queue is not None:
            queue = await self.read(name, scaling)
            assert isinstance(queue, policy.QueueReading)
            mine = [n for n in status["nodes"] if n["group"] == name]
            victims = release_order(placement, name, mine)  # the last preferred pool first
            low, high = group.scale_min, group.scale_max
            d = policy.decide_queue(scaling, low, high, victims, queue, time.time(), memory)
        else:
            reading = await self.read(name, scaling)
            assert isinstance(reading, policy.Reading)
            d = policy.decide(
                scaling, group.scale_min, group.scale_max, group.count, reading, time.time(), memory
            )
        if d.action == "grow":  # the pools of the group, in order, may not have that much room
            order = placement.order(name)
            room = await pool_capacities(site_drivers(running_site()), order, name)
            d = policy.within_room(d, room, memory)
            quarantined = sorted(
                (n["name"] for n in status["nodes"]
                 if n["group"] == name and n["state"] == NodeState.QUARANTINED),
                key=natural_key,
            )  # fmt: skip
            d = policy.held_by_quarantine(d, quarantined, memory)
            if guarded is not None:  # the lease has run, or the day's budget
                d = guarded.limit(d, len(status["nodes"]), scaling, memory)
        if d.action == "none":
            await self.record(name, d)
            return
        await self.act(status, name, d, by="autoscale")

    async def act(self, status: ClusterStatus, name: str, d: policy.Decision, by: str) -> str:
        """Record the decision `d` (a growth or a shrink) of group `name`, resize, and record
        what the resize did as its outcome (also the return value); `by`: who asked, as the
        approval gate records it (the autoscaler, or one of the guards)."""
        seq = await self.record(name, d)
        try:
            result = await resize(
                self.cluster,
                status,
                name,
                d.target,
                timeouts=self.timeouts,
                retries=self.retries,
                remove=d.remove,
                by=by,
            )
        except Rejected as exc:  # a person said no (or nothing in time): recorded, not a failure
            outcome = f"rejected: {exc}"
        except (CrvError, ServiceError) as exc:
            outcome = f"failed: {exc}"
            self.failed.append(f"group {name}: {exc}")
        else:
            outcome = f"{result['before']} -> {result['after']} nodes"
            if result.get("approval"):
                outcome += f"; {result['approval']}"
            if result["removed"]:
                outcome += f"; removed {', '.join(result['removed'])}"
            for node, why in result["kept"].items():
                outcome += f"; kept {node}: its {why}"
                self.logger.warning("cluster %s: kept %s: its %s", self.cluster, node, why)
        await self.service.set_outcome(self.cluster, seq, outcome)
        self.rows[-1]["outcome"] = outcome
        return outcome


async def read_queue(service: AsyncService, cluster: str, scaling: Scaling) -> policy.QueueReading:
    """The group's batch queue now (QUEUE_KEYS of its role); a reading with a problem (never an
    exception) when it cannot be had."""
    assert scaling.queue is not None
    readings = {}
    try:
        for key in QUEUE_KEYS:
            readings[key] = await service.attribute_readings(cluster, scaling.queue.role, key)
    except ServiceError as exc:
        return policy.QueueReading(None, problem=f"the crv service did not answer: {exc}")
    return policy.from_queue(scaling, readings)


async def read_metric(service: AsyncService, cluster: str, scaling: Scaling) -> policy.Reading:
    """The group's metric now; a reading with a problem (never an exception) when it cannot be
    had, so the decision records why nothing was done."""
    metric = scaling.metric
    assert metric is not None
    if metric.attribute is not None:
        a = metric.attribute
        try:
            readings = await service.attribute_readings(cluster, a.role, a.key)
        except ServiceError as exc:
            return policy.Reading(None, problem=f"the crv service did not answer: {exc}")
        return policy.from_attribute(scaling, readings)
    assert metric.http is not None
    url = metric.http
    try:
        timeout = min(HTTP_TIMEOUT, metric.stale_after)
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            client.stream("GET", url) as response,
        ):
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= HTTP_LIMIT:
                    break
            code = response.status_code
    except httpx.HTTPError as exc:
        return policy.Reading(None, problem=f"{url}: {type(exc).__name__}: {exc}"[:300])
    return policy.from_http_body(url, code, body[:HTTP_LIMIT].decode("utf-8", "replace"))
