"""Prefect workers elsewhere: the deployments on a work pool (`CRV_WORK_POOL=crv crv up`), run by
two `crv worker` processes that have no CRV_HOME, only the directory `crv worker-config` wrote
(as if on two other machines), end to end: a real Prefect server, the real crv service, Prefect's
own process workers, runs created through the Prefect API (`create_flow_run` of a deployment, as
`run_deployment` does).

The nodes are on a sim pool whose state_dir every process names in pools.yaml (the crv machine's
CLI and the workers alike): one sim host, the "cloud" they all reach. Which worker took a run is
read from the workers' own logs ("Flow run '<name>' submitted to infrastructure"). Each worker
takes one run at a time (`--limit 1`), so two runs at once go to both.

The fault: a worker killed (SIGKILL of it and of its flow-run process) while its deploy holds the
cluster's change slot. Nobody is left to report it: the server marks the run Crashed when its
heartbeats stop (the automation deployments.serve makes, 30 s heartbeats, 90 s grace), the slot
frees when the run's lease runs out (60 s, flows/locks.py; the repossessor every 5 s), and the
deploy run again, taken by the other worker, converges.

The module runs twice: on SQLite, then on PostgreSQL (`crv up --postgres`: crv's store and the
Prefect server on a PostgreSQL of the home's own), where what does not depend on the database
(the configuration's files, bad input, the local pool refused) is skipped.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pools.sim import SimPool
from tests.test_deploy_e2e import Crv, prefect_api

POOL = "crv"
SIM = "shared"  # the sim pool every process reaches (pools.yaml, state_dir)
FAST = "provision=0.5,certify=0.2,contextualize=0.5,verify=0.2"
SLOW = "provision=3,certify=0.5,contextualize=1,verify=0.5"  # two changes at once: seconds each
KILLED = "provision=40,certify=0.2,contextualize=0.5,verify=0.2"  # killed while provisioning
WORKERS = ("worker-a", "worker-b")
RUN_TIMEOUT = 180.0


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        """Its flow-run processes (`python -m prefect.engine`), children of the worker."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat_line[stat_line.rindex(")") + 2 :].split()[1]) == self.proc.pid:
                found.append(int(entry.name))
        return found


@dataclass
class Site:
    crv: Crv
    config: Path
    sim_dir: Path
    api: str
    auth: tuple[str, str]
    workers: dict[str, Worker] = field(default_factory=dict)
    database: str = "sqlite"

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """One call to the Prefect API; a 503 (its SQLite database locked by a burst of writes,
        as on a loaded machine) is tried again, backing off, as Prefect's own client does."""
        for attempt in range(8):
            r = httpx.request(method, f"{self.api}{path}", auth=self.auth, timeout=30, **kw)
            if r.status_code != 503:
                break
            time.sleep(min(2**attempt, 16))
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def run(self, name: str, latency: str = FAST, **parameters: Any) -> str:
        """A deploy-appliance run of the web farm (one web node) on the shared sim pool,
        created through the Prefect API; its id."""
        deployment = self.request("GET", "/deployments/name/deploy-appliance/crv")
        body = {
            "parameters": {
                "appliance": "webfarm", "pool": SIM, "name": name,
                "parameters": {"workers": "1"}, **parameters,
            },
            # this run's flow process only: the sim pool's latencies it gives its nodes
            "job_variables": {"env": {"CRV_SIM_LATENCY": latency}},
        }  # fmt: skip
        run = self.request("POST", f"/deployments/{deployment['id']}/create_flow_run", json=body)
        return str(run["id"])

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/flow_runs/{run_id}"))

    def state(self, run_id: str) -> str:
        return str(self.flow_run(run_id)["state"]["type"])

    def wait_final(self, run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            assert time.monotonic() < end, f"run {run_id} still {run['state']['type']}"
            time.sleep(0.5)

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
        return list(self.request("POST", "/logs/filter", json=body))

    def taken_by(self, run_id: str, timeout: float = 60.0) -> str:
        """The worker that took the run: the one whose log says it started the run's process
        (both may try to submit a run: the second is told to abort)."""
        name = self.flow_run(run_id)["name"]
        end = time.monotonic() + timeout
        while True:
            found = [
                w.name
                for w in self.workers.values()
                if f"Flow run '{name}' submitted to infrastructure" in w.text()
            ]
            if found:
                assert len(found) == 1, found
                return found[0]
            assert time.monotonic() < end, f"no worker took run {run_id}"
            time.sleep(0.5)

    def change_span(self, run_id: str, cluster: str) -> tuple[float, float]:
        """When the run's converge began (it logs the cluster's size once it holds the change
        slot) and when it logged the cluster verified: server timestamps, in seconds. A run's
        last lines may reach the server a moment after its final state (its process sends its
        logs in batches, the last ones as it exits)."""
        deadline = time.monotonic() + 30
        while True:
            start = end = None
            lines = self.logs(run_id)
            for line in lines:
                when = _seconds(line["timestamp"])
                if line["message"].startswith(f"cluster {cluster}: ") and start is None:
                    start = when
                if line["message"].startswith(f"cluster {cluster} verified"):
                    end = when
            if start is not None and end is not None:
                return start, end
            assert time.monotonic() < deadline, [x["message"] for x in lines]
            time.sleep(0.5)

    def slots(self, cluster: str) -> int:
        """Active slots of the cluster's change slot (flows/locks.py)."""
        return int(
            self.request("GET", f"/v2/concurrency_limits/crv-cluster-{cluster}")["active_slots"]
        )

    def status(self, cluster: str) -> dict[str, Any]:
        """`crv status NAME --json` on the crv machine (CRV_HOME), the pools asked too."""
        r = self.crv("status", cluster, "--json")
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def start_worker(config: Path, name: str, where: Path) -> Worker:
    """`crv worker --config DIR` as on another machine: no CRV_HOME, nothing of crv's or
    Prefect's environment but what the configuration gives; its own working directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRV_", "PREFECT_"))}
    env.update(
        PYTHONUNBUFFERED="1",
        CRV_SIM_LATENCY=FAST,
        PREFECT_WORKER_QUERY_SECONDS="2",  # how soon it sees a run (default 10 s)
    )
    workdir = where / name
    workdir.mkdir()
    log = where / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crv_cli", "worker", "--config", str(config),
         "--name", name, "--limit", "1"],
        cwd=workdir, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return Worker(name, proc, log)


# heavy (two crv ups, two workers, a killed worker's lease, on two databases): its own CI step
pytestmark = pytest.mark.postgres

POSTGRES = pytest.mark.skipif(
    not Path("/usr/lib/postgresql").is_dir(), reason="Debian's postgresql is not installed"
)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=POSTGRES)])
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    """crv on a work pool with two workers; on SQLite (the default), then with crv's store and
    Prefect's server on a PostgreSQL of the home's own (`crv up --postgres`)."""
    root = tmp_path_factory.mktemp(f"workers-{request.param}")
    home, sim_dir = root / "home", root / "sim"
    home.mkdir(mode=0o700)
    (home / "pools.yaml").write_text(
        f"pools:\n  {SIM}:\n    driver: sim\n    options: {{state_dir: {sim_dir}}}\n"
    )
    crv = Crv(home)
    crv.env.update(CRV_WORK_POOL=POOL, CRV_SIM_LATENCY=FAST)
    started = time.monotonic()
    if request.param == "sqlite":
        up = crv.up()
    else:
        up = crv("up", "--postgres", timeout=300)
        if up.returncode != 0:
            crv("down")
            _drop_postgres(home)
            pytest.fail(f"crv up --postgres failed: {up.stdout}{up.stderr}")
    s = Site(crv, root / "worker-config", sim_dir, prefect_api(crv), crv.prefect_auth)
    s.database = request.param
    try:
        print(f"[{s.database}] crv up with CRV_WORK_POOL: {time.monotonic() - started:.1f} s")
        assert "deploy-appliance/crv" in up.stdout
        assert f"(on work pool {POOL}: run by `crv worker`)" in up.stdout, up.stdout
        made = crv("worker-config", str(s.config))
        assert made.returncode == 0, made.stderr
        assert "crv worker --config" in made.stdout and "get no runs" not in made.stderr
        for name in WORKERS:
            s.workers[name] = start_worker(s.config, name, root)
        end = time.monotonic() + 60
        while not all(f"Worker '{w.name}' started" in w.text() for w in s.workers.values()):
            for w in s.workers.values():
                assert w.proc.poll() is None, f"{w.name} exited: {w.text()}"
            assert time.monotonic() < end, {w.name: w.text() for w in s.workers.values()}
            time.sleep(0.2)
        print(
            f"[{s.database}] two workers up: {time.monotonic() - started:.1f} s after crv up began"
        )
        yield s
    finally:
        for w in s.workers.values():
            if w.proc.poll() is None:
                os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait()
        SimPool(sim_dir).shutdown()
        crv("down")
        _drop_postgres(home)


def _drop_postgres(home: Path) -> None:
    if (home / "postgres").is_dir():
        from crv_cli.postgres import LocalPostgres

        LocalPostgres(home / "postgres").destroy()


def sqlite_only(site: Site) -> None:
    """What does not depend on the database is checked once, on SQLite."""
    if site.database != "sqlite":
        pytest.skip("checked on SQLite; nothing of it depends on the database")


def test_worker_config_is_private_and_complete(site: Site) -> None:
    sqlite_only(site)
    config = site.config
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    files = sorted(p.relative_to(config).as_posix() for p in config.rglob("*") if p.is_file())
    shared = ["ca/ca.crt", "pools.yaml", "service/admin.crt", "service/admin.key",
              "worker.env", "worker.json"]  # fmt: skip
    assert [f for f in files if not f.startswith("prefect/")] == shared
    for name in shared:
        assert stat.S_IMODE((config / name).stat().st_mode) == 0o600, name
    assert (config / "service/admin.key").read_bytes() == (
        site.crv.home / "service/admin.key"
    ).read_bytes()
    data = json.loads((config / "worker.json").read_text())
    assert data["prefect_api_url"] == site.api and data["work_pool"] == POOL
    assert data["service_url"].startswith("https://127.0.0.1:")
    auth = ":".join(site.auth)
    assert f"PREFECT_API_AUTH_STRING={auth}" in (config / "worker.env").read_text()
    # the deployments are on the work pool, not served: module entry points, no storage
    d = site.request("GET", "/deployments/name/deploy-appliance/crv")
    assert d["work_pool_name"] == POOL and d["entrypoint"] == "flows.deploy.deploy_appliance"
    assert (site.crv.home / "prefect" / "work-pool").read_text() == f"{POOL}\n"
    assert d["pull_steps"] == [] and "crv-worker" in d["tags"]
    # no secret on any worker's command line; neither has a CRV_HOME
    key = (config / "service/admin.key").read_text()
    for w in site.workers.values():
        cmdline = Path(f"/proc/{w.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert "prefect\0worker\0start" in cmdline and auth not in cmdline and key not in cmdline
        env = _environ(w.proc.pid)
        assert "CRV_HOME" not in env and env["CRV_WORKER_CONFIG"] == str(config)


def test_the_local_pool_is_refused_on_a_worker_elsewhere(site: Site) -> None:
    sqlite_only(site)
    run_id = site.run("epsilon", pool="local")
    final = site.wait_final(run_id)
    assert final["state"]["type"] == "FAILED"
    assert (
        "pool: local: cannot be used by a Prefect worker on another machine"
        in (final["state"]["message"])
    ), final["state"]
    assert site.crv("status", "epsilon", "--json").returncode != 0  # nothing was recorded


def test_bad_worker_input_is_one_line(site: Site, tmp_path: Path) -> None:
    sqlite_only(site)
    env = {k: v for k, v in os.environ.items() if k != "CRV_HOME"}
    for args, line in [
        (["--config", str(tmp_path / "nope")], f"error: {tmp_path / 'nope'}: not a directory"),
        (["--config", str(tmp_path)], f"error: {tmp_path / 'worker.json'}: missing"),
        (["--config", str(site.config), "--pool", "a b"], "error: --pool='a b': a work pool"),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "crv_cli", "worker", *args],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2 and r.stderr.startswith(line), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_two_clusters_on_two_workers(site: Site) -> None:
    started = time.monotonic()
    runs = {name: site.run(name) for name in ("alpha", "beta")}
    finals = {name: site.wait_final(run_id) for name, run_id in runs.items()}
    elapsed = time.monotonic() - started
    for name, run in finals.items():
        assert run["state"]["type"] == "COMPLETED", (name, run["state"], site.logs(runs[name]))
    takers = {site.taken_by(run_id) for run_id in runs.values()}
    assert takers == set(WORKERS), takers
    for name in runs:
        status = site.status(name)
        assert status["ready"] and len(status["nodes"]) == 2, status
        assert {n["pool"] for n in status["nodes"]} == {SIM}
        # the crv machine's CLI sees the nodes the workers made: the same sim host
        assert status["drift"] == {"missing": [], "orphans": [], "unreachable": {}}, status
    held = {n.name for n in SimPool(site.sim_dir).list_nodes()}
    assert held == {f"{c}-{g}-0" for c in runs for g in ("front", "worker")}
    print(f"[{site.database}] two clusters, two workers: both COMPLETED in {elapsed:.1f} s")


def test_one_change_of_a_cluster_at_a_time_whichever_worker(site: Site) -> None:
    """Two deploys of one cluster at once, one on each worker: the second converges only after
    the first is done (the cluster's change slot, a Prefect global concurrency limit)."""
    started = time.monotonic()
    runs = [site.run("gamma", SLOW), site.run("gamma", SLOW)]
    finals = [site.wait_final(run_id) for run_id in runs]
    elapsed = time.monotonic() - started
    assert [r["state"]["type"] for r in finals] == ["COMPLETED", "COMPLETED"], [
        site.logs(r) for r in runs
    ]
    assert {site.taken_by(run_id) for run_id in runs} == set(WORKERS)
    first, second = sorted(site.change_span(run_id, "gamma") for run_id in runs)
    assert first[1] <= second[0], f"the changes interleaved: {first} and {second}"
    assert first[1] - first[0] > 3.0  # the slow one really took its seconds
    assert site.status("gamma")["ready"]
    print(f"[{site.database}] two changes of gamma, one after the other: {elapsed:.1f} s")


def test_a_worker_killed_during_a_deploy(site: Site) -> None:
    """SIGKILL of a worker and its flow-run process while the deploy holds the cluster's
    change slot: the run ends Crashed, the slot frees, the deploy again on the other worker
    converges."""
    killed_run = site.run("delta", KILLED)
    taker = site.taken_by(killed_run)
    worker = site.workers[taker]
    other = next(w for w in site.workers.values() if w is not worker)
    # the kill point: the flow holds the slot and the pool has made the nodes (they boot)
    end = time.monotonic() + 120
    while True:
        r = site.crv("status", "delta", "--json")
        nodes = json.loads(r.stdout)["nodes"] if r.returncode == 0 else []
        if len(nodes) == 2 and all(n["state"] == "provisioned" for n in nodes):
            break
        assert site.state(killed_run) in ("PENDING", "RUNNING"), site.logs(killed_run)
        assert time.monotonic() < end, nodes
        time.sleep(0.2)
    assert site.slots("delta") == 1
    children = worker.children()
    assert children, f"{taker} runs no flow process"
    for pid in children:  # the flow run's process: as on another machine, no CRV_HOME
        env = _environ(pid)
        assert "CRV_HOME" not in env and env.get("CRV_WORKER_CONFIG") == str(site.config)
    for pid in [worker.proc.pid, *children]:
        os.kill(pid, signal.SIGKILL)
    worker.proc.wait()
    killed_at = time.monotonic()

    # the change slot frees by itself: the run's lease runs out, the server takes it back
    while site.slots("delta") != 0:
        assert time.monotonic() - killed_at < 120, "the change slot of delta is still held"
        time.sleep(0.5)
    freed = time.monotonic() - killed_at
    # the deploy again: the other worker takes it, it converges
    again = site.run("delta")
    final = site.wait_final(again)
    converged = time.monotonic() - killed_at
    assert final["state"]["type"] == "COMPLETED", site.logs(again)
    assert site.taken_by(again) == other.name
    status = site.status("delta")
    assert status["ready"] and status["drift"]["missing"] == [] and status["drift"]["orphans"] == []
    assert {n["name"] for n in status["nodes"]} == {"delta-front-0", "delta-worker-0"}
    assert all(set(n["roles"].values()) == {"verified"} for n in status["nodes"])
    # nobody reported the killed run: the server marks it Crashed when its heartbeats stop
    while (state := site.state(killed_run)) != "CRASHED":
        assert state == "RUNNING", state
        assert time.monotonic() - killed_at < 150, "the killed run is not marked Crashed"
        time.sleep(1)
    crashed = time.monotonic() - killed_at
    message = site.flow_run(killed_run)["state"]["message"]
    assert "heartbeat" in message, message
    print(
        f"[{site.database}] worker killed: slot free after {freed:.1f} s, the deploy again converged "
        f"{converged:.1f} s after the kill, the run marked Crashed after {crashed:.1f} s"
    )
