"""The four step kinds of a deploy, for one node at a time, against a pool and the service.

Many nodes run these at once (crv.engine.executor), so everything that talks to the service is
shared: one event stream mirrors the cluster's state (a certify or contextualize step waits on an
asyncio future, holding no thread), and calls that many nodes make at the same moment (node
records, tokens, releases) are batched into one request. Pool calls are blocking library calls
and run in a bounded thread pool.

Re-running converges: a node that is already enrolled is not provisioned again, a role that is
already done is not re-run, and a node the pool holds but that never enrolled is replaced
(its one-time token is gone with the previous run).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from crv.appliance.bundle import Bundle, build
from crv.appliance.plan import Plan
from crv.base.errors import CrvError
from crv.base.states import DRAIN_STATES, NodeState
from crv.engine import verify
from crv.engine.executor import Halted
from crv.engine.placement import ALIVE, NoCapacity, Placement, capacities
from crv.engine.verify import Check
from crv.service.client import AsyncService, ServiceError
from crv.service.models import NodeStatus
from crv.service.store import LEAVING, natural_key
from pools.base import NodeInfo, NodeSpec, Pool

T = TypeVar("T")
R = TypeVar("R")

BATCH_MAX = 500
LIVENESS_EVERY = 10.0  # seconds between reads of when each node's agent last called
ON_NODE_TIMEOUT = 120.0  # asking a node's agent to run a check -> its report
SILENCE_SETTING = "CRV_NODE_SILENCE"


def silence_from_env() -> float:
    """How long a node's agent may stay silent while a change waits on it: it long-polls every
    25 s and heartbeats every 10 s while a recipe runs, so 90 s (the default) is three missed
    calls. CRV_NODE_SILENCE overrides it (seconds, at least 40)."""
    raw = os.environ.get(SILENCE_SETTING, "").strip()
    try:
        value = float(raw) if raw else 90.0
    except ValueError:
        value = float("nan")
    if not 40.0 <= value <= 86400.0:
        raise CrvError(f"{SILENCE_SETTING}={raw!r}: seconds between 40 and 86400")
    return value


class StepError(CrvError):
    def __init__(self, message: str, *, temporary: bool) -> None:
        self.temporary = temporary
        super().__init__(message)


class RecipeFailed(StepError):
    def __init__(self, node: str, role: str, exit_code: int | None, output: str) -> None:
        self.node, self.role, self.exit_code, self.output = node, role, exit_code, output
        how = f"exited {exit_code}" if exit_code is not None else "failed"
        tail = " | ".join(line for line in output.strip().splitlines()[-5:]) or "(no output)"
        super().__init__(f"recipe of {role} on {node} {how}: {tail}", temporary=True)


class Batcher(Generic[T, R]):
    """Collects items submitted in the same moment and sends them in one call, in order; one
    call in flight at a time, so an acknowledged item is applied before any later one."""

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self._send = send
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._wake.set()
        return await fut

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(0)  # let the other steps of this moment enqueue theirs
            batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
            if not self._queue:
                self._wake.clear()
            if not batch:
                continue
            try:
                results = await self._send([item for item, _ in batch])
            except Exception as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    def close(self) -> None:
        self._task.cancel()


class Mirror:
    """The cluster's node and role states as the service reports them, kept current by one
    long poll on its event stream; steps wait here for their node's changes."""

    def __init__(self, service: AsyncService, cluster: str) -> None:
        self.service, self.cluster = service, cluster
        self.nodes: dict[str, str] = {}
        self.addresses: dict[str, str | None] = {}
        self.pools: dict[str, str] = {}  # the pool each recorded node was made in
        self.roles: dict[tuple[str, str], dict[str, Any]] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self._liveness_task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        # per node: when its agent last called and when its certificate ends (ISO, or None),
        # read every LIVENESS_EVERY seconds; and why the service refused its re-join
        self.liveness: dict[str, dict[str, str | None]] = {}
        self.refused: dict[str, str] = {}

    async def start(self) -> None:
        first = await self.service.events(self.cluster, 0, 0)
        after = first["last"]
        status = await self.service.status(self.cluster)
        for n in status["nodes"]:
            self.nodes[n["name"]] = n["state"]
            self.addresses[n["name"]] = n["address"]
            self.pools[n["name"]] = n["pool"]
            for role, r in n["roles"].items():
                self.roles[(n["name"], role)] = dict(r)
        self._task = asyncio.get_running_loop().create_task(self._follow(after))
        self._liveness_task = asyncio.get_running_loop().create_task(self._watch_liveness())

    async def _watch_liveness(self) -> None:
        while True:
            with contextlib.suppress(ServiceError):
                self.liveness = await self.service.liveness(self.cluster)
            await asyncio.sleep(LIVENESS_EVERY)

    async def _follow(self, after: int) -> None:
        failures = 0
        while True:
            try:
                batch = await self.service.events(self.cluster, after, 25)
                failures = 0
            except ServiceError as e:
                failures += 1
                if not e.temporary or failures > 30:
                    self.error = e
                    self._wake_all()
                    return
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))  # the service restarting (F7)
                continue
            for ev in batch["events"]:
                self._apply(ev)
            after = batch["last"]

    def _apply(self, ev: Mapping[str, Any]) -> None:
        node = ev["node"]
        if node is None:
            return
        if ev["kind"] in ("enrolled", "node", "revoked"):
            self.nodes[node] = ev["state"]
            self.refused.pop(node, None)
        elif ev["kind"] == "rejoin_refused":
            self.refused[node] = ev["output"] or "its re-join was refused"
        elif ev["kind"] == "rejoined":
            self.refused.pop(node, None)
        elif ev["kind"] == "check":  # the result of a verify the node's agent ran
            slot = self.roles.setdefault((node, ev["role"]), {})
            slot["check"] = {"id": ev["release"], "exit_code": ev["exit_code"],
                             "output": ev["output"] or ""}  # fmt: skip
        elif ev["kind"] in ("role", "verified"):
            slot = self.roles.setdefault((node, ev["role"]), {})
            slot["state"] = ev["state"]
            if ev["kind"] == "role":
                slot.update(release=ev["release"], exit_code=ev["exit_code"])
                if ev["output"] is not None:
                    slot["output"] = ev["output"]
                if ev["attributes"] is not None:
                    slot["attributes"] = ev["attributes"]
        for fut in self._waiters.pop(node, ()):
            if not fut.done():
                fut.set_result(None)

    def mark(self, node: str, state: str) -> None:
        """What this process knows before the event says so: the node's waits look again."""
        self.nodes[node] = state
        for fut in self._waiters.pop(node, ()):
            if not fut.done():
                fut.set_result(None)

    def _wake_all(self) -> None:
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()

    async def wait(
        self,
        node: str,
        ready: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        silence: float | None = None,
    ) -> None:
        """Until `ready()`, the timeout, or (with `silence`) the node's agent staying silent
        that long while we wait: then fail at once, saying when it was last seen and why it is
        probably gone, instead of waiting out the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        since = datetime.now(timezone.utc)  # a node quiet before the wait gets a full bound
        while not ready():
            if self.error is not None:
                raise StepError(f"lost the service's event stream: {self.error}", temporary=False)
            if self.nodes.get(node) == NodeState.QUARANTINED:
                raise Halted(f"{node} is quarantined")
            if silence is not None:
                self._check_alive(node, since, silence, what)
            left = deadline - loop.time()
            if left <= 0:
                raise StepError(f"{node}: timed out after {timeout:.0f} s {what}", temporary=True)
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters[node].append(fut)
            step = left if silence is None else min(left, LIVENESS_EVERY / 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, step)

    def _check_alive(self, node: str, since: datetime, silence: float, what: str) -> None:
        refused = self.refused.get(node)
        if refused is not None:
            raise StepError(
                f"{node}: {refused}; `crv repair {self.cluster}` makes it again", temporary=False
            )
        seen = _when(self.liveness.get(node, {}).get("last_seen"))
        now = datetime.now(timezone.utc)
        quiet_since = max(seen, since) if seen is not None else since
        if (now - quiet_since).total_seconds() <= silence:
            return
        ends = _when(self.liveness.get(node, {}).get("certificate_ends"))
        last = f"last seen {seen:%Y-%m-%d %H:%M:%S} UTC" if seen else "never seen"
        if ends is not None and ends <= now:
            why = (
                f"its certificate ended at {ends:%Y-%m-%d %H:%M:%S} UTC and it has not re-joined "
                f"(off, frozen or cut off; once back it re-joins by itself, else "
                f"`crv repair {self.cluster}` makes it again)"
            )
        else:
            why = "its machine is probably off, frozen or cut off from the service"
        raise StepError(
            f"{node} stopped answering {what}: {last}, nothing for over {silence:.0f} s; {why}",
            temporary=False,
        )

    def close(self) -> None:
        for task in (self._task, self._liveness_task):
            if task:
                task.cancel()


def _when(iso: str | None) -> datetime | None:
    if not iso:
        return None
    at = datetime.fromisoformat(iso)
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


TEND_EVERY = 2.0  # seconds between a tending pool's looks at a node that has not enrolled


@dataclass(frozen=True)
class Timeouts:
    boot: float = 300.0  # provision returned -> the agent enrolled
    recipe: float = 1800.0  # release -> the agent reported done or failed
    # a node whose agent is silent this long while a recipe is awaited is gone: fail then
    silence: float = field(default_factory=silence_from_env)


class ClusterRun:
    def __init__(
        self,
        plan: Plan,
        placement: Placement,
        drivers: Callable[[str], Pool],
        service: AsyncService,
        *,
        service_url: str,
        ca_pem: str,
        ca_sha256: str,
        ca_file: str,
        timeouts: Timeouts = Timeouts(),
        pool_threads: int = 32,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        self.plan, self.placement, self.drivers, self.service = plan, placement, drivers, service
        self.counts = dict(counts or {})  # the resized groups, recorded with the cluster
        self.cluster = plan.cluster
        self.service_url, self.ca_pem, self.ca_sha256 = service_url, ca_pem, ca_sha256
        self.timeouts = timeouts
        self.mirror = Mirror(service, self.cluster)
        self._threads = ThreadPoolExecutor(pool_threads, thread_name_prefix="crv-pool")
        self._http = verify.http_client(ca_file)
        self._node_updates: Batcher[dict[str, Any], None] | None = None
        self._tokens: Batcher[str, str] | None = None
        self._roles: Batcher[dict[str, Any], dict[str, Any]] | None = None
        self._bundle: Bundle | None = None
        self._finished: dict[str, dict[str, set[str]]] = {"recipes": {}, "verified": {}}
        self.made: set[str] = set()  # the nodes this run asked a pool to make
        self.stopped: str | None = None  # the brake tripped: no create starts any more

    def quarantined(self, node: str) -> None:
        """The service shut `node` out: its waits end now (crv.engine.stages.Mirror.wait)."""
        self.mirror.mark(node, NodeState.QUARANTINED)

    # -- set-up and tear-down of the run ----------------------------------------------------

    async def open(self) -> None:
        """Register the cluster (idempotent: its appliance, recipes and counts), then follow its
        events and start the batchers the steps share."""
        await self.put_cluster()
        await self.mirror.start()
        self._node_updates = Batcher(self._send_nodes)
        self._tokens = Batcher(self._send_tokens)
        self._roles = Batcher(self._send_roles)

    async def put_cluster(self) -> None:
        a = self.plan.appliance
        if self._bundle is None:
            self._bundle = build(a)
        await self.service.put_cluster(
            self.cluster,
            {
                "appliance": a.name,
                "source": str(a.directory),
                "pool": self.placement.default,
                "pools": dict(self.placement.groups),
                "parameters": dict(a.parameters),
                "counts": self.counts,
                "roles": self._bundle.roles,
                "bundle": base64.b64encode(self._bundle.data).decode(),
            },
        )

    async def register(self, plan: Plan, leaving: Iterable[NodeStatus] = ()) -> None:
        """Record the nodes of `plan` (new ones as planned; a member that was leaving becomes a
        member again) and mark `leaving` the nodes about to go: they stop feeding others.
        A new node of a group with a list of pools goes to the first with room (`choose`)."""
        self.plan = plan
        a = plan.appliance
        chosen = await self.choose(plan)
        nodes: list[dict[str, Any]] = [
            {
                "name": n.name,
                "group": n.group,
                "roles": list(a.groups[n.group].roles),
                "pool": chosen.get(n.name) or self.pool_of(n.name),
                **({"state": "provisioned"} if self.mirror.nodes.get(n.name) == LEAVING else {}),
            }
            for n in plan.nodes.values()
        ]
        nodes += [
            {
                "name": v["name"],
                "group": v["group"],
                "roles": list(v["roles"]),
                "pool": v["pool"],
                "state": LEAVING,
            }
            for v in leaving
        ]
        for i in range(0, len(nodes), BATCH_MAX):
            await self.service.put_nodes(self.cluster, nodes[i : i + BATCH_MAX])
        for n in nodes:
            self.mirror.pools.setdefault(n["name"], n["pool"])

    async def choose(self, plan: Plan) -> dict[str, str]:
        """The pool of each new node (no record yet) of a group with a list of pools: the first
        pool in its order with room, room counted down as nodes are given out (each pool's
        capacity asked once; None: no limit). NoCapacity, before anything is recorded or made,
        when a node finds no room in any of them. Other groups' nodes are not here."""
        new = sorted(
            (
                n
                for n in plan.nodes.values()
                if n.group in self.placement.orders and n.name not in self.mirror.pools
            ),
            key=lambda n: natural_key(n.name),
        )
        if not new:
            return {}
        names = sorted({p for n in new for p in self.placement.order(n.group)})
        room = await self._in_thread(capacities, self.drivers, names)
        # a group's own room in each pool (bare metal: machines of its class), counted down
        # with the pool's room, which every group shares
        mine: dict[str, dict[str, int | None]] = {}
        for g in sorted({n.group for n in new}):
            mine[g] = await self._in_thread(capacities, self.drivers, self.placement.order(g), g)

        def left(pool: str, group: str) -> int | None:
            a, b = room[pool], mine[group][pool]
            return b if a is None else a if b is None else min(a, b)

        chosen: dict[str, str] = {}
        for n in new:
            order = self.placement.order(n.group)
            pool = next((p for p in order if left(p, n.group) != 0), None)
            if pool is None:
                count = sum(1 for m in new if m.group == n.group and m.name not in chosen)
                free = ", ".join(f"{p} {left(p, n.group)}" for p in order)
                raise NoCapacity(
                    f"no capacity for {count} more node{'s' if count > 1 else ''} of group "
                    f"{n.group} in pools {', '.join(order)} (room left: {free})"
                )
            for counted in (room, mine[n.group]):
                if counted[pool] is not None:
                    counted[pool] = (counted[pool] or 0) - 1
            chosen[n.name] = pool
        return chosen

    def pool_of(self, node: str) -> str:
        """The pool a node was made in (its record), else where its group's nodes go."""
        return self.mirror.pools.get(node) or self.placement.of(self.plan.nodes[node].group)

    async def close(self) -> None:
        self.mirror.close()
        for b in (self._node_updates, self._tokens, self._roles):
            if b is not None:
                b.close()
        await self._http.aclose()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _send_nodes(self, items: list[dict[str, Any]]) -> list[None]:
        await self.service.put_nodes(self.cluster, items)
        return [None] * len(items)

    async def _send_tokens(self, names: list[str]) -> list[str]:
        tokens = await self.service.tokens(self.cluster, names, self.timeouts.boot + 600)
        return [tokens[n] for n in names]

    async def _send_roles(self, updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self.service.update_roles(self.cluster, updates)

    def _node_item(self, node: str, **extra: Any) -> dict[str, Any]:
        group = self.plan.nodes[node].group
        return {
            "name": node,
            "group": group,
            "roles": list(self.plan.appliance.groups[group].roles),
            "pool": self.pool_of(node),
            **extra,
        }

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    # -- the four step kinds ----------------------------------------------------------------

    async def step(self, sid: str) -> None:
        d = self.plan.graph.nodes[sid]
        kind, node, role = d["kind"], d["node"], d["role"]
        if kind == "provision":
            await self.provision(node)
        elif kind == "certify":
            await self.certify(node)
        elif kind == "contextualize":
            await self.contextualize(node, role)
        else:
            await self.verify(node, role)

    async def provision(self, node: str) -> None:
        assert self._node_updates is not None and self._tokens is not None
        pool = self.drivers(self.pool_of(node))
        adopt = getattr(pool, "adopt", None)
        if adopt is not None:  # a pool of machines that join by themselves (crv pair)
            await self._adopt(node, adopt)
            return
        existing = await self._in_thread(pool.get_node, node)
        alive = existing is not None and existing.state in ALIVE
        if existing is not None and alive and self.mirror.nodes.get(node) == "enrolled":
            self.mirror.addresses[node] = existing.address
            await self._node_updates.submit(
                self._node_item(node, address=existing.address, state="provisioned")
            )
            return
        # recorded first: while the node is remade, status never claims one the pool lacks;
        # it is made afresh (below), so its timings start again
        if self.mirror.nodes.get(node) == NodeState.QUARANTINED:  # remade: its waits may wait
            self.mirror.nodes[node] = NodeState.PROVISIONING
        self.made.add(node)
        began = {"provision": time.time()}
        await self._node_updates.submit(self._node_item(node, state="provisioning", timings=began))
        for (n, _), r in self.mirror.roles.items():
            if n == node:  # a new machine: every role runs on it again (the store reset them)
                r.update(state="pending", attributes={}, output="")
                r.pop("retry", None)
        if existing is not None:  # held by the pool but never enrolled: its token is spent
            await self._in_thread(pool.destroy_node, node)
        token = await self._tokens.submit(node)
        spec = NodeSpec(
            name=node,
            cluster=self.cluster,
            group=self.plan.nodes[node].group,
            bootstrap={
                "service": _dialled_at(self.service_url, getattr(pool, "service_address", None)),
                "ca": self.ca_pem,
                "ca_sha256": self.ca_sha256,
                "cluster": self.cluster,
                "node": node,
                "token": token,
            },
        )

        def create() -> NodeInfo:
            if self.stopped is not None:  # the brake tripped while this create waited
                raise Halted(f"{node} was not made: {self.stopped}")
            return pool.create_node(spec)

        info = await self._in_thread(create)
        self.mirror.addresses[node] = info.address
        timings = {"created": time.time(), **(info.extra.get("timings") or {})}
        await self._node_updates.submit(
            self._node_item(node, address=info.address, state="provisioned", timings=timings)
        )

    async def _phase(self, node: str, phase: str, role: str) -> None:
        """`role` on `node` reached `phase` (recipes, verified); the node's time of the phase
        is recorded once every role of the node has. With `verified`, the pool's own phase
        times of the node (bare metal: power-on, script, kernel, initrd, call-back) too."""
        assert self._node_updates is not None
        seen = self._finished[phase].setdefault(node, set())
        seen.add(role)
        group = self.plan.nodes[node].group
        if not seen.issuperset(self.plan.appliance.groups[group].roles):
            return
        timings = {phase: time.time()}
        pool = self.drivers(self.pool_of(node))
        if phase == "verified" and callable(getattr(pool, "timings", None)):
            info = await self._in_thread(pool.get_node, node)
            timings.update((info.extra.get("timings") or {}) if info is not None else {})
        await self._node_updates.submit(self._node_item(node, timings=timings))

    async def _adopt(self, node: str, adopt: Callable[[str, str, str | None], NodeInfo]) -> None:
        """A machine crv did not make (pools.manual): it is there once its agent has paired;
        the pool records it. Nothing can make it again: pairing it once more is the way."""
        assert self._node_updates is not None
        if self.mirror.nodes.get(node) not in ("enrolled", LEAVING):
            raise StepError(
                f"{node} is a paired machine ({self.pool_of(node)} pool) that is not enrolled: "
                f"crv cannot make it again; pair a machine with `crv pair {self.cluster} "
                f"{self.plan.nodes[node].group}`",
                temporary=False,
            )
        info = await self._in_thread(adopt, node, self.cluster, self.mirror.addresses.get(node))
        self.mirror.addresses[node] = info.address
        await self._node_updates.submit(
            self._node_item(node, address=info.address, state="provisioned")
        )

    async def certify(self, node: str) -> None:
        """Wait for the node's agent to enrol. A pool with a `tend` method (bare metal) is
        asked every TEND_EVERY seconds meanwhile: it may move the node to another machine
        (one that did not boot is written off), which then gets a full boot time of its own
        and its own address."""

        def enrolled() -> bool:
            return self.mirror.nodes.get(node) == "enrolled"

        what = "waiting for its agent to enrol"
        await self._wait_enrolled(node, enrolled, what)
        assert self._node_updates is not None
        await self._node_updates.submit(self._node_item(node, timings={"enrolled": time.time()}))

    async def _wait_enrolled(self, node: str, enrolled: Callable[[], bool], what: str) -> None:
        tend = getattr(self.drivers(self.pool_of(node)), "tend", None)
        if tend is None:
            await self.mirror.wait(node, enrolled, self.timeouts.boot, what)
            return
        loop = asyncio.get_running_loop()
        deadline, machine = loop.time() + self.timeouts.boot, None
        while True:
            try:
                left = deadline - loop.time()
                await self.mirror.wait(node, enrolled, max(0.0, min(TEND_EVERY, left)), what)
                return
            except StepError:
                if self.mirror.error is not None:
                    raise
                if loop.time() >= deadline:
                    message = f"{node}: timed out after {self.timeouts.boot:.0f} s {what}"
                    raise StepError(message, temporary=True) from None
            info = await self._in_thread(tend, node)
            if info is None:
                continue
            moved = info.extra.get("machine")
            if machine is not None and moved != machine:
                deadline = loop.time() + self.timeouts.boot
            machine = moved
            if info.address != self.mirror.addresses.get(node):  # another machine's address
                assert self._node_updates is not None
                self.mirror.addresses[node] = info.address
                await self._node_updates.submit(
                    self._node_item(node, address=info.address, state="provisioned")
                )

    async def contextualize(self, node: str, role: str) -> None:
        assert self._roles is not None
        key = (node, role)
        current = self.mirror.roles.get(key, {})
        if current.get("state") in ("done", "verified", "verify_failed") and not current.get(
            "retry"
        ):
            # converged in an earlier run; verify checks it again. A role that reads others
            # runs again only if what it reads changed (a resize): the service compares.
            self._finished["recipes"].setdefault(node, set()).add(role)  # timed back then
            if not self.plan.appliance.roles[role].depends_on:
                return
            result = await self._roles.submit({"node": node, "role": role, "op": "refresh"})
            if not result["released"]:
                return
            release = int(result["release"])
            self.mirror.roles.setdefault(key, {}).update(state="released", release=release)
        elif current.get("state") in ("released", "running"):
            release = int(current["release"])
        else:
            result = await self._roles.submit({"node": node, "role": role, "op": "release"})
            release = int(result["release"])
            self.mirror.roles.setdefault(key, {}).update(state="released", release=release)

        def finished() -> bool:
            r = self.mirror.roles.get(key, {})
            return r.get("release") == release and r.get("state") in ("done", "failed")

        await self.mirror.wait(
            node,
            finished,
            self.timeouts.recipe,
            f"while crv waited for its {role} recipe",
            silence=self.timeouts.silence,
        )
        r = self.mirror.roles[key]
        if r["state"] == "failed":
            r["retry"] = True  # the next attempt releases again
            raise RecipeFailed(node, role, r.get("exit_code"), r.get("output") or "")
        r.pop("retry", None)
        await self._phase(node, "recipes", role)

    async def verify(self, node: str, role: str) -> None:
        assert self._roles is not None
        spec = self.plan.appliance.roles[role]
        if spec.verify is not None:
            r = self.mirror.roles.get((node, role), {})
            address = self.mirror.addresses.get(node)
            check = verify.render(
                spec.verify,
                r.get("attributes") or {},
                {"name": node, "address": address or ""},
                dict(spec.params),
            )
            try:
                if check.kind == "on_node":
                    await self._check_on_node(node, role, check)
                else:
                    await verify.run(check, self._http)
            except verify.VerifyFailed as e:
                err = StepError(f"verify of {role} on {node} ({check}) failed: {e}", temporary=True)
                await self._roles.submit(
                    {"node": node, "role": role, "op": "verify_failed", "message": str(err)}
                )
                raise err from None
        await self._roles.submit({"node": node, "role": role, "op": "verified"})
        self.mirror.roles.setdefault((node, role), {})["state"] = "verified"
        await self._phase(node, "verified", role)

    async def _check_on_node(self, node: str, role: str, check: Check) -> None:
        """Ask the node's agent to run the check (it calls out; crv never dials the node) and
        wait for its report."""
        assert self._roles is not None
        asked = await self._roles.submit(
            {"node": node, "role": role, "op": "check", "message": check.target}
        )
        key, ident = (node, role), asked["check"]

        def reported() -> bool:
            return bool((self.mirror.roles.get(key, {}).get("check") or {}).get("id") == ident)

        try:
            await self.mirror.wait(
                node, reported, ON_NODE_TIMEOUT, f"for its agent to run the {role} check",
                silence=self.timeouts.silence,
            )  # fmt: skip
        except StepError as e:
            if not e.temporary:  # the node is gone: no retry helps
                raise
            raise verify.VerifyFailed(str(e)) from None
        result = self.mirror.roles[key]["check"]
        if result["exit_code"] != 0:
            output = result["output"] or ""
            raise verify.VerifyFailed(f"on the node, {verify.exited(result['exit_code'], output)}")

    async def drain(self, node: str, roles: Iterable[str]) -> str | None:
        """Run the drain recipe of each of `roles` on `node`, one after another (a node about
        to be removed); None when all drained, else why not. A drain already done (a shrink
        run again) is not run twice."""
        assert self._roles is not None
        for role in roles:
            result = await self._roles.submit({"node": node, "role": role, "op": "drain"})
            if result["state"] == "drained":
                continue
            release, key = int(result["release"]), (node, role)
            self.mirror.roles.setdefault(key, {}).update(state="draining", release=release)

            def finished(key: tuple[str, str] = key, release: int = release) -> bool:
                r = self.mirror.roles.get(key, {})
                return r.get("release") == release and r.get("state") in DRAIN_STATES[1:]

            try:
                await self.mirror.wait(
                    node,
                    finished,
                    self.timeouts.recipe,
                    f"while crv waited for {role}'s drain",
                    silence=self.timeouts.silence,
                )
            except StepError as e:
                return str(e)
            r = self.mirror.roles[key]
            if r["state"] != "drained":
                failed = RecipeFailed(node, role, r.get("exit_code"), r.get("output") or "")
                return f"drain {str(failed).removeprefix('recipe ')}"
        return None


def _dialled_at(url: str, address: str | None) -> str:
    """The service URL as a pool's machines must dial it: the same port at the address the pool
    names (`service_address`: the lab's bridge address, say), else the URL as it is."""
    if not address:
        return url
    parts = urllib.parse.urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{host}:{parts.port}"))
