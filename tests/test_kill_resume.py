"""Kill the flow process at several points of a deploy and of a resize, then run the same
command again: it converges, and at no point does `crv status` show a node the pool does not
have, nor does the pool hold a node crv does not know.

"Kill" is SIGKILL of the `crv deploy` / `crv scale` process, which runs the flow in-process; the
nodes' agents live on (they are their own sessions), as they would on real machines. The kill
points are reached deterministically: the recipes of a throw-away appliance write marker files
into their node's `work/` and sleep, and the test polls those files, the pool's `node.json`
records and `node.crt` (written once the agent enrolled) before it kills.

A killed change keeps its cluster's change slot (flows/locks.py) until its lease expires, 60-75 s
after the kill, so the re-run waits that long. Every scenario therefore has a cluster of its own,
and all of them run at once (one thread each, every `crv` a separate process): the waits overlap.
The module fixture drives every scenario to its end and records what it saw; the tests then
judge each scenario's record.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from crv.base.home import Home
from crv.service.client import Service
from crv_cli import daemons
from pools import get_pool
from tests.conftest import REPO, write_appliance
from tests.test_deploy_e2e import Crv

# Node states (crv/service/store.py, crv/service/app.py) that say the pool may or may not hold the
# node yet: registered, being made, or being removed. Every other state is settled: the pool
# holds that node and it runs.
TRANSITIONAL = {"planned", "provisioning", "leaving"}

APPLIANCE = """\
apiVersion: crv/v1
name: killr
parameters:
  workers: {type: integer, default: 1, minimum: 1, maximum: 5}
  slow-from: {type: integer, default: 99, minimum: 0, maximum: 99}
  top-sleep: {type: integer, default: 0, minimum: 0, maximum: 60}
  top-from: {type: integer, default: 1, minimum: 1, maximum: 9}
  linger-on: {type: integer, default: 99, minimum: 0, maximum: 99}
nodes:
  w: {count: "{{ workers }}", roles: [svc], scale: {min: 1, max: 5}}
  head: {count: 1, roles: [top]}
roles:
  svc: {recipe: svc.sh, publishes: [name]}
  top: {recipe: top.sh, depends_on: [svc]}
"""

# svc on w-<i> sleeps when i >= slow-from; top sleeps from its top-from-th run on. Each run
# appends "start" then "done" to a file in the node's work/ (the recipe's cwd). svc publishes
# an attribute, so that top reads the w nodes and runs again when the group is resized.
# svc on w-<linger-on> leaves a process that ignores SIGTERM: destroying that node takes the
# local pool's TERM_GRACE (3 s), a window to kill in between two destroys.
SVC = """\
#!/bin/sh
set -e
echo start >> svc.txt
if [ "${CRV_NODE##*-}" -ge "$CRV_PARAM_SLOW_FROM" ]; then sleep 10; fi
if [ "${CRV_NODE##*-}" -eq "$CRV_PARAM_LINGER_ON" ]; then
  (trap '' TERM; exec sleep 600) </dev/null >/dev/null 2>&1 &
fi
crv-agent set name "$CRV_NODE"
echo done >> svc.txt
"""
TOP = """\
#!/bin/sh
echo start >> top.txt
if [ "$(grep -c start top.txt)" -ge "$CRV_PARAM_TOP_FROM" ]; then sleep "$CRV_PARAM_TOP_SLEEP"; fi
echo done >> top.txt
"""

POLL = 0.01
REACH_DEADLINE = 240.0  # seconds for a kill point to be reached (a slow, shared machine)
RERUN_TIMEOUT = 480.0  # lease expiry (<= 75 s) + the waiter's retry (<= 30 s) + the run


@dataclass
class View:
    """What crv and the pool say about one cluster at one moment."""

    status: dict[str, Any] | None  # `crv status NAME --json`, None if it failed
    status_error: str
    pool: dict[str, tuple[str, str]]  # node -> (cluster, pool state)

    def violations(self) -> list[str]:
        if self.status is None:
            return [f"crv status failed: {self.status_error}"]
        shown = {n["name"]: n["state"] for n in self.status["nodes"]}
        found = [
            f"the pool has {name} ({state}, cluster {cluster!r}) but crv status does not show it"
            for name, (cluster, state) in sorted(self.pool.items())
            if name not in shown
        ]
        found += [
            f"crv status shows {name} as {state} but the pool "
            + (f"has it {self.pool[name][1]}" if name in self.pool else "does not have it")
            for name, state in shown.items()
            if state not in TRANSITIONAL and self.pool.get(name, ("", ""))[1] != "running"
        ]
        return found

    def describe(self) -> str:
        shown = {n["name"]: n["state"] for n in (self.status or {}).get("nodes", [])}
        return f"status nodes {shown}, pool nodes { {k: v[1] for k, v in self.pool.items()} }"


@dataclass
class Scenario:
    key: str
    what: str
    cluster: str
    deploy_sets: tuple[str, ...]  # --set for the deploy (the killed one, or the set-up one)
    resize: tuple[str, int] | None  # (group, count) when the killed command is `crv scale`
    reached: Callable[[Scenario, Crv], bool]  # the kill point
    freeze: bool  # SIGSTOP on reaching it, check `frozen` while stopped, then SIGKILL
    frozen: Callable[[Scenario, Crv], list[str]]  # kill-point problems seen while stopped
    after_kill: Callable[[Scenario, Crv, View], list[str]]  # kill-point problems after it
    wanted: list[str]  # the nodes the plan wants in the end
    victims: list[str]  # the nodes a shrink removes
    top_runs: int  # how often `top` has run once converged


@dataclass
class Outcome:
    phase: str = "set-up"
    error: str | None = None
    setup_output: str = ""
    killed_output: str = ""
    killed_after: float = 0.0  # seconds from the start of the killed command to the kill
    point_problems: list[str] = field(default_factory=list)
    at_kill: View | None = None
    victim_serials: set[int] = field(default_factory=set)
    rerun_rc: int | None = None
    rerun_output: str = ""
    prefect_errors: str = ""  # the Prefect server's last errors, if the run again failed
    rerun_seconds: float = 0.0
    final: View | None = None
    agents: Counter[str] = field(default_factory=Counter)
    svc_runs: dict[str, int] = field(default_factory=dict)
    top_runs: int = -1
    dirs: list[str] = field(default_factory=list)
    crl: set[int] = field(default_factory=set)
    destroy_rc: int | None = None
    destroy_output: str = ""
    left_processes: list[int] = field(default_factory=list)
    watched: Watch | None = None
    left_dirs: list[str] = field(default_factory=list)


# -- reading the pool, the node files and the processes -------------------------------------


def pool_dir(crv: Crv) -> Path:
    return crv.home / "pools" / "local"


def node_file(crv: Crv, node: str, name: str) -> Path:
    return pool_dir(crv) / node / name


def work_text(crv: Crv, node: str, name: str) -> str:
    try:
        return (pool_dir(crv) / node / "work" / name).read_text()
    except OSError:
        return ""


def pool_view(crv: Crv, cluster: str) -> dict[str, tuple[str, str]]:
    """The pool's own listing: the cluster's nodes, plus whatever it holds under one of the
    cluster's node names without knowing the cluster (a create cut short)."""
    pool = get_pool("local", pool_dir(crv))
    return {
        n.name: (n.cluster, n.state)
        for n in pool.list_nodes()
        if n.cluster == cluster or n.name.startswith(f"{cluster}-")
    }


def view(crv: Crv, cluster: str) -> View:
    r = crv("status", cluster, "--json")
    status = json.loads(r.stdout) if r.returncode == 0 else None
    return View(status, r.stderr.strip(), pool_view(crv, cluster))


def markers(pid: int) -> dict[str, str] | None:
    """The CRV_LOCAL_* variables of a live process of ours, None for any other."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if stat[stat.rindex(")") + 2] == "Z":
        return None
    found = {}
    for item in environ.split(b"\0"):
        if item.startswith(b"CRV_LOCAL_"):
            key, _, value = item.partition(b"=")
            found[key.decode()] = value.decode()
    return found


def node_processes(crv: Crv, cluster: str) -> list[int]:
    return [
        pid
        for pid in crv.node_processes()
        if (m := markers(pid)) is not None
        and (
            m.get("CRV_LOCAL_CLUSTER") == cluster
            or m.get("CRV_LOCAL_NODE", "").startswith(f"{cluster}-")
        )
    ]


def agents_per_node(crv: Crv, cluster: str) -> Counter[str]:
    """How many crv-agent processes run for each node of the cluster (1 each, or a node was
    made twice)."""
    count: Counter[str] = Counter()
    for pid in node_processes(crv, cluster):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        m = markers(pid)
        if m is not None and b"crv-agent" in cmdline:
            count[m.get("CRV_LOCAL_NODE", "?")] += 1
    return count


def serial(crv: Crv, node: str) -> int:
    pem = node_file(crv, node, "node.crt").read_bytes()
    return x509.load_pem_x509_certificate(pem).serial_number


class Watch:
    """Samples crv's records and the pool over and over while a scenario runs (the killed
    command, the time after the kill, the run again): the two must agree at every moment, not
    only at the kill. A sample reads the pool, then the service, then the pool again, so a
    node that changes in between is judged by whichever pool reading fits it."""

    def __init__(self, crv: Crv, cluster: str) -> None:
        self.crv, self.cluster = crv, cluster
        self.seen: dict[str, str] = {}  # violation -> the sample that showed it first
        self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        home = Home(self.crv.home)
        endpoints = daemons.running(home)
        assert endpoints is not None
        service = Service(home, endpoints.service_url)
        while not self._stop.is_set():
            try:
                before = pool_view(self.crv, self.cluster)
                status = service.status(self.cluster)
                after = pool_view(self.crv, self.cluster)
            except Exception as e:  # a busy service: the next sample will do
                self.errors.append(repr(e))
            else:
                self.samples += 1
                if status is not None:
                    for v in sample_violations(before, status, after):
                        shown = {n["name"]: n["state"] for n in status["nodes"]}
                        self.seen.setdefault(v, f"status {shown}, pool {before} then {after}")
            self._stop.wait(0.2)


def sample_violations(
    before: dict[str, tuple[str, str]], status: dict[str, Any], after: dict[str, tuple[str, str]]
) -> list[str]:
    shown = {n["name"]: n["state"] for n in status["nodes"]}
    found = [
        f"the pool had {name} but crv did not know it"
        for name in sorted(set(before) & set(after))
        if name not in shown
    ]
    found += [
        f"crv showed {name} {state} while the pool did not have it running"
        for name, state in shown.items()
        if state not in TRANSITIONAL
        and before.get(name, ("", ""))[1] != "running"
        and after.get(name, ("", ""))[1] != "running"
    ]
    return found


# -- the kill points --------------------------------------------------------------------------


def names(cluster: str, group: str, indices: range) -> list[str]:
    return [f"{cluster}-{group}-{i}" for i in indices]


def created(crv: Crv, node: str) -> bool:
    """The pool made the node: its record names the agent's pid (written after the spawn)."""
    try:
        record = json.loads(node_file(crv, node, "node.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("pid") is not None


def enrolled(crv: Crv, nodes: list[str]) -> list[str]:
    return [n for n in nodes if node_file(crv, n, "node.crt").exists()]


def running_svc(crv: Crv, nodes: list[str]) -> list[str]:
    """Nodes whose svc recipe has started and not finished."""
    return [
        n for n in nodes if (t := work_text(crv, n, "svc.txt")).count("start") > t.count("done")
    ]


def nothing_enrolled(crv: Crv, nodes: list[str]) -> list[str]:
    """Killed inside the provision stage: a node made, and not all of them enrolled. (Agents
    enrol on their own once the flow recorded their node, frozen flow or not, so on a loaded
    machine the first nodes may have enrolled before the freeze: that is still this stage.)"""
    made = [n for n in nodes if created(crv, n)]
    problems = [] if made else ["no node had been created in the pool"]
    if set(enrolled(crv, nodes)) == set(nodes):
        problems.append(f"every node had enrolled already: {enrolled(crv, nodes)}")
    return problems


def no_problems(*_: Any) -> list[str]:
    return []


def roles_of(v: View) -> dict[str, dict[str, str]]:
    return {n["name"]: n["roles"] for n in (v.status or {}).get("nodes", [])}


def states_of(v: View) -> dict[str, str]:
    return {n["name"]: n["state"] for n in (v.status or {}).get("nodes", [])}


def ws(s: Scenario, indices: range) -> list[str]:
    return names(s.cluster, "w", indices)


def head(s: Scenario) -> str:
    return f"{s.cluster}-head-0"


# (a), (d1): the first nodes made in the pool (all of them, or the new ones), none enrolled
def first_made(s: Scenario, crv: Crv) -> bool:
    return any(created(crv, n) for n in (ws(s, range(1, 3)) if s.resize else s.wanted))


def none_enrolled(s: Scenario, crv: Crv) -> list[str]:
    return nothing_enrolled(crv, ws(s, range(1, 3)) if s.resize else s.wanted)


# (b): w-0 enrolled and its recipe done, the recipes of others running
def some_done_others_running(s: Scenario, crv: Crv) -> bool:
    first, *others = ws(s, range(3))
    return "done" in work_text(crv, first, "svc.txt") and bool(running_svc(crv, others))


# (c): top runs on head-0, svc verified on every w node
def top_started(s: Scenario, crv: Crv) -> bool:
    return "start" in work_text(crv, head(s), "top.txt")


def top_runs_after_svc_verified(s: Scenario, crv: Crv, v: View) -> list[str]:
    roles = roles_of(v)
    problems = [
        f"svc on {w} was {roles.get(w)}"
        for w in ws(s, range(2))
        if roles.get(w) != {"svc": "verified"}
    ]
    # the agent runs on after the flow's kill: top may have finished by the time we look
    top = roles.get(head(s), {}).get("top")
    if top not in ("released", "running", "done"):
        problems.append(f"top on head-0 was {top}, not started")
    return problems


# (d2): a new node's recipe runs
def new_node_contextualizing(s: Scenario, crv: Crv) -> bool:
    return bool(running_svc(crv, ws(s, range(1, 3))))


# (e1): the victims leaving, top running again without them
def top_started_again(s: Scenario, crv: Crv) -> bool:
    return work_text(crv, head(s), "top.txt").count("start") >= 2


def victims_leaving_top_running(s: Scenario, crv: Crv, v: View) -> list[str]:
    states = states_of(v)
    problems = [
        f"{n} was {states.get(n)}, not leaving" for n in s.victims if states.get(n) != "leaving"
    ]
    problems += [
        f"victim {n} was not running in the pool ({v.pool.get(n)})"
        for n in s.victims
        if v.pool.get(n, ("", ""))[1] != "running"
    ]
    top = roles_of(v).get(head(s), {}).get("top")
    if top not in ("released", "running"):
        problems.append(f"top on head-0 was {top}, not running again")
    return problems


# (e2): the newest victim destroyed in the pool, the other one still a member, leaving
def first_victim_destroyed(s: Scenario, crv: Crv) -> bool:
    return not (pool_dir(crv) / s.victims[0]).exists()


def second_victim_leaving(s: Scenario, crv: Crv, v: View) -> list[str]:
    states = states_of(v)
    problems = []
    if states.get(s.victims[1]) != "leaving":
        problems.append(f"{s.victims[1]} was {states.get(s.victims[1])}, not leaving")
    if states.get(s.victims[0]) not in ("leaving", None):
        problems.append(f"{s.victims[0]} was {states.get(s.victims[0])}")
    return problems


def scenarios() -> list[Scenario]:
    def cluster(c: str, workers: int) -> list[str]:
        return [*names(c, "w", range(workers)), f"{c}-head-0"]

    return [
        Scenario(
            "a", "deploy, first nodes created in the pool, none enrolled", "kill-a",
            ("workers=3", "slow-from=1"), None,
            reached=first_made, freeze=True, frozen=none_enrolled, after_kill=no_problems,
            wanted=cluster("kill-a", 3), victims=[], top_runs=1,
        ),
        Scenario(
            "b", "deploy, some nodes enrolled, recipes running", "kill-b",
            ("workers=3", "slow-from=1"), None,
            reached=some_done_others_running, freeze=False, frozen=no_problems,
            after_kill=no_problems,
            wanted=cluster("kill-b", 3), victims=[], top_runs=1,
        ),
        Scenario(
            "c", "deploy, dependent role running after its dependencies were verified", "kill-c",
            ("workers=2", "top-sleep=40"), None,
            reached=top_started, freeze=False, frozen=no_problems,
            after_kill=top_runs_after_svc_verified,
            wanted=cluster("kill-c", 2), victims=[], top_runs=1,
        ),
        Scenario(
            "d1", "grow 1 -> 3, new nodes being provisioned", "kill-d1",
            ("workers=1", "slow-from=1"), ("w", 3),
            reached=first_made, freeze=True, frozen=none_enrolled, after_kill=no_problems,
            wanted=cluster("kill-d1", 3), victims=[], top_runs=2,
        ),
        Scenario(
            "d2", "grow 1 -> 3, new nodes being contextualized", "kill-d2",
            ("workers=1", "slow-from=1"), ("w", 3),
            reached=new_node_contextualizing, freeze=False, frozen=no_problems,
            after_kill=no_problems,
            wanted=cluster("kill-d2", 3), victims=[], top_runs=2,
        ),
        Scenario(
            "e1", "shrink 3 -> 1, victims leaving, dependent role running again", "kill-e1",
            ("workers=3", "top-sleep=30", "top-from=2"), ("w", 1),
            reached=top_started_again, freeze=False, frozen=no_problems,
            after_kill=victims_leaving_top_running,
            wanted=cluster("kill-e1", 1), victims=names("kill-e1", "w", range(2, 0, -1)),
            top_runs=2,
        ),
        Scenario(
            "e2", "shrink 3 -> 1, killed between destroying two victims", "kill-e2",
            ("workers=3", "linger-on=1"), ("w", 1),
            reached=first_victim_destroyed, freeze=False, frozen=no_problems,
            after_kill=second_victim_leaving,
            wanted=cluster("kill-e2", 1), victims=names("kill-e2", "w", range(2, 0, -1)),
            top_runs=2,
        ),
    ]  # fmt: skip


SCENARIOS = scenarios()
KEYS = [s.key for s in SCENARIOS]


# -- driving a scenario -----------------------------------------------------------------------


class Processes:
    """Every `crv` this module started, to kill by pid whatever is left at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def popen(self, crv: Crv, log: Path, *args: str) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            p = subprocess.Popen(
                [sys.executable, "-m", "crv_cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=crv.env,
            )
        self.started.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.kill()
                p.wait()


def run(s: Scenario, crv: Crv, app: Path, logs: Path, procs: Processes, o: Outcome) -> None:
    o.watched = Watch(crv, s.cluster)
    sets = [a for kv in s.deploy_sets for a in ("--set", kv)]
    deploy = ("deploy", str(app), "--name", s.cluster, *sets)
    if s.resize is None:
        command: tuple[str, ...] = deploy
    else:
        o.phase = "set-up deploy"
        r = crv(*deploy, timeout=300)
        o.setup_output = r.stdout + r.stderr
        if r.returncode != 0:
            raise AssertionError(
                f"set-up deploy exited {r.returncode}:\n{o.setup_output}\n"
                f"the Prefect server's last errors:\n{crv.prefect_errors()}"
            )
        o.victim_serials = {serial(crv, v) for v in s.victims}
        command = ("scale", s.cluster, s.resize[0], str(s.resize[1]))

    o.phase = "reaching the kill point"
    log = logs / f"{s.key}-killed.log"
    p = procs.popen(crv, log, *command)
    began = time.monotonic()
    while not s.reached(s, crv):
        if p.poll() is not None:
            o.killed_output = log.read_text()
            raise AssertionError(
                f"`crv {' '.join(command)}` exited {p.returncode} before the kill point:\n"
                f"{o.killed_output}\nthe Prefect server's last errors:\n{crv.prefect_errors()}"
            )
        if time.monotonic() - began > REACH_DEADLINE:
            p.kill()
            raise AssertionError(f"kill point not reached in {REACH_DEADLINE} s")
        time.sleep(POLL)
    if s.freeze:
        os.kill(p.pid, signal.SIGSTOP)
        o.point_problems += s.frozen(s, crv)
    p.kill()
    p.wait()
    o.killed_after = time.monotonic() - began
    o.killed_output = log.read_text()

    o.phase = "checking after the kill"
    o.at_kill = view(crv, s.cluster)
    o.point_problems += s.after_kill(s, crv, o.at_kill)

    o.phase = "running again"
    log = logs / f"{s.key}-again.log"
    began = time.monotonic()
    again = procs.popen(crv, log, *command)
    try:
        o.rerun_rc = again.wait(timeout=RERUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        again.kill()
        again.wait()
        o.rerun_rc = None
    o.rerun_seconds = time.monotonic() - began
    o.rerun_output = log.read_text()
    if o.rerun_rc != 0:
        o.prefect_errors = crv.prefect_errors()
    o.watched.stop()

    o.phase = "checking the converged cluster"
    o.final = view(crv, s.cluster)
    o.agents = agents_per_node(crv, s.cluster)
    o.svc_runs = {n: work_text(crv, n, "svc.txt").count("start") for n in s.wanted if "-w-" in n}
    o.top_runs = work_text(crv, f"{s.cluster}-head-0", "top.txt").count("start")
    o.dirs = sorted(d.name for d in pool_dir(crv).glob(f"{s.cluster}-*"))
    o.crl = crv.revoked_serials()

    o.phase = "destroying"
    d = crv("destroy", s.cluster, timeout=300)
    o.destroy_rc, o.destroy_output = d.returncode, d.stdout + d.stderr
    o.left_processes = node_processes(crv, s.cluster)
    o.left_dirs = sorted(d.name for d in pool_dir(crv).glob(f"{s.cluster}-*"))
    o.phase = "done"


def drive(s: Scenario, crv: Crv, app: Path, logs: Path, procs: Processes) -> Outcome:
    o = Outcome()
    try:
        run(s, crv, app, logs, procs, o)
    except BaseException:
        o.error = f"[{s.key}] while {o.phase}:\n{traceback.format_exc()}"
    finally:
        if o.watched is not None:
            o.watched.stop()
    return o


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    c = Crv(tmp_path_factory.mktemp("crv-home"))
    c.up()
    yield c
    for pid in c.node_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    c("down")


@pytest.fixture(scope="module")
def outcomes(crv: Crv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("kill-resume")
    app = write_appliance(root, "killr", APPLIANCE, ("svc.sh", "top.sh"))
    (app / "svc.sh").write_text(SVC)
    (app / "top.sh").write_text(TOP)
    logs = root / "logs"
    logs.mkdir()
    procs = Processes()
    try:
        with ThreadPoolExecutor(len(SCENARIOS)) as pool:
            futures = {s.key: pool.submit(drive, s, crv, app, logs, procs) for s in SCENARIOS}
            found = {k: f.result() for k, f in futures.items()}
        for key, o in found.items():  # what each kill saw (shown with -s, or on a failure)
            print(
                f"[{key}] killed {o.killed_after:.1f} s in: "
                f"{o.at_kill.describe() if o.at_kill else '-'}; "
                f"run again: exit {o.rerun_rc} in {o.rerun_seconds:.1f} s; phase {o.phase}; "
                f"{o.watched.samples if o.watched else 0} samples, "
                f"{len(o.watched.errors) if o.watched else 0} failed"
            )
        yield found
    finally:
        procs.kill_all()


def scenario(key: str) -> Scenario:
    return next(s for s in SCENARIOS if s.key == key)


PHASES = [
    "set-up", "set-up deploy", "reaching the kill point", "checking after the kill",
    "running again", "checking the converged cluster", "destroying", "done",
]  # fmt: skip
NEEDS = {"kill": "running again", "rerun": "destroying", "destroy": "done"}


def outcome(outcomes: dict[str, Outcome], key: str, upto: str) -> Outcome:
    """The scenario's record; fails with its error if it stopped before `upto` was recorded."""
    o = outcomes[key]
    if o.error is not None and PHASES.index(o.phase) < PHASES.index(NEEDS[upto]):
        pytest.fail(o.error, pytrace=False)
    return o


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_kill_point_reached(outcomes: dict[str, Outcome], key: str) -> None:
    o = outcome(outcomes, key, "kill")
    assert not o.point_problems, (
        f"{scenario(key).what}: the kill {o.killed_after:.1f} s in did not land where meant: "
        f"{o.point_problems}; {o.at_kill.describe() if o.at_kill else ''}"
    )


@pytest.mark.parametrize("key", KEYS)
def test_after_kill_crv_and_pool_agree(outcomes: dict[str, Outcome], key: str) -> None:
    o = outcome(outcomes, key, "kill")
    assert o.at_kill is not None
    assert o.at_kill.violations() == [], f"{scenario(key).what}: {o.at_kill.describe()}"


@pytest.mark.parametrize("key", KEYS)
def test_crv_and_pool_agree_throughout(outcomes: dict[str, Outcome], key: str) -> None:
    """From the first deploy to the end of the run again, through the kill."""
    o = outcome(outcomes, key, "rerun")
    assert o.watched is not None
    assert o.watched.samples >= 10, o.watched.errors[-3:]
    assert o.watched.seen == {}, f"{scenario(key).what}"


@pytest.mark.parametrize("key", KEYS)
def test_run_again_converges(outcomes: dict[str, Outcome], key: str) -> None:
    s = scenario(key)
    o = outcome(outcomes, key, "rerun")
    assert o.rerun_rc == 0, (
        f"{s.what}: run again exited {o.rerun_rc}:\n{o.rerun_output}\n"
        f"the Prefect server's last errors:\n{o.prefect_errors}"
    )
    assert o.final is not None and o.final.status is not None, o.final
    status = o.final.status
    assert o.final.violations() == [], o.final.describe()
    assert status["ready"], o.final.describe()
    assert sorted(n["name"] for n in status["nodes"]) == sorted(s.wanted), o.final.describe()
    for n in status["nodes"]:
        assert n["state"] == "enrolled", n
        assert set(n["roles"].values()) == {"verified"}, n
    assert sorted(o.final.pool) == sorted(s.wanted), o.final.describe()
    assert {name: st for name, (_, st) in o.final.pool.items()} == dict.fromkeys(
        s.wanted, "running"
    )
    assert o.dirs == sorted(s.wanted)
    assert o.agents == Counter(dict.fromkeys(s.wanted, 1)), "one agent per node, no duplicates"
    workers = [n for n in status["nodes"] if n["group"] == "w"]
    expected = s.resize[1] if s.resize else sum(1 for n in s.wanted if "-w-" in n)
    assert len(workers) == expected
    # a recipe that ran (or was running) when the flow was killed is not run again
    assert o.svc_runs == dict.fromkeys(o.svc_runs, 1), o.svc_runs
    assert o.top_runs == s.top_runs


@pytest.mark.parametrize("key", [s.key for s in SCENARIOS if s.victims])
def test_shrink_victims_gone_and_revoked(outcomes: dict[str, Outcome], key: str) -> None:
    s = scenario(key)
    o = outcome(outcomes, key, "rerun")
    assert o.final is not None and o.final.status is not None
    shown = {n["name"] for n in o.final.status["nodes"]}
    for v in s.victims:
        assert v not in shown
        assert v not in o.final.pool
        assert v not in o.dirs
    assert len(o.victim_serials) == len(s.victims)
    assert o.victim_serials <= o.crl


@pytest.mark.parametrize("key", KEYS)
def test_destroy_leaves_nothing(outcomes: dict[str, Outcome], key: str) -> None:
    s = scenario(key)
    o = outcome(outcomes, key, "destroy")
    assert o.destroy_rc == 0, o.destroy_output
    assert f"destroyed {s.cluster}: {len(s.wanted)} nodes removed" in o.destroy_output
    assert o.left_processes == []
    assert o.left_dirs == []


def test_no_node_process_left(outcomes: dict[str, Outcome], crv: Crv) -> None:
    assert crv.node_processes() == []
