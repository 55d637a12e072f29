"""A 10-cluster day: 10 web farms deployed at once through Prefect's API, each resized and then
destroyed, with autoscaling on all of them every 30 s; every run must end COMPLETED, no client
may see a 5xx, and nothing may be left.

Everything is as a user runs it: `crv up` (SQLite) or `crv up --postgres` (a PostgreSQL of the
home's own, CRV_SERVICE_PROCESSES service processes) under a temporary CRV_HOME, through the CLI.
The changes then come from another system, through the Prefect API with the URL and auth that
`crv api-credentials --json` prints: flow runs of `deploy-appliance/crv` (the catalog's web farm
on the sim pool, `--workers` web nodes, `autoscale_every` so that the cluster autoscales once it
exists), `scale-role/crv` (the worker group one node bigger) and `destroy-cluster/crv`, for all
clusters concurrently, each cluster holding `--hold` seconds between its changes so that its
`autoscale/<cluster>` schedule runs meanwhile. The served deployments run them (`crv up`'s
runner, 5 flow runs at a time: Prefect's PREFECT_RUNNER_PROCESS_LIMIT). The day ends when every
flow run is final and no `autoscale/*` deployment is left.

Prints the wall time, the flow runs by flow and final state (how long they ran, and how long
they waited between their due time and their start), runs per minute, how many ran at once, what
the autoscale runs did, how fast the service and the Prefect API answered the health probes
crv's flows make before they act, the 5xx answers anyone saw (the Prefect server's log of the
503s and 500s it answered, the crv service's log of its 500s and refused connections, and this
client's own through an httpx hook), the Prefect database's size (SQLite: prefect.db;
PostgreSQL: pg_database_size, and Prefect's tables alone), what was left (`crv list`, the sim
pool's nodes, `autoscale/*` deployments, unfinished runs), and the machine's load average.

    python -m benchmarks.bench_day [--clusters 10] [--database sqlite|postgresql|both]
        [--processes N] [--workers 2] [--every 30] [--hold 30] [--smoke] [--json [FILE]]

`both` (the default) runs SQLite and PostgreSQL each in a process of its own (Prefect's client
reads its server's address once per process), then prints them side by side. `--smoke`: 2
clusters of 1 web node, SQLite. Exit 1 if a run did not end COMPLETED, anyone saw a 5xx, or
anything was left.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import add_database_options, exit_on_sigterm
from benchmarks.bench_resize import crv
from crv.base.home import Home
from crv.base.running import request_with_auth
from crv.service.database import database_url
from pools.sim import SimPool

if TYPE_CHECKING:
    import httpx
    from prefect.client.orchestration import PrefectClient

APPLIANCE = "webfarm"
PREFIX = "day"  # the clusters are day0, day1, ...
# the sim pool's step latencies (seconds): a web farm's critical path of about 10 s
LATENCY = "provision=3,certify=1,contextualize=2,verify=1,jitter=0.2"
POLL = 2.0  # seconds between two looks at a flow run (or at what is left)
QUEUE_TIMEOUT = 1800.0  # seconds a change may wait for the runner before the day gives up on it
RUN_TIMEOUT = 900.0  # seconds a change may run before the day gives up on it
SETTLE_TIMEOUT = 300.0  # seconds after the last destroy for the autoscale runs to end
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
PROBE_EVERY = 2.0  # seconds between two health probes of the service and of the Prefect API
PROBE_PATIENCE = 2.0  # crv's own probes wait this long for an answer (crv.base.running)
PROBE_TIMEOUT = 120.0  # ours wait this long, to see how long an answer takes
DATABASES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


@dataclass
class Kind:
    """The runs of one flow: how many ended in which state, how long they ran, how long the
    longest waited between its due time and its start."""

    states: dict[str, int] = field(default_factory=dict)
    median_s: float = 0.0
    longest_s: float = 0.0
    waited_median_s: float = 0.0
    waited_s: float = 0.0


@dataclass
class Day:
    """The figures of one day on one database (also its --json)."""

    database: str
    processes: int
    clusters: int
    workers: int
    every: float
    hold: float
    up_s: float = 0.0
    wall_s: float = 0.0
    loadavg: list[float] = field(default_factory=list)  # 1-minute load average: start, end
    runs: dict[str, Kind] = field(default_factory=dict)
    runs_per_minute: float = 0.0
    at_once: int = 0
    autoscale: dict[str, int] = field(default_factory=dict)  # what the autoscale runs did
    phases: dict[str, list[float]] = field(default_factory=dict)  # first start, last end
    # the service's and Prefect's answer times to crv's health probes: median, max, how many
    # probes took over PROBE_PATIENCE (a flow waits 30 s of those before it gives up)
    health: dict[str, dict[str, float]] = field(default_factory=dict)
    slow_probes: list[str] = field(default_factory=list)
    errors_5xx: dict[str, int] = field(default_factory=dict)  # where seen -> how many
    examples_5xx: list[str] = field(default_factory=list)
    db_bytes_up: int = 0
    db_bytes: int = 0
    db_prefect_bytes: int = 0
    left: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def total_runs(self) -> int:
        return sum(sum(k.states.values()) for k in self.runs.values())

    @property
    def completed(self) -> bool:
        """Every run COMPLETED, every change made (the runs are there) and none unfinished."""
        return not self.failures and all(set(k.states) == {"COMPLETED"} for k in self.runs.values())

    @property
    def ok(self) -> bool:
        return self.completed and not self.left and self.seen_5xx == 0

    @property
    def seen_5xx(self) -> int:
        """The 5xx answers: what the servers logged (this client's among them), or what this
        client saw if that is more (an answer no log shows)."""
        logged = sum(n for k, n in self.errors_5xx.items() if k != "client")
        return max(logged, self.errors_5xx.get("client", 0))

    @staticmethod
    def load(data: dict[str, Any]) -> Day:
        runs = {k: Kind(**v) for k, v in data.pop("runs").items()}
        return Day(**data, runs=runs)


# -- the changes, through Prefect's API --------------------------------------------------------


class Driver:
    """Flow runs of the served deployments made and watched as another system would, through
    one Prefect client."""

    def __init__(self, client: PrefectClient) -> None:
        self.client = client
        self.deployments: dict[str, Any] = {}  # flow name -> its deployment's id
        self.failures: list[str] = []
        self.spans: dict[str, list[float]] = {}  # flow name -> first made, last over
        self.began = time.monotonic()  # when the first change was made

    async def start(self) -> None:
        for flow in ("deploy-appliance", "scale-role", "destroy-cluster"):
            found = await self.client.read_deployment_by_name(f"{flow}/crv")
            self.deployments[flow] = found.id

    async def change(self, flow: str, parameters: dict[str, Any]) -> bool:
        """One flow run of `flow`'s deployment, waited for: whether it ended COMPLETED."""
        created = time.monotonic() - self.began
        run = await self.client.create_flow_run_from_deployment(
            self.deployments[flow], parameters=parameters
        )
        deadline, started = time.monotonic() + QUEUE_TIMEOUT, False
        while True:
            await asyncio.sleep(POLL)
            run = await self.client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            if not started and run.state is not None and run.state.is_running():
                deadline, started = time.monotonic() + RUN_TIMEOUT, True
            if time.monotonic() > deadline:
                what = (
                    f"not over after {RUN_TIMEOUT:g} s"
                    if started
                    else f"not started after {QUEUE_TIMEOUT:g} s"
                )
                self.failures.append(f"{flow} {parameters['name']}: {what}")
                return False
        span = self.spans.setdefault(flow, [created, 0.0])
        span[0] = min(span[0], created)
        span[1] = max(span[1], time.monotonic() - self.began)
        assert run.state is not None
        if not run.state.is_completed():
            self.failures.append(
                f"{flow} {parameters['name']}: {run.state.name}: {(run.state.message or '')[:300]}"
            )
            return False
        return True

    async def cluster(self, name: str, workers: int, every: float, hold: float) -> None:
        """Deploy (autoscaling from then on), hold, grow the workers by one, hold, destroy; the
        destroy happens whatever went before, so a failed day still leaves nothing."""
        deployed = await self.change(
            "deploy-appliance",
            {
                "appliance": APPLIANCE,
                "pool": "sim",
                "name": name,
                "parameters": {"workers": str(workers)},
                "autoscale_every": every,
            },
        )
        if deployed:
            await asyncio.sleep(hold)
            await self.change("scale-role", {"name": name, "group": "worker", "count": workers + 1})
            await asyncio.sleep(hold)
        await self.change("destroy-cluster", {"name": name, "pool": "sim"})

    async def settle(self) -> list[str]:
        """Wait until no `autoscale/*` deployment is left (the serve process removes that of a
        destroyed cluster) and every flow run is final: what is still there after
        SETTLE_TIMEOUT (nothing, normally)."""
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        unfinished = [t for t in StateType if t.value not in FINAL]
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            deployments = await self.client.read_deployments(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["autoscale"]))
            )
            running = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))
                )
            )
            left = [f"deployment autoscale/{d.name}" for d in deployments]
            left += [
                f"flow run {r.name} {r.state_name} ({r.parameters.get('name')})" for r in running
            ]
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(POLL)

    async def runs(self) -> list[dict[str, Any]]:
        """Every flow run the server has: flow name, state, start, end, due time (epoch s), and
        the state's message."""
        flows = {f.id: f.name for f in await self.client.read_flows()}
        found: list[dict[str, Any]] = []
        while True:
            page = await self.client.read_flow_runs(limit=200, offset=len(found))
            found += [
                {
                    "id": r.id,
                    "flow": flows.get(r.flow_id, str(r.flow_id)),
                    "state": r.state_type.value if r.state_type else "NONE",
                    "start": _epoch(r.start_time),
                    "end": _epoch(r.end_time),
                    "due": _epoch(r.expected_start_time),
                    "cluster": r.parameters.get("name"),
                    "message": (r.state.message or "") if r.state else "",
                }
                for r in page
            ]
            if len(page) < 200:
                return found

    async def autoscale_outcomes(self, ids: list[Any]) -> dict[str, int]:
        """What each autoscale run did, from its log: decided (one decision per group, "none"
        included), skipped (another change of the cluster held it), or stopped (its cluster
        destroyed, its deployment paused or removed: it decides nothing)."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        lines: dict[Any, list[str]] = {i: [] for i in ids}
        for chunk in range(0, len(ids), 50):
            filt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids[chunk : chunk + 50]))
            offset = 0
            while True:
                page = await self.client.read_logs(log_filter=filt, limit=200, offset=offset)
                for log in page:
                    lines[log.flow_run_id].append(log.message)
                offset += len(page)
                if len(page) < 200:
                    break
        outcomes: dict[str, int] = {}
        for messages in lines.values():
            text = "\n".join(messages)
            if "decides nothing" in text:
                what = "stopped"
            elif "; skipped" in text:
                what = "skipped"
            elif re.search(r", group \w[\w-]*: (none|grow|shrink) ", text):
                what = "decided"
            else:
                what = "unknown"
            outcomes[what] = outcomes.get(what, 0) + 1
        return outcomes


def _epoch(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


async def drive(day: Day) -> None:
    """The day itself, through the Prefect API (PREFECT_API_URL and its auth in the
    environment before this imports Prefect)."""
    from prefect import get_client

    seen_5xx: list[str] = []

    async def count_5xx(response: httpx.Response) -> None:
        if response.status_code >= 500:
            seen_5xx.append(f"{response.status_code} {response.request.method} {response.url.path}")

    hooks = {"event_hooks": {"response": [count_5xx]}}
    async with get_client(httpx_settings=hooks) as client:
        driver = Driver(client)
        await driver.start()
        names = [f"{PREFIX}{i}" for i in range(day.clusters)]
        driver.began = time.monotonic()
        day.loadavg.append(os.getloadavg()[0])
        await asyncio.gather(*(driver.cluster(n, day.workers, day.every, day.hold) for n in names))
        destroyed = time.monotonic() - driver.began
        day.left += await driver.settle()
        day.wall_s = time.monotonic() - driver.began
        day.loadavg.append(os.getloadavg()[0])
        runs = await driver.runs()
        day.autoscale = await driver.autoscale_outcomes(
            [r["id"] for r in runs if r["flow"] == "autoscale"]
        )
    day.phases = {k: [round(a, 1), round(b, 1)] for k, (a, b) in driver.spans.items()}
    day.phases["settled"] = [round(destroyed, 1), round(day.wall_s, 1)]
    day.failures = driver.failures
    for r in runs:
        if r["state"] != "COMPLETED" and r["flow"] not in driver.deployments:  # autoscale
            day.failures.append(f"{r['flow']} {r['cluster']}: {r['state']}: {r['message'][:300]}")
    day.runs = kinds(runs)
    day.runs_per_minute = day.total_runs / (day.wall_s / 60) if day.wall_s else 0.0
    day.at_once = at_once(runs)
    day.errors_5xx["client"] = len(seen_5xx)
    day.examples_5xx += [f"client: {line}" for line in seen_5xx]


def kinds(runs: list[dict[str, Any]]) -> dict[str, Kind]:
    by_flow: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_flow.setdefault(r["flow"], []).append(r)
    out: dict[str, Kind] = {}
    for flow, mine in sorted(by_flow.items()):
        kind = Kind()
        for r in mine:
            kind.states[r["state"]] = kind.states.get(r["state"], 0) + 1
        took = [r["end"] - r["start"] for r in mine if r["start"] and r["end"]]
        waited = [max(r["start"] - r["due"], 0.0) for r in mine if r["start"] and r["due"]]
        kind.median_s = round(statistics.median(took), 1) if took else 0.0
        kind.longest_s = round(max(took), 1) if took else 0.0
        kind.waited_median_s = round(statistics.median(waited), 1) if waited else 0.0
        kind.waited_s = round(max(waited), 1) if waited else 0.0
        out[flow] = kind
    return out


def at_once(runs: list[dict[str, Any]]) -> int:
    """The most flow runs running at the same moment."""
    edges = sorted(
        [(r["start"], 1) for r in runs if r["start"] and r["end"]]
        + [(r["end"], -1) for r in runs if r["start"] and r["end"]]
    )  # at a tie the end (-1) sorts first
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


class Health(threading.Thread):
    """The probes crv's flows and serve process make before they act (crv.base.running.running:
    the service's /v1/health, the Prefect API's /admin/version with its auth), every
    PROBE_EVERY s through the day, each timed; a flow gives up ("the crv service is not
    running") when either has not answered within PROBE_PATIENCE for 30 s."""

    def __init__(self, home: Path, api_url: str, auth: str) -> None:
        super().__init__(daemon=True)
        service_url = json.loads((home / "service" / "daemon.json").read_text())["url"]
        context = ssl.create_default_context(cafile=str(Home(home).ca_file))
        self.probes = {
            "service": (urllib.request.Request(f"{service_url}/v1/health"), context),
            "prefect": (request_with_auth(f"{api_url}/admin/version", auth), None),
        }
        self.times: dict[str, list[float]] = {name: [] for name in self.probes}
        self.slow: list[str] = []  # when a probe took over PROBE_PATIENCE, and how long
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(PROBE_EVERY):
            for name, (request, context) in self.probes.items():
                began = time.monotonic()
                try:
                    with urllib.request.urlopen(
                        request, timeout=PROBE_TIMEOUT, context=context
                    ) as r:
                        r.read()
                    answer = "answered after"
                except OSError as e:  # an error answer, or none within PROBE_TIMEOUT: timed too
                    answer = f"{type(e).__name__} after"
                took = time.monotonic() - began
                self.times[name].append(took)
                if took > PROBE_PATIENCE:
                    at = time.strftime("%H:%M:%S", time.localtime(time.time() - took))
                    self.slow.append(f"{name} probe sent at {at}: {answer} {took:.1f} s")

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop_event.set()
        self.join()
        return {
            name: {
                "median_ms": round(1000 * statistics.median(times), 1),
                "max_ms": round(1000 * max(times), 1),
                "over_patience": sum(t > PROBE_PATIENCE for t in times),
                "probes": len(times),
            }
            for name, times in self.times.items()
            if times
        }


# -- what the logs and the database say ------------------------------------------------------

ASGI_ERROR = "Exception in ASGI application"  # uvicorn's line for an exception under a request
SERVICE_REFUSED = "refused a connection from"  # the service's 503: too many from one address


def asgi_errors(log: str) -> list[tuple[int, str]]:
    """The answers a server's log shows it gave with an exception: (status, "route: error").

    Prefect's server answers 503 to what its clients may retry (SQLite's "database is locked",
    PostgreSQL's DBAPI errors: prefect.server.api.server.is_client_retryable_exception) and 500
    to the rest; either way uvicorn logs the exception after the answer (crv's server setting
    PREFECT_SERVER_LOG_RETRYABLE_ERRORS keeps the 503s' in). The crv service answers 500."""
    found: list[tuple[int, str]] = []
    blocks = log.split(ASGI_ERROR)[1:]
    for block in blocks:
        routes = re.findall(
            r"/(?:server/api|service/routes)/(\w+)\.py\", line \d+, in (\w+)", block
        )
        errors = re.findall(r"^((?:\w+\.)*\w*(?:Error|Exception)\b.*)$", block, re.MULTILINE)
        error = errors[-1] if errors else "?"
        retryable = "database is locked" in error or (
            error.startswith(("sqlalchemy.exc.", "asyncpg.")) and "sqlite3" not in error
        )
        route = ".".join(routes[-1]) if routes else "?"
        found.append((503 if retryable else 500, f"{route}: {error[:160]}"))
    return found


def logged_5xx(home: Path, day: Day) -> None:
    """The 5xx the Prefect server (and its services, when apart) and the crv service logged."""
    for key in ("prefect 503", "prefect 500", "service 500", "service 503"):
        day.errors_5xx.setdefault(key, 0)
    for party, path in [
        ("prefect", home / "prefect" / "prefect.log"),
        ("prefect", home / "prefect" / "prefect-services.log"),
        ("service", home / "service" / "service.log"),
    ]:
        try:
            log = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        found = asgi_errors(log)
        if party == "service":
            found += [(503, line) for line in log.splitlines() if SERVICE_REFUSED in line]
        for status, what in found:
            key = f"{party} {status}"
            day.errors_5xx[key] = day.errors_5xx.get(key, 0) + 1
            day.examples_5xx.append(f"{path.name}: {status} {what}")


def database_size(home: Path) -> tuple[int, int]:
    """(the Prefect database's bytes, Prefect's own tables' bytes): SQLite's prefect.db with
    its WAL, twice; PostgreSQL's pg_database_size (crv's store is in it too, schema crv_store)
    and the tables, indexes and TOAST of Prefect's schema `public`."""
    url = database_url(Home(home))
    if url is None:
        db = home / "prefect" / "prefect.db"
        total = sum(p.stat().st_size for p in (db, db.with_name("prefect.db-wal")) if p.exists())
        return total, total
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        mine = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm')"
        ).fetchone()
    assert row is not None and mine is not None
    return int(row[0]), int(mine[0])


# -- one day on one database -----------------------------------------------------------------


def one_day(args: argparse.Namespace) -> Day:
    """`crv up` in a temporary home, the day, what was left; everything taken down after."""
    if "prefect" in sys.modules:  # it would keep the settings it read at import
        raise SystemExit("bench_day: prefect was imported before the benchmark set its environment")
    postgres = args.database == "postgresql"
    day = Day(
        database=args.database,
        processes=args.processes if postgres else 1,
        clusters=args.clusters,
        workers=args.workers,
        every=args.every,
        hold=args.hold,
    )
    root = Path(tempfile.mkdtemp(prefix="crv-bench-day-"))
    home = root / "home"
    env = {**os.environ, "CRV_HOME": str(home), "CRV_SIM_LATENCY": LATENCY}
    env["CRV_SERVICE_PROCESSES"] = str(day.processes)
    env.pop("CRV_DATABASE_URL", None)
    saved = dict(os.environ)
    print(
        f"crv day benchmark ({describe(day)}): {day.clusters} clusters of {APPLIANCE} on the sim "
        f"pool ({day.workers} web nodes, grown to {day.workers + 1}), autoscale every "
        f"{day.every:g} s, {day.hold:g} s between changes; {os.cpu_count()} CPUs",
        flush=True,
    )
    try:
        started = time.monotonic()
        crv(env, "up", *(["--postgres"] if postgres else []), timeout=600)
        day.up_s = time.monotonic() - started
        credentials = json.loads(crv(env, "api-credentials", "--json"))
        # Prefect reads its settings once, at import: set them first (prefect is not imported)
        os.environ.update(credentials["env"])
        os.environ["PREFECT_HOME"] = str(root / "client")
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
        day.db_bytes_up = database_size(home)[0]
        health = Health(home, credentials["api_url"], credentials["auth_string"])
        health.start()
        try:
            asyncio.run(drive(day))
        finally:
            day.health = health.stop()
            day.slow_probes = health.slow
        clusters = json.loads(crv(env, "list", "--json"))["clusters"]
        day.left += [f"cluster {c['name']} ({c['nodes']} nodes)" for c in clusters]
        nodes = SimPool(Home(home).pool_dir("sim")).list_nodes()
        day.left += [f"sim node {n.name}" for n in nodes]
        day.db_bytes, day.db_prefect_bytes = database_size(home)
        logged_5xx(home, day)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if not args.keep:
            take_down(env, home)
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"  kept: CRV_HOME={home} (crv down, then remove it)")
    return day


def take_down(env: dict[str, str], home: Path) -> None:
    """`crv down`, the sim host (its nodes with it), the home's PostgreSQL: each tried, even if
    one before it failed."""
    from crv_cli.postgres import LocalPostgres

    def down() -> None:
        subprocess.run(
            [sys.executable, "-m", "crv_cli", "down"], env=env, capture_output=True, timeout=300
        )

    def sim() -> None:
        SimPool(Home(home).pool_dir("sim")).shutdown()

    def postgres() -> None:
        if (home / "postgres").is_dir():
            LocalPostgres(home / "postgres").destroy()

    for step in (down, sim, postgres):
        try:
            step()
        except Exception as e:  # the next one still runs; say what this one left
            print(f"  cleanup: {type(e).__name__}: {e}", file=sys.stderr)


# -- the report ------------------------------------------------------------------------------


def describe(day: Day) -> str:
    processes = "1 service process" if day.processes == 1 else f"{day.processes} service processes"
    return f"{DATABASES[day.database]}, {processes}"


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def report(day: Day) -> None:
    print(f"  crv up: {day.up_s:.1f} s")
    print(
        f"  day: {day.wall_s:.1f} s wall, {day.total_runs} flow runs, "
        f"{day.runs_per_minute:.1f} per minute, at most {day.at_once} running at once (load "
        f"average {' -> '.join(f'{x:.1f}' for x in day.loadavg)})"
    )
    for flow, k in day.runs.items():
        states = ", ".join(f"{n} {s}" for s, n in sorted(k.states.items()))
        print(
            f"    {flow:17} {states}: median {k.median_s:.1f} s, longest {k.longest_s:.1f} s, "
            f"started {k.waited_median_s:.1f} s (median), up to {k.waited_s:.1f} s after due"
        )
    if day.autoscale:
        what = ", ".join(f"{n} {k}" for k, n in sorted(day.autoscale.items()))
        print(f"    autoscale runs: {what} (skipped: another change held the cluster; stopped: "
              "the cluster gone or its deployment paused)")  # fmt: skip
    phases = " | ".join(f"{k} {a:.1f}-{b:.1f}" for k, (a, b) in day.phases.items())
    print(f"  phases (s after the first run was made): {phases}")
    for name, h in day.health.items():
        print(
            f"  {name} health probe: median {h['median_ms']:.0f} ms, max {h['max_ms']:.0f} ms, "
            f"{h['over_patience']:g} of {h['probes']:g} over {PROBE_PATIENCE:g} s"
        )
    for line in day.slow_probes[:5]:
        print(f"    {line}")
    where = ", ".join(f"{k} {n}" for k, n in day.errors_5xx.items())
    print(f"  5xx answered: {day.seen_5xx} ({where}; this client's are among the logged)")
    for line, n in collections.Counter(day.examples_5xx).most_common(8):
        print(f"    {n} x {line}")
    if day.database == "sqlite":
        size = f"prefect.db {megabytes(day.db_bytes_up)} after crv up, {megabytes(day.db_bytes)} "
        size += "after the day (with its WAL)"
    else:
        size = f"database {megabytes(day.db_bytes_up)} after crv up, {megabytes(day.db_bytes)} "
        size += f"after the day, Prefect's tables {megabytes(day.db_prefect_bytes)}"
    print(f"  Prefect database: {size}")
    print(
        "  left: "
        + ("; ".join(day.left[:10]) if day.left else "nothing (no cluster in crv list, no sim "
           "node, no autoscale/* deployment, no unfinished run)")
    )  # fmt: skip
    for line in day.failures[:10]:
        print(f"  FAILED: {line}")
    print(f"day ({describe(day)}): {verdict(day)}")


def verdict(day: Day) -> str:
    done = "every run COMPLETED" if day.completed else "NOT every run completed"
    five = f"{day.seen_5xx} 5xx" + ("" if day.seen_5xx == 0 else " (target 0)")
    left = "nothing left" if not day.left else f"{len(day.left)} things LEFT"
    return f"{done}, {five}, {left}"


def side_by_side(days: list[Day]) -> None:
    """The figures of each database in a column."""

    def states(k: Kind | None) -> str:
        return "-" if k is None else ", ".join(f"{n} {s}" for s, n in sorted(k.states.items()))

    rows: list[tuple[str, list[str]]] = [
        ("wall", [f"{d.wall_s:.1f} s" for d in days]),
        ("flow runs", [str(d.total_runs) for d in days]),
        ("runs per minute", [f"{d.runs_per_minute:.1f}" for d in days]),
        ("at most at once", [str(d.at_once) for d in days]),
    ]
    flows = sorted({f for d in days for f in d.runs})
    rows += [(flow, [states(d.runs.get(flow)) for d in days]) for flow in flows]
    rows += [
        ("longest wait", [f"{max(k.waited_s for k in d.runs.values()):.1f} s" for d in days]),
        *[
            (
                f"{name} health",
                [
                    f"max {d.health[name]['max_ms']:.0f} ms" if name in d.health else "-"
                    for d in days
                ],
            )
            for name in ("service", "prefect")
        ],
        ("5xx answered", [str(d.seen_5xx) for d in days]),
        ("Prefect database", [megabytes(d.db_bytes) for d in days]),
        ("left", [str(len(d.left)) for d in days]),
        ("crv up", [f"{d.up_s:.1f} s" for d in days]),
        ("load average", [" -> ".join(f"{x:.1f}" for x in d.loadavg) for d in days]),
    ]
    head = [describe(d) for d in days]
    widths = [
        max(len(c) for c in [h, *(cells[i] for _, cells in rows)]) + 3 for i, h in enumerate(head)
    ]
    first = days[0]
    print(
        f"{first.clusters}-cluster day ({APPLIANCE}, {first.workers} -> {first.workers + 1} web "
        f"nodes, autoscale every {first.every:g} s, {os.cpu_count()} CPUs):"
    )
    for label, cells in [("", head), *rows]:
        line = "".join(f"{c:{w}}" for c, w in zip(cells, widths, strict=True))
        print(f"  {label:18}{line}".rstrip())
    for d in days:
        print(f"  {describe(d)}: {verdict(d)}")


# -- entry points ----------------------------------------------------------------------------


def both(args: argparse.Namespace) -> list[Day]:
    """SQLite, then PostgreSQL, each in a process of its own; their figures."""
    days: list[Day] = []
    with tempfile.TemporaryDirectory(prefix="crv-bench-day-both-") as tmp:
        for database in DATABASES:
            out = Path(tmp) / f"{database}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_day", "--database", database]
            cmd += ["--clusters", str(args.clusters), "--processes", str(args.processes)]
            cmd += ["--workers", str(args.workers), "--every", f"{args.every:g}"]
            cmd += ["--hold", f"{args.hold:g}", "--json", str(out), *["--keep"] * args.keep]
            child = subprocess.Popen(cmd)
            try:
                child.wait()
            except BaseException as stop:
                if not isinstance(stop, KeyboardInterrupt):  # Ctrl-C reached it already
                    child.terminate()
                child.wait(timeout=600)
                raise
            if not out.exists():
                raise SystemExit(f"bench_day --database {database}: exit code {child.returncode}")
            days.append(Day.load(json.loads(out.read_text())))
    print()
    side_by_side(days)
    return days


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_day")
    parser.add_argument("--clusters", type=int, default=10)
    add_database_options(parser, "PostgreSQL (`crv up --postgres`)")
    parser.add_argument("--workers", type=int, default=2, help="web nodes per cluster at first")
    parser.add_argument("--every", type=float, default=30.0, help="autoscale interval, seconds")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds between two changes")
    parser.add_argument("--smoke", action="store_true", help="2 clusters of 1 web node, SQLite")
    parser.add_argument("--keep", action="store_true", help="leave CRV_HOME and the daemons")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE",
        help="also write the figures as JSON to FILE (without FILE: one line on stdout)",
    )  # fmt: skip
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.clusters, args.workers, args.database = 2, 1, "sqlite"
    if args.database == "both":
        days = both(args)
        if args.json:
            write_json(args.json, [asdict(d) for d in days])
        if not all(d.ok for d in days):
            raise SystemExit(1)
        return
    day = one_day(args)
    report(day)
    if args.json:
        write_json(args.json, asdict(day))
    if not day.ok:
        raise SystemExit(1)


def write_json(where: str, data: Any) -> None:
    text = json.dumps(data)
    if where == "-":
        print(text)
    else:
        Path(where).write_text(text)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
