"""Deploy at scale: the `deploy-appliance` flow for 100 and 1,000 nodes on the sim pool.

Everything is real except the machines: a Prefect server and the crv service (`crv up` under a
temporary CRV_HOME), the flow run in this process, and one simulated agent per node speaking
the real protocol over mutual TLS from the sim host process (pools/sim.py), with the latencies
of the appliance's estimates (benchmarks/appliances/scale: critical path 21 s). Prints the
makespan (the flow call, wall clock), the plan's critical path, their ratio, and the CPU per
node-step of the flow process, the service, the Prefect server and the sim host. Then where
the time went: when each step kind first started and last finished as the flow saw it, and
when the service saw the enrolments and role reports (`--timeline`: CPU use per second of each
party, to see who is saturated when).

Each size runs on SQLite with one service process and on PostgreSQL (a server of the
benchmark's own, Debian's package, or --postgres-url) with several service processes, each in
a process of its own, then side by side. Targets: within 1.25x of the critical path at 1,000
nodes on SQLite; on PostgreSQL 1.10x at 1,000 nodes and 1.25x at 10,000.

    python -m benchmarks.bench_deploy [--nodes 100,1000] [--database sqlite|postgresql|both]
        [--processes N] [--postgres-url URL] [--timeline] [--profile FILE] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import add_database_options, exit_on_sigterm
from crv.appliance.loader import load_appliance
from crv.appliance.plan import Plan, expand
from crv.base.home import Home
from crv.engine.placement import Drivers
from crv.engine.teardown import teardown
from crv.service.client import Service
from crv.service.database import redact
from crv.service.guard import DEFAULT_MAX_CONNS, ENV_MAX_CONNS
from crv_cli import daemons
from pools.sim import SimPool

APPLIANCE = Path(__file__).resolve().parent / "appliances" / "scale"
TARGET_RATIO = 1.25
TARGET_RATIO_SCALED = {1000: 1.10, 10000: 1.25}  # PostgreSQL, several service processes
TARGET_NODES = 1000
TICK = os.sysconf("SC_CLK_TCK")


def sim_latency(plan: Plan) -> str:
    """CRV_SIM_LATENCY from the plan's own step estimates, so the sim takes what the plan says."""
    found: dict[str, float] = {}
    for _, d in plan.steps():
        key = d["kind"] if d["role"] is None else f"{d['kind']}.{d['role']}"
        found[key] = max(found.get(key, 0.0), float(d["seconds"]))
    return ",".join(f"{k}={v:g}" for k, v in sorted(found.items()))


def session_cpu(leader: int | None) -> float:
    """User + system CPU seconds of every live process in the session `leader` started (a
    daemon and its children, e.g. Prefect's server workers)."""
    if leader is None:
        return 0.0
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == leader:  # field 6: session id
            total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return total / TICK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def daemon_pid(record: Path) -> int | None:
    try:
        return int(json.loads(record.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


class Sampler(threading.Thread):
    """CPU use of each party, once a second, for `--timeline`: who is saturated when."""

    def __init__(self, parties: dict[str, int | None]) -> None:
        super().__init__(daemon=True)
        self.parties = parties
        self.rows: list[tuple[float, dict[str, float]]] = []
        self._stop_event = threading.Event()

    @staticmethod
    def machine() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / TICK  # all but idle and iowait

    def snapshot(self) -> dict[str, float]:
        snap = {k: session_cpu(pid) for k, pid in self.parties.items() if k != "flow"}
        snap["flow"] = self_cpu()
        snap["machine"] = self.machine()
        return snap

    def run(self) -> None:
        began, prev = time.monotonic(), self.snapshot()
        while not self._stop_event.wait(1.0):
            now = self.snapshot()
            self.rows.append((time.monotonic() - began, {k: now[k] - prev[k] for k in now}))
            prev = now

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def print(self) -> None:
        names = ["flow", *[k for k in self.parties if k != "flow"]]
        print("    t s  " + " ".join(f"{k:>8}" for k in names) + "    other  (% of one CPU)")
        for t, d in self.rows:
            other = d["machine"] - sum(d[k] for k in names)
            cells = " ".join(f"{100 * d[k]:8.0f}" for k in names)
            print(f"  {t:5.0f}  {cells} {100 * max(other, 0):8.0f}")


def stage_spans(dag: Any, began: float) -> str:
    """The flow's view: per step kind (and role), first start - last finish, in seconds after
    the flow call."""
    spans: dict[str, list[float]] = {}
    for sid, r in dag.results.items():
        d = dag.plan.graph.nodes[sid]
        key = d["kind"] if d["role"] is None else f"{d['kind']}:{d['role']}"
        if r.started is None or r.finished is None:
            continue
        span = spans.setdefault(key, [r.started, r.finished])
        span[0], span[1] = min(span[0], r.started), max(span[1], r.finished)
    order = ["provision", "certify", "contextualize:web", "verify:web"]
    order += ["contextualize:lb", "verify:lb"]
    keys = [k for k in order if k in spans] + sorted(k for k in spans if k not in order)
    return " | ".join(f"{k} {spans[k][0] - began:.1f}-{spans[k][1] - began:.1f}" for k in keys)


def milestones(service: Service, cluster: str, began: float) -> str:
    """When the service saw the last enrolment, the last web done/verified, and lb verified,
    in seconds from the flow call (the plan says 11, 16, 17, 21)."""
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        batch = service.call("GET", f"/v1/admin/clusters/{cluster}/events?after={after}&wait=0")
        events += batch["events"]
        if not batch["events"]:
            break
        after = batch["last"]
    last: dict[str, float] = {}
    first: dict[str, float] = {}
    for ev in events:
        at = datetime.fromisoformat(ev["at"]).timestamp() - began
        key = ev["kind"] if ev["role"] is None else f"{ev['role']} {ev['kind']}:{ev['state']}"
        last[key] = max(last.get(key, at), at)
        first.setdefault(key, at)

    def fmt(key: str) -> str:
        return f"{first[key]:.1f}-{last[key]:.1f}" if key in last else "-"

    return (
        f"enrolled {fmt('enrolled')} | web running {fmt('web role:running')} done "
        f"{fmt('web role:done')} verified {fmt('web verified:verified')} | lb running "
        f"{fmt('lb role:running')} done {fmt('lb role:done')} verified "
        f"{fmt('lb verified:verified')} (s after the flow call)"
    )


def run_one(home: Home, n: int, profile: str | None, timeline: bool) -> float:
    from flows.deploy import PROGRESS_LISTENERS, deploy_appliance

    name = f"scale{n}"
    plan = expand(load_appliance(APPLIANCE, {"nodes": str(n)}), name)
    os.environ["CRV_SIM_LATENCY"] = sim_latency(plan)
    endpoints = daemons.running(home)
    assert endpoints is not None
    service = Service(home, endpoints.service_url)
    service_pid = daemon_pid(home.service_dir / "daemon.json")
    prefect_pid = daemon_pid(home.prefect_dir / "daemon.json")
    pool = SimPool(home.pool_dir("sim"))  # the flow's own driver reads the same variable
    sim_pid = int(pool.start()["pid"])
    before = (
        self_cpu(),
        session_cpu(service_pid),
        session_cpu(prefect_pid),
        session_cpu(sim_pid),
    )
    dags: list[Any] = []

    def capture(dag: Any) -> None:
        if not dags:
            dags.append(dag)

    PROGRESS_LISTENERS.append(capture)
    sampler = Sampler(
        {
            "flow": None,
            "service": service_pid,
            "prefect": prefect_pid,
            "sim": sim_pid,
        }
    )
    began_wall, began = time.time(), time.monotonic()
    if timeline:  # off by default: its /proc walks would count as the flow's CPU
        sampler.start()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    try:
        result = asyncio.run(
            deploy_appliance(
                appliance=str(APPLIANCE), pool="sim", name=name, parameters={"nodes": str(n)}
            )
        )
    finally:
        if profiler and profile:
            profiler.disable()
            profiler.dump_stats(profile)
        PROGRESS_LISTENERS.remove(capture)
    makespan = time.monotonic() - began
    if timeline:
        sampler.stop()
    flow_cpu = self_cpu() - before[0]
    service_cpu = session_cpu(service_pid) - before[1]
    prefect_cpu = session_cpu(prefect_pid) - before[2]
    sim_cpu = session_cpu(sim_pid) - before[3]
    critical = float(result["critical_path_seconds"])
    steps = int(result["steps"])
    ratio = makespan / critical
    print(
        f"deploy {n:>5} nodes {steps:>5} steps: makespan {makespan:6.2f} s, critical path "
        f"{critical:g} s, ratio {ratio:.3f} | CPU ms per node-step: flow "
        f"{flow_cpu / steps * 1000:5.2f}, service {service_cpu / steps * 1000:5.2f}, prefect "
        f"{prefect_cpu / steps * 1000:5.2f}, sim host {sim_cpu / steps * 1000:5.2f} (CPU s: flow "
        f"{flow_cpu:.2f}, service {service_cpu:.2f}, prefect {prefect_cpu:.2f}, sim {sim_cpu:.2f})"
    )
    if dags:
        print(f"  flow:    {stage_spans(dags[0], began)}")
    print(f"  service: {milestones(service, name, began_wall)}")
    if timeline:
        sampler.print()
    teardown(name, Drivers(home), service)
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_deploy")
    parser.add_argument("--nodes", default="100,1000", help="comma-separated sizes (100,1000)")
    parser.add_argument("--profile", help="cProfile the flow process of the largest size to FILE")
    parser.add_argument("--timeline", action="store_true", help="CPU use per second")
    parser.add_argument("--keep", action="store_true", help="leave CRV_HOME and the daemons")
    parser.add_argument("--smoke", action="store_true", help="one 5-node deploy per database (CI)")
    add_database_options(parser, "PostgreSQL")
    parser.add_argument(
        "--postgres-url",
        help="a PostgreSQL database to use (else one of the benchmark's own, started and removed)",
    )
    parser.add_argument("--json", help="also write {size: ratio} to this file")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.database == "both":
        both(args)
        return
    sizes = [5] if args.smoke else [int(s) for s in args.nodes.split(",") if s.strip()]

    if "prefect" in sys.modules:  # it would keep the settings it read at import
        message = "bench_deploy: prefect was imported before the benchmark set its environment"
        if args.smoke:
            raise SystemExit(message)
        print(message)
        return
    saved = dict(os.environ)
    root = Path(tempfile.mkdtemp(prefix="crv-bench-"))
    os.environ["CRV_HOME"] = str(root)
    # every simulated agent dials the service from 127.0.0.1 on a connection of its own: past
    # the service's default cap per client address, raise it for this run (docs/service-api.md)
    wanted = 2 * max(sizes, default=0) + 256
    if wanted > DEFAULT_MAX_CONNS and not os.environ.get(ENV_MAX_CONNS):
        os.environ[ENV_MAX_CONNS] = str(wanted)
    home = Home(root)
    local: Any = None
    if args.database == "postgresql":
        url = args.postgres_url
        if url is None:
            from crv_cli.postgres import LocalPostgres

            local = LocalPostgres(root / "postgres")
            url = local.start()
        os.environ["CRV_DATABASE_URL"] = url
        os.environ["CRV_SERVICE_PROCESSES"] = str(args.processes)
        what = f"PostgreSQL ({redact(url)}), {args.processes} service processes"
    else:
        os.environ.pop("CRV_DATABASE_URL", None)
        os.environ["CRV_SERVICE_PROCESSES"] = "1"
        what = "SQLite, 1 service process"
    print(f"crv deploy benchmark: sim pool, {what}, {os.cpu_count()} CPUs, CRV_HOME {root}")
    started = time.monotonic()
    ratios: dict[int, float] = {}
    try:
        endpoints = daemons.up(home)
        # Prefect reads its settings once, at import: set them first (prefect is not imported)
        os.environ.update(daemons.prefect_env(home, endpoints.prefect_api_url))
        print(f"  crv up: {time.monotonic() - started:.1f} s ({endpoints.prefect_api_url})")
        for n in sizes:
            profile = args.profile if args.profile and n == max(sizes) else None
            ratios[n] = run_one(home, n, profile, args.timeline)
    finally:
        if not args.keep:
            SimPool(home.pool_dir("sim")).shutdown()
            daemons.down(home)
            if local is not None:
                local.destroy()
            shutil.rmtree(root, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)
    if args.json:
        Path(args.json).write_text(json.dumps({str(n): r for n, r in ratios.items()}))
    checked = TARGET_NODES if TARGET_NODES in ratios else max(ratios)
    target = TARGET_RATIO if args.database == "sqlite" else TARGET_RATIO_SCALED.get(checked, 1.25)
    verdict = "meets" if ratios[checked] <= target else "MISSES"
    print(
        f"deploy ({args.database}): {checked} nodes at {ratios[checked]:.2f}x the critical "
        f"path: {verdict} the {target}x target"
    )


def both(args: argparse.Namespace) -> None:
    """SQLite (one service process) and PostgreSQL (several), each in a process of its own
    (Prefect's client reads its server's address once per process), then side by side."""
    rest = ["--nodes", args.nodes, "--processes", str(args.processes)]
    rest += ["--smoke"] * args.smoke + ["--timeline"] * args.timeline + ["--keep"] * args.keep
    if args.postgres_url:
        rest += ["--postgres-url", args.postgres_url]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="crv-bench-both-") as tmp:
        for database in ("sqlite", "postgresql"):
            out = Path(tmp) / f"{database}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_deploy", *rest]
            cmd += ["--database", database, "--json", str(out)]
            code = subprocess.call(cmd)
            if code != 0:
                raise SystemExit(f"bench_deploy --database {database}: exit code {code}")
            results[database] = json.loads(out.read_text())
    print(f"deploy, makespan / critical path ({os.cpu_count()} CPUs; PostgreSQL with "
          f"{args.processes} service processes):")  # fmt: skip
    for size in results["sqlite"]:
        lite, pg = results["sqlite"][size], results["postgresql"].get(size)
        target = TARGET_RATIO_SCALED.get(int(size), TARGET_RATIO)
        shown = f"{pg:.2f}x" if pg is not None else "-"
        print(f"  {int(size):>6} nodes: SQLite {lite:.2f}x | PostgreSQL {shown} "
              f"(target on PostgreSQL {target}x)")  # fmt: skip


if __name__ == "__main__":
    exit_on_sigterm()
    main()
