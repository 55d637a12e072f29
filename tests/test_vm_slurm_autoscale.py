"""The batch cluster that grows from its queue, in real guests: the slurm appliance (a copy whose
`compute` group has `pools: [rack, lab]`) with its controller on a lab guest and its compute
nodes on the lab's PXE rack first (power-saved bare metal behind ipmi_sim BMCs), then on lab
guests; `crv autoscale enable NAME --every 20s` (the scheduled autoscale flow, served by
`crv up`'s serve process) sizes `compute` from the queue the controller publishes
(roles/slurmctld.sh: pending_nodes, pending, running, node_states every queue-every s).

`test_twelve_one_minute_jobs_grow_to_3_and_back_to_1` (the issue's run): 1 compute node (a
rack machine), max 3, a rack of 2 machines; 12 jobs of `sleep 60`. The group grows to 3 (rack,
rack, lab), every job completes (each one COMPLETED with exit code 0:0, once: none failed,
cancelled or requeued), then it shrinks back to 1 without killing a running job: the lab guest
is destroyed, the second rack machine powered off (its BMC says off) and free in the rack, not
destroyed. It prints (-s) the deploy time, the first pending job -> the first job running on a
new node, the grow, the shrink and the node-hours used against the trace's minimum.

`test_short_queue_autoscaling_on_the_rack` (what `./dev vm-check` runs): max 2, 6 jobs of 45 s,
shorter cooldown and scale_down_delay: grows onto the second rack machine and powers it off
again.

Jobs' end states come from `sacct --completion`: sacct reading slurmctld's job completion log
(`JobCompType=jobcomp/filetxt`, /var/log/slurm/jobcomp.log: state and exit code of every job
that ended, one line each time it ended), since the appliance runs no slurmdbd (and MariaDB) for
sacct's usual accounting database.

`./dev test -m rack tests/test_vm_slurm_autoscale.py -n 0 -s`. Slow (TCG): see the timings the
test prints and docs/catalog.md.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from crv.appliance.loader import load_appliance
from tests.conftest import CATALOG
from tests.test_vm_rack_slurm import Crv, guest, lab_down, rack_listed, rack_machines
from tests.test_vm_rack_slurm import pytestmark as rack_marks
from tests.vm_fixtures import BuiltImage, tear_down_lab

pytestmark = rack_marks

SLURM = CATALOG / "slurm"
MACHINES = 2
LONG = 2400.0  # a deploy of TCG guests on a busy 2-core host
POLL = 10.0  # seconds between two looks at the cluster


@dataclass
class Rack:
    crv: Crv
    lab: dict[str, Any]

    def power(self, machine: str) -> str:
        """The machine's power as its BMC reports it (IPMI 2.0 with crv's own client)."""
        from pools.baremetal.ipmi import Bmc, Power

        b = rack_machines(self.crv)[machine]["bmc"]
        password = Path(b["password"]["file"]).read_text().splitlines()[0]
        bmc = Bmc(b["address"], int(b["port"]), b["username"], password,
                  int(b["cipher_suite"]))  # fmt: skip
        return Power("autoscale-test", min_interval=0.1, window=20).state(machine, bmc)

    def domains(self) -> list[str]:
        """The lab's libvirt domains (running or not)."""
        import subprocess

        out = subprocess.run(["virsh", "-c", str(self.lab["uri"]), "list", "--all", "--name"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return sorted(line for line in out.split() if line)


@pytest.fixture(scope="module")
def rack(tmp_path_factory: pytest.TempPathFactory, built_image: BuiltImage) -> Iterator[Rack]:
    image = built_image(*load_appliance(SLURM).packages)  # with the PXE ramdisk
    crv = Crv(tmp_path_factory.mktemp("slurmscale"), tmp_path_factory.mktemp("slurmscalehw"))
    state: dict[str, Any] | None = None
    try:
        started = time.monotonic()
        made = json.loads(crv.ok("lab", "rack", str(MACHINES), "--image", str(image.dir),
                                 "--json", timeout=600))  # fmt: skip
        assert [m["power"] for m in made["machines"]] == ["off"] * MACHINES, made
        state = crv.json("lab", "status")
        print(f"\nlab and rack of {MACHINES}: {time.monotonic() - started:.0f} s")
        yield Rack(crv, state)
    finally:
        tear_down_lab(crv, crv.home, crv.hardware, state)


@dataclass
class Scenario:
    cluster: str
    jobs: int
    job_seconds: int
    max_nodes: int
    pools: list[str]  # where the compute nodes are once grown, by node name order
    scaling: dict[str, Any] = field(default_factory=dict)  # over the appliance's own values
    deadline: float = 3600.0  # seconds from the jobs' submission to the shrink's end


def appliance_copy(tmp_path: Path, sc: Scenario) -> Path:
    """The slurm appliance with `compute` on [rack, lab], at most sc.max_nodes nodes."""
    target = tmp_path / "slurm"
    shutil.copytree(SLURM, target)
    doc = yaml.safe_load((target / "appliance.yaml").read_text())
    compute = doc["nodes"]["compute"]
    compute["pools"] = ["rack", "lab"]
    compute["scale"]["max"] = sc.max_nodes
    compute["scaling"].update(sc.scaling)
    (target / "appliance.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return target


def readings(crv: Crv, cluster: str, role: str, key: str) -> list[dict[str, Any]]:
    """[{node, value, age}] of an attribute, from the service's admin API (as the autoscale
    flow reads it)."""
    from crv.base.home import Home
    from crv.base.running import running
    from crv.service.client import Service

    home = Home(crv.home)
    endpoints = running(home)
    assert endpoints is not None, "the crv service is not running"
    path = f"/v1/admin/clusters/{cluster}/attributes/{role}/{key}"
    return list(Service(home, endpoints.service_url).call("GET", path)["values"])


def queue(crv: Crv, cluster: str) -> dict[str, tuple[str, float]]:
    """key -> (value, age) of what the controller published last."""
    found = {}
    for key in ("pending_nodes", "pending", "running", "node_states"):
        values = readings(crv, cluster, "slurmctld", key)
        if values:
            found[key] = (values[0]["value"], float(values[0]["age"]))
    return found


def wait_for(what: str, check: Any, timeout: float, every: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


SACCT = "sacct --completion -n -P -o JobID,State,ExitCode,NodeList,Submit,Start,End"
FIELDS = ("JobId", "JobState", "ExitCode", "NodeList", "SubmitTime", "StartTime", "EndTime")


def completions(crv: Crv, controller: str) -> list[dict[str, str]]:
    """Every job that ended, as `sacct --completion` lists it: one row each time it ended."""
    text = guest(crv, controller, SACCT)
    return [dict(zip(FIELDS, line.split("|"), strict=True)) for line in text.splitlines() if line]


def clock(text: str) -> float:
    """A Slurm time (the controller's clock: differences only) as seconds."""
    return datetime.fromisoformat(text).timestamp()


def run(rack: Rack, tmp_path: Path, sc: Scenario) -> None:
    crv, name = rack.crv, sc.cluster
    controller = f"{name}-controller-0"
    app = appliance_copy(tmp_path, sc)

    started = time.monotonic()
    out = crv.ok("deploy", str(app), "--pool", "lab", "--name", name, "--set", "computes=1",
                 "--boot-timeout", "900", timeout=LONG)  # fmt: skip
    deploy_s = time.monotonic() - started
    assert f"cluster {name} is ready (2 nodes)" in out, out
    status = crv.json("status", name)
    pools = {n["name"]: n["pool"] for n in status["nodes"]}
    assert pools == {controller: "lab", f"{name}-compute-0": "rack"}, status
    first = next(r for r in rack_listed(rack.crv).values() if r["state"] == "leased")["machine"]

    # the controller publishes the queue: nothing waits, its one compute node idle
    idle = f"{name}-compute-0=idle"
    wait_for("the queue published", lambda: queue(crv, name).get("node_states", ("",))[0] == idle,
             120)  # fmt: skip
    assert {k: v for k, (v, _) in queue(crv, name).items()} == {
        "pending_nodes": "0", "pending": "0", "running": "0", "node_states": idle,
    }  # fmt: skip

    publisher = ("systemctl show -p MainPID --value crv-slurm-queue; "
                 "pgrep -c -f '^[^ ]*python3 [^ ]*/slurm-queue[.]py loop '")  # fmt: skip
    before = guest(crv, controller, publisher).split()
    assert before[1] == "1", before  # one publisher

    submit = " ".join(["cd /tmp &&", f"for i in $(seq {sc.jobs}); do",
                       f"sbatch --parsable -o /dev/null --wrap 'sleep {sc.job_seconds}' || exit 1;",
                       "done"])  # fmt: skip
    jobs = guest(crv, controller, submit).split()
    submitted = time.time()
    assert len(jobs) == sc.jobs and all(j.isdigit() for j in jobs), jobs
    # the queue shows them within a round or two (queue-every 15 s)
    waiting = wait_for(
        "the jobs in the published queue",
        lambda: (q := queue(crv, name)) and int(q["pending_nodes"][0]) >= sc.jobs - 1 and q,
        90,
    )
    print(f"published after the submission: { {k: v for k, (v, _) in waiting.items()} }")

    crv.ok("autoscale", "enable", name, "--every", "20s", timeout=300)
    timeline = [(submitted, 1)]  # (time, compute nodes in crv's records)
    grown_at = shrunk_at = jobs_done_at = None
    deadline = time.monotonic() + sc.deadline
    while shrunk_at is None:
        assert time.monotonic() < deadline, (timeline[-5:], crv.consoles())
        status = crv.json("status", name)
        computes = [n for n in status["nodes"] if n["group"] == "compute"]
        now = time.time()
        timeline.append((now, len(computes)))
        ready = status["ready"] and all(
            n["state"] == "enrolled" and set(n["roles"].values()) == {"verified"}
            for n in status["nodes"]
        )
        if grown_at is None and len(computes) == sc.max_nodes and ready:
            grown_at = now
            grown = {n["name"]: n["pool"] for n in computes}
            print(f"grown: {grown} at {now - submitted:.0f} s after the submission")
            assert sorted(grown.items()) == [
                (f"{name}-compute-{i}", pool) for i, pool in enumerate(sc.pools)
            ], grown
        if jobs_done_at is None and grown_at is not None:
            left = guest(crv, controller, "squeue -h -o %i")
            if not left.split():
                jobs_done_at = now
        if jobs_done_at is not None and len(computes) == 1 and ready:
            shrunk_at = now
        time.sleep(POLL)
    crv.ok("autoscale", "disable", name, timeout=300)

    # the decisions, as `crv autoscale status` shows them
    decisions = list(reversed(crv.json("autoscale", "status", name, "--last", "200")["decisions"]))
    for d in decisions:
        if d["action"] != "none":
            print(f"  {time.strftime('%H:%M:%S', time.localtime(d['at']))} {d['action']} "
                  f"{d['current']}->{d['target']}: {d['reason']}; {d['outcome']}")  # fmt: skip
    acted = [d for d in decisions if d["action"] != "none"]
    assert acted[0]["action"] == "grow" and acted[-1]["action"] == "shrink", acted
    assert all(d["outcome"] and not d["outcome"].startswith("failed") for d in acted), acted
    # a shrink names its victims: nodes that ran no job when it decided (a drain then waits
    # for any job that landed on one meanwhile)
    assert all("removing " in d["reason"] for d in acted if d["action"] == "shrink"), acted

    # the resizes ran slurmctld's recipe again: the same one publisher still publishes
    assert guest(crv, controller, publisher).split() == before
    assert max(age for _, age in queue(crv, name).values()) < 60

    # every job ran once and completed: one completion line each, COMPLETED 0:0
    ended = [c for c in completions(crv, controller) if c.get("JobId") in jobs]
    states = sorted((c["JobId"], c["JobState"], c["ExitCode"]) for c in ended)
    assert states == sorted((j, "COMPLETED", "0:0") for j in jobs), states
    on = {c["JobId"]: c["NodeList"] for c in ended}
    new_nodes = {f"{name}-compute-{i}" for i in range(1, sc.max_nodes)}
    assert set(on.values()) & new_nodes, on  # the new nodes took jobs

    # back to 1: the first rack machine; the lab guests gone; the other rack machines off, free
    final = crv.json("status", name)
    remaining = {n["name"]: n["pool"] for n in final["nodes"] if n["group"] == "compute"}
    assert remaining == {f"{name}-compute-0": "rack"}, remaining
    assert rack.domains() == [controller], rack.domains()
    listed = rack_listed(rack.crv)
    assert {m: r["state"] for m, r in listed.items()} == {
        m: "leased" if m == first else "free" for m in listed
    }, listed  # fmt: skip
    for machine in listed:
        assert rack.power(machine) == ("on" if machine == first else "off"), machine

    # the figures (job times are the controller's clock: taken back to the host's)
    asked = time.time()
    offset = float(guest(crv, controller, "date +%s.%N")) - (asked + time.time()) / 2
    pending_start = min(clock(c["SubmitTime"]) for c in ended)
    first_new = min(clock(c["StartTime"]) for c in ended if c["NodeList"] in new_nodes)
    last_end = max(clock(c["EndTime"]) for c in ended)
    grow = next(d for d in decisions if d["action"] == "grow")
    shrink = acted[-1]

    def node_hours(until: float) -> float:
        return sum(count * max(0.0, min(later, until) - at)
                   for (at, count), (later, _) in itertools.pairwise(timeline)) / 3600  # fmt: skip

    need_h = sc.jobs * sc.job_seconds / 3600
    f = {
        "cluster": name, "jobs": sc.jobs, "job_seconds": sc.job_seconds,
        "max_nodes": sc.max_nodes, "deploy_s": deploy_s,
        "reaction_s": first_new - pending_start,
        "grow_decision_s": grow["at"] - submitted,
        "grown_s": (grown_at or 0) - grow["at"],
        "jobs_span_s": last_end - pending_start,
        "shrink_decision_s": shrink["at"] - (last_end - offset),
        "shrunk_s": shrunk_at - shrink["at"],
        "node_hours_to_last_job": node_hours(last_end - offset),
        "node_hours_to_shrunk": node_hours(shrunk_at),
        "minimum_node_hours": need_h,
        "actions": [[d["at"] - submitted, d["action"], d["current"], d["target"]] for d in acted],
    }  # fmt: skip
    print(f"deploy (controller on lab + 1 rack machine): {f['deploy_s']:.0f} s")
    print(f"first pending job -> first job running on a new node: {f['reaction_s']:.0f} s")
    print(f"grow: decision -> {sc.max_nodes} nodes ready {f['grown_s']:.0f} s "
          f"(submission -> the grow decision {f['grow_decision_s']:.0f} s)")  # fmt: skip
    print(f"jobs: first submitted -> last ended {f['jobs_span_s']:.0f} s "
          f"(on one node alone: {sc.jobs * sc.job_seconds} s)")  # fmt: skip
    print(f"shrink: last job ended -> the shrink decision {f['shrink_decision_s']:.0f} s, "
          f"decision -> 1 node {f['shrunk_s']:.0f} s")  # fmt: skip
    to_last_job, to_shrunk = f["node_hours_to_last_job"], f["node_hours_to_shrunk"]
    print(f"node-hours of compute from the submission: {to_last_job:.3f} to the last job's end, "
          f"{to_shrunk:.3f} to the end of the shrink; the jobs need {need_h:.3f} "
          f"(ratios {to_last_job / need_h:.2f} and {to_shrunk / need_h:.2f})")  # fmt: skip

    live = os.environ.get("CRV_AUTOSCALE_LIVE")  # benchmarks/bench_autoscale_queue.py --live
    if live:
        Path(live).mkdir(parents=True, exist_ok=True)
        (Path(live) / f"{name}.json").write_text(json.dumps(f, indent=1) + "\n")
        plot = crv.home / "autoscale" / f"{name}-compute.png"
        if plot.exists():
            shutil.copy(plot, Path(live) / plot.name)

    out = crv.ok("destroy", name, timeout=600)
    assert f"destroyed {name}: 2 nodes removed" in out, out
    assert {r["state"] for r in rack_listed(rack.crv).values()} == {"free"}


def test_short_queue_autoscaling_on_the_rack(rack: Rack, tmp_path: Path) -> None:
    run(
        rack,
        tmp_path,
        Scenario("sq", jobs=6, job_seconds=45, max_nodes=2, pools=["rack", "rack"],
                 scaling={"cooldown": "1m", "scale_down_delay": "1m"}, deadline=1800),
    )  # fmt: skip


def test_twelve_one_minute_jobs_grow_to_3_and_back_to_1(rack: Rack, tmp_path: Path) -> None:
    run(rack, tmp_path, Scenario("sl", jobs=12, job_seconds=60, max_nodes=3,
                                 pools=["rack", "rack", "lab"]))  # fmt: skip


def test_the_lab_leaves_nothing(rack: Rack) -> None:
    lab_down(rack.crv, rack.lab)
