"""The converge every flow that changes a cluster shares: bring a cluster to an appliance with
counts (deploy, resume, resize and repair all come here), roll back a failed one, publish the
cluster summary and the progress artifact.

The decisions it takes (which nodes are victims, which roles to drain, what a failed drain
keeps) are plain functions in crv.engine.converge; the steps run as Prefect tasks (tasks/stages.py,
and tasks/pools.py for the pool calls outside the stages), so the Prefect UI shows each.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prefect import get_run_logger
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from pydantic import Field

from crv.appliance.loader import Appliance, load_recorded, with_counts
from crv.appliance.plan import Plan, expand, members
from crv.base import running as daemons
from crv.base.errors import CrvError
from crv.base.home import Home, disk_full
from crv.base.retry import RetryPolicy
from crv.base.states import NodeState
from crv.engine import timings
from crv.engine.converge import (
    UNHEALTHY_KINDS,
    brake,
    keep_undrained,
    kept_failure,
    quarantines,
    recorded_sizes,
    roles_to_drain,
    victims,
)
from crv.engine.executor import DagRun, StepResult, stages
from crv.engine.placement import Drivers, NoCapacity, Placement, recorded
from crv.engine.stages import ClusterRun, Timeouts
from crv.service.client import AsyncService, Service, ServiceError
from crv.service.models import ClusterStatus, NodeStatus
from crv.service.store import natural_key
from flows import events
from tasks.pools import (
    destroy_machine,
    refuse_machine_local,
    site_drivers,
    teardown_cluster,
)
from tasks.stages import BY_KIND
from tasks.stages import drain as drain_roles

# In-process observers (the CLI's progress bar); a flow started from the UI has none.
PROGRESS_LISTENERS: list[Callable[[DagRun], None]] = []


class DeployFailed(CrvError):
    pass


# Every flow that changes a cluster holds its change slot (flows.locks) for its whole run.
WAIT = Field(
    ge=0,
    description="Seconds to wait while another change of this cluster runs (empty: as long as "
    "it takes; 0: refuse at once)",
)


OnFailure = Literal["keep", "rollback"]
ON_FAILURE = Field(
    description="When the change fails: keep what it made (run it again to resume) or roll "
    "back what it added (empty: the appliance's on_failure, else keep)",
)


def failure_message(dag: DagRun) -> str:
    failures = dag.failures()
    if not failures:
        return "deploy did not finish"
    first = min(failures, key=lambda f: f[2].finished or 0.0)
    sid, _, result = first
    more = f" (and {len(failures) - 1} more failed steps)" if len(failures) > 1 else ""
    return f"{sid} failed after {result.attempts} attempts: {result.error}{more}"


def summary_rows(status: ClusterStatus) -> list[dict[str, Any]]:
    return [
        {
            "node": n["name"],
            "group": n["group"],
            "pool": n["pool"],
            "address": n["address"] or "",
            "state": n["state"],
            "roles": ", ".join(f"{r}={v['state']}" for r, v in n["roles"].items()),
            "timings": timings.summary(n.get("timings") or {}),
        }
        for n in status["nodes"]
    ]


def raise_if_kept(result: dict[str, Any]) -> None:
    """A node whose drain failed was kept: the change is not what was asked; say so."""
    message = kept_failure(result["kept"], result["counts"])
    if message is not None:
        raise DeployFailed(message)


def running_site() -> daemons.Site:
    """Where this run finds crv: CRV_HOME's daemons on the crv machine, or the worker
    configuration (CRV_WORKER_CONFIG) on a Prefect worker elsewhere (crv.base.running)."""
    try:
        site = daemons.find_site()
    except daemons.DaemonError as e:
        raise DeployFailed(str(e)) from None
    full = disk_full(site.home.root) if site.home.root.is_dir() else None
    if full is not None:  # F15: before any change, its slot or its records
        raise DeployFailed(f"{full}; crv changed nothing")
    return site


def running_service() -> tuple[Home, daemons.Endpoints]:
    site = running_site()
    return site.home, site.endpoints


def ca_bundle(home: Home) -> tuple[str, str]:
    """The CA certificate (PEM) and its SHA-256 fingerprint, what a node's bootstrap pins: read
    from the certificate alone (a worker elsewhere has no CA key, and needs none)."""
    cert = x509.load_pem_x509_certificate(home.ca_file.read_bytes())
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return pem, cert.fingerprint(hashes.SHA256()).hex()


async def converge(
    loaded: Appliance,
    cluster: str,
    placement: Placement,
    *,
    counts: dict[str, int],
    on_failure: str | None,
    timeouts: Timeouts,
    retries: int,
    remove_first: Sequence[str] = (),
) -> dict[str, Any]:
    """Bring `cluster` to `loaded` with `counts` (deploy, resume and resize all come here):
    every step along the DAG, skipping what is already done; nodes beyond the counts are
    drained, let go by their dependents, then removed. Completed only when every verify passed.
    New nodes go to their group's pool (`placement`); a node stays in the pool it was made in.

    On failure, `on_failure` (default: the appliance's) says what stays: `keep` leaves
    everything for a run again to resume from; `rollback` removes what this run added and
    converges the cluster back to what was recorded before it (or removes it, if it is new).
    `remove_first` names the nodes a shrink should take first (crv.appliance.plan.members)."""
    site = running_site()
    refuse_machine_local(site, placement.names())
    service = AsyncService(site.home, site.endpoints.service_url)
    try:
        before = await status_of(service, cluster)
        appliance = with_counts(loaded, counts)
        existing = [(n["name"], n["group"]) for n in before["nodes"]] if before else []
        indices = members(appliance, cluster, existing, remove_first)
        change = _Change(site, service, cluster, placement, timeouts, retries)
        try:
            return await change.run(loaded, counts, indices, drain=True)
        except DeployFailed as e:
            if (on_failure or loaded.on_failure) != "rollback":
                raise
            undone = await change.roll_back(before)
            raise DeployFailed(f"{e}; rolled back: {undone}") from None
    finally:
        await service.close()


async def require_cluster(name: str) -> ClusterStatus:
    """The cluster's recorded status (a resize and a repair start from it)."""
    home, endpoints = running_service()
    service = AsyncService(home, endpoints.service_url)
    try:
        status = await status_of(service, name)
    finally:
        await service.close()
    if status is None:
        raise DeployFailed(f"no cluster {name!r}")
    return status


async def status_of(service: AsyncService, cluster: str) -> ClusterStatus | None:
    try:
        return await service.status(cluster)
    except ServiceError as e:
        if e.status == 404:
            return None
        raise


class _Change:
    """One converge of a cluster: its pools, CA, service connection and options."""

    def __init__(
        self,
        site: daemons.Site,
        service: AsyncService,
        cluster: str,
        placement: Placement,
        timeouts: Timeouts,
        retries: int,
    ) -> None:
        self.home, self.endpoints, self.service = site.home, site.endpoints, service
        self.cluster, self.placement = cluster, placement
        self.drivers = site_drivers(site)
        self.timeouts, self.retries = timeouts, retries
        self.logger = get_run_logger()

    async def run(
        self,
        loaded: Appliance,
        counts: dict[str, int],
        indices: Mapping[str, Sequence[int]],
        *,
        drain: bool,
    ) -> dict[str, Any]:
        counts = dict(counts)
        plan = expand(with_counts(loaded, counts), self.cluster, indices)
        run = self._cluster_run(plan, counts)
        emit_cluster = functools.partial(
            events.cluster_event, self.cluster, plan.appliance.name, self.placement.default
        )
        started = time.monotonic()
        try:
            await run.open()
            plan, leaving, kept = await self._shrink_plan(run, plan, drain=drain)
            try:
                await run.register(plan, leaving=leaving)
            except NoCapacity as e:  # nothing made: a rollback (if asked) has little to undo
                raise DeployFailed(str(e)) from None
            dag = DagRun(plan, RetryPolicy(retries=self.retries))
            self.logger.info(
                "cluster %s: %d nodes, %d steps, critical path %.1f s%s",
                self.cluster,
                len(plan.nodes),
                dag.total,
                plan.critical_seconds,
                f"; removing {', '.join(v['name'] for v in leaving)}" if leaving else "",
            )
            emit_cluster("deploying", nodes=len(plan.nodes), steps=dag.total)
            dag.step_listeners.append(_node_milestones(plan, run.pool_of))
            health = _Health(self, plan, run, dag)
            dag.step_listeners.append(health.on_step)
            status = await _run_stages(plan, dag, run)
            if await health.settle():
                status = await self.service.status(self.cluster)
        finally:
            await run.close()
        if dag.counts().get("ok", 0) != dag.total:
            await publish_summary(self.cluster, status)
            message = failure_message(dag)
            if dag.halted is not None and dag.halted_steps:
                message = f"{dag.halted}; first failure: {message}"
            emit_cluster("failed", error=message, seconds=round(time.monotonic() - started, 3))
            raise DeployFailed(message)  # the victims stay, leaving: a run again removes them
        revoked = await remove_nodes(self.drivers, self.service, self.cluster, leaving)
        for v in leaving:
            events.node_event(self.cluster, plan.appliance.name, v["pool"], v["name"], "destroyed")
        if leaving:
            status = await self.service.status(self.cluster)
        await publish_summary(self.cluster, status)
        elapsed = time.monotonic() - started
        emit_cluster("ready", nodes=len(plan.nodes), seconds=round(elapsed, 3))
        self.logger.info("cluster %s verified in %.1f s", self.cluster, elapsed)
        return {
            "cluster": self.cluster,
            "nodes": len(plan.nodes),
            "steps": dag.total,
            "seconds": round(elapsed, 3),
            "critical_path_seconds": plan.critical_seconds,
            "counts": run.counts,
            "removed": [v["name"] for v in leaving],
            "revoked": revoked,
            "kept": kept,
        }

    def _cluster_run(self, plan: Plan, counts: dict[str, int]) -> ClusterRun:
        ca_pem, ca_sha256 = ca_bundle(self.home)
        return ClusterRun(
            plan,
            self.placement,
            self.drivers,
            self.service,
            service_url=self.endpoints.service_url,
            ca_pem=ca_pem,
            ca_sha256=ca_sha256,
            ca_file=str(self.home.ca_file),
            timeouts=self.timeouts,
            counts=counts,
        )

    async def _shrink_plan(
        self, run: ClusterRun, plan: Plan, *, drain: bool
    ) -> tuple[Plan, list[NodeStatus], dict[str, str]]:
        """The plan once the victims (recorded nodes it lacks) are drained, the victims that
        leave, and those kept because their drain failed (their groups keep one more each)."""
        leaving = victims((await self.service.status(self.cluster))["nodes"], plan.nodes)
        todo = roles_to_drain(plan.appliance, leaving) if drain else {}
        kept = await drain_roles(run, todo) if todo else {}
        if kept:  # a node whose drain failed stays a member; its group keeps one more
            grown, indices, sizes = keep_undrained(plan, leaving, kept)
            plan = expand(grown, self.cluster, indices)
            run.counts.update(recorded_sizes(grown, sizes))
            await run.put_cluster()
        return plan, [v for v in leaving if v["name"] not in kept], kept

    async def roll_back(self, before: ClusterStatus | None) -> str:
        """Undo a failed run: a cluster that did not exist goes entirely; otherwise the nodes
        this run added go and the cluster converges back to the appliance, parameters and
        counts recorded before the run (the dependents let the added nodes go first)."""
        self.logger.warning("cluster %s: rolling back", self.cluster)
        if before is None:
            sync = Service(self.home, self.endpoints.service_url)
            gone = await teardown_cluster(self.drivers, sync, self.cluster, self.placement.names())
            what = f"removed the new cluster ({gone.destroyed} nodes, {gone.revoked} certificates)"
            events.cluster_event(
                self.cluster, gone.appliance, self.placement.default, "rolled-back", to="none"
            )
        else:
            counts = dict(before.get("counts") or {})
            loaded = load_recorded(before["source"], before["parameters"] or {}, counts)
            self.placement = recorded(before, loaded)
            existing = [(n["name"], n["group"]) for n in before["nodes"]]
            indices = members(with_counts(loaded, counts), self.cluster, existing)
            try:
                result = await self.run(loaded, counts, indices, drain=False)
            except DeployFailed as e:
                raise DeployFailed(f"the rollback failed too: {e}") from None
            what = f"removed {len(result['removed'])} nodes this run added" + (
                f" ({', '.join(result['removed'])})" if result["removed"] else ""
            )
            events.cluster_event(
                self.cluster, before["appliance"], self.placement.default, "rolled-back",
                to="previous", removed=result["removed"],
            )  # fmt: skip
        self.logger.warning("cluster %s: %s", self.cluster, what)
        return what


class _Health:
    """A change's nodes that fail to join (FAULTS F5, F6): a new node whose certify or first
    contextualize failed for good is quarantined by the service (token and certificates
    revoked, attributes purged, refused from then on) while the others go on; when more of
    the change's new nodes failed than the appliance's max_unhealthy, no step and no create
    starts any more (the decisions: crv.engine.converge.quarantines and brake)."""

    def __init__(self, change: _Change, plan: Plan, run: ClusterRun, dag: DagRun) -> None:
        self.change, self.plan, self.run, self.dag = change, plan, run, dag
        self.new = {n for n in plan.nodes if run.mirror.nodes.get(n) != NodeState.ENROLLED}
        self.failed: set[str] = set()
        self.calls: list[asyncio.Task[None]] = []

    def on_step(self, sid: str, result: StepResult) -> None:
        if result.state != "failed":
            return
        d = self.plan.graph.nodes[sid]
        node, kind = d["node"], d["kind"]
        if kind in UNHEALTHY_KINDS and node in self.new:
            self.failed.add(node)
        if quarantines(kind, node, self.run.made):
            self.dag.stop_node(node, f"{node} is quarantined")
            reason = f"{sid} failed after {result.attempts} attempts: {result.error}"
            self.calls.append(asyncio.create_task(self._quarantine(node, reason)))
        why = brake(self.plan.appliance.max_unhealthy, len(self.new), len(self.failed))
        if why is not None and self.dag.halted is None:
            self.dag.halt(why)
            self.run.stopped = why
            self.change.logger.error("cluster %s: %s", self.change.cluster, why)
            events.cluster_event(
                self.change.cluster, self.plan.appliance.name, self.change.placement.default,
                "halted", error=why, failed=sorted(self.failed, key=natural_key),
            )  # fmt: skip

    async def _quarantine(self, node: str, reason: str) -> None:
        try:
            revoked = await self.change.service.quarantine(self.change.cluster, node, reason)
        except (ServiceError, OSError) as e:
            self.change.logger.error("%s could not be quarantined: %s", node, e)
            return
        self.run.quarantined(node)
        self.change.logger.warning(
            "%s quarantined (%d certificates revoked): %s", node, len(revoked), reason
        )
        events.node_event(
            self.change.cluster, self.plan.appliance.name, self.run.pool_of(node), node,
            "quarantined", error=reason, revoked=len(revoked),
        )  # fmt: skip

    async def settle(self) -> bool:
        """Wait for the quarantines asked; whether there were any."""
        await asyncio.gather(*self.calls)
        return bool(self.calls)


async def remove_nodes(
    drivers: Drivers, service: AsyncService, cluster: str, leaving: list[NodeStatus]
) -> int:
    """Destroy the victims in their pools, then forget them (which revokes their certificates
    and purges their attributes). In that order: a node is never gone from crv's records while
    its pool still holds it."""
    revoked = 0
    for v in leaving:
        await destroy_machine(drivers, v["pool"], v["name"])
        revoked += len(await service.delete_node(cluster, v["name"]))
    return revoked


def _node_milestones(
    plan: Plan, pool_of: Callable[[str], str]
) -> Callable[[str, StepResult], None]:
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
                events.node_event(
                    plan.cluster, plan.appliance.name, pool_of(node), node, "verified"
                )
        elif result.state == "failed":
            events.node_event(
                plan.cluster, plan.appliance.name, pool_of(node), node, "failed",
                step=sid, attempts=result.attempts, error=result.error,
            )  # fmt: skip

    return on_step


async def publish_summary(cluster: str, status: ClusterStatus) -> None:
    """The cluster summary table artifact; every flow that changes the cluster updates it. It
    links the autoscaling plots the autoscale flow drew (files under the crv home)."""
    home = running_site().home
    plots = sorted(
        p for p in (home.root / "autoscale").glob(f"{cluster}-*.png")
        if p.name[len(cluster) + 1 : -4] in {n["group"] for n in status["nodes"]}
    )  # fmt: skip
    linked = "".join(f"\n\nAutoscaling plot: [{p.name}]({p.as_uri()})" for p in plots)
    await acreate_table_artifact(
        key=f"cluster-{cluster}",
        table=summary_rows(status),
        description=f"Cluster {cluster} ({status['appliance']}) on "
        f"{_pools_text(status)}: "
        f"{len(status['nodes'])} nodes, {'ready' if status['ready'] else 'not ready'}{linked}",
    )


def _pools_text(status: ClusterStatus) -> str:
    used = sorted({n["pool"] for n in status["nodes"]} or {status["pool"]})
    return f"pool{'s' if len(used) > 1 else ''} {', '.join(used)}"


async def _run_stages(plan: Plan, dag: DagRun, run: ClusterRun) -> ClusterStatus:
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
            await aupdate_progress_artifact(progress_id, progress=_percent(dag))
            await asyncio.sleep(1.0)  # at most one update a second, whatever the size

    publisher = asyncio.create_task(publish_progress())
    try:
        calls = [
            BY_KIND[s.kind].with_options(task_run_name=s.label)(s, dag, run) for s in stages(plan)
        ]
        await asyncio.gather(*calls, return_exceptions=True)
    finally:
        publisher.cancel()
        await aupdate_progress_artifact(progress_id, progress=_percent(dag))
    return await run.service.status(plan.cluster)


def _percent(dag: DagRun) -> float:
    """Steps done, in percent (a plan without steps, such as a group resized to 0: 100)."""
    return 100.0 * sum(dag.counts().values()) / dag.total if dag.total else 100.0
