"""The slurm appliance across the lab's two kinds of machines, through the CLI: its controller a
libvirt guest of the pool `lab`, its 2 compute nodes real PXE machines of `crv lab rack` (pool
`rack`: diskless qemu machines with iPXE firmware behind ipmi_sim BMCs, booting crv's PXE
ramdisk, whose /init hands over to the image's systemd). The compute nodes' recipes use
systemctl (munge, slurmd), which is what this proves of the ramdisk:

- `crv deploy appliances/slurm --pool lab --pool-for compute=rack`: ready, every role verified,
  the controller's verify saw `srun -N 2 hostname` answered by both compute nodes;
- through the controller (qemu-guest-agent), `srun -N 2` runs on both rack machines: each
  answers with its node name, systemd as its PID 1 and munge and slurmd active, and Slurm
  reaches each at the address of the rack machine the pool leased it;
- `crv destroy`: every rack machine off and free; `crv lab down` leaves nothing.

One image (the base plus the appliance's image.packages, `built_image`, cached in
CRV_TEST_IMAGES) gives the controller's disk and the machines' kernel and ramdisk. The BMCs'
configuration and passwords live in $CRV_LAB_HARDWARE, a tmp dir here. 3 TCG guests at most.
Marked rack: `./dev test -m rack tests/test_vm_rack_slurm.py -n 0 -s` (-s: the boot timings).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from crv.appliance.loader import load_appliance
from tests.conftest import CATALOG, REPO
from tests.vm_fixtures import BuiltImage, lab_leftovers, processes, tear_down_lab

pytestmark = [
    pytest.mark.rack,
    pytest.mark.skipif(
        os.geteuid() != 0
        or any(
            shutil.which(tool) is None
            for tool in ("mmdebstrap", "libvirtd", "ipmi_sim", "qemu-system-x86_64")
        ),
        reason="a PXE rack needs root, mmdebstrap, libvirtd, ipmi_sim (openipmi) and qemu "
        "(./dev test -m rack installs them)",
    ),
]

SLURM = CATALOG / "slurm"
MACHINES = 2
LONG = 2400.0  # a deploy of 3 TCG guests on a busy 2-core host


class Crv:
    def __init__(self, home: Path, hardware: Path) -> None:
        self.home, self.hardware = home, hardware
        self.env = {**os.environ, "CRV_HOME": str(home), "CRV_LAB_HARDWARE": str(hardware),
                    "PYTHONUNBUFFERED": "1"}  # fmt: skip

    def __call__(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "crv_cli", *args], capture_output=True,
                              text=True, cwd=REPO, env=self.env, timeout=timeout)  # fmt: skip

    def ok(self, *args: str, timeout: float = 900) -> str:
        r = self(*args, timeout=timeout)
        assert r.returncode == 0, f"crv {' '.join(args)}: {r.stdout}{r.stderr}{self.consoles()}"
        return r.stdout

    def json(self, *args: str, timeout: float = 900) -> Any:
        return json.loads(self.ok(*args, "--json", timeout=timeout))

    def consoles(self) -> str:
        """The tail of every machine's and guest's console, for a failure message."""
        logs = [*self.hardware.glob("*/machines/*/serial.log"),
                *(self.home / "pools" / "lab" / "consoles").glob("*.log")]  # fmt: skip
        out = []
        for log in sorted(logs):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            out.append(f"\n--- {log.parent.name}/{log.name}\n" + "\n".join(tail))
        return "".join(out)


@dataclass
class Lab:
    crv: Crv
    lab: dict[str, Any]
    rack: dict[str, Any]  # `crv lab rack --json`


def rack_machines(crv: Crv) -> dict[str, dict[str, Any]]:
    """name -> entry of the machines file the rack pool names in pools.yaml."""
    pools = yaml.safe_load((crv.home / "pools.yaml").read_text())
    path = Path(pools["pools"]["rack"]["options"]["machines"])
    return {m["name"]: m for m in yaml.safe_load(path.read_text())["machines"]}


def rack_listed(crv: Crv) -> dict[str, dict[str, Any]]:
    """`crv baremetal list --pool rack --json`, by machine."""
    rows = crv.json("baremetal", "list", "--pool", "rack")["machines"]
    return {r["machine"]: r for r in rows}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, built_image: BuiltImage) -> Iterator[Lab]:
    image = built_image(*load_appliance(SLURM).packages)  # with the PXE ramdisk
    crv = Crv(tmp_path_factory.mktemp("rackslurm"), tmp_path_factory.mktemp("rackslurmhw"))
    state: dict[str, Any] | None = None
    try:
        # no lab yet: `crv lab rack` makes it, its pool `lab` booting the same image's disk
        rack = json.loads(crv.ok("lab", "rack", str(MACHINES), "--image", str(image.dir),
                                 "--json", timeout=600))  # fmt: skip
        state = crv.json("lab", "status")
        assert [m["power"] for m in rack["machines"]] == ["off"] * MACHINES, rack
        yield Lab(crv, state, rack)
    finally:
        tear_down_lab(crv, crv.home, crv.hardware, state)


def roles(crv: Crv, cluster: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(node, role) -> (state, what its on-node verify printed), from the service's store."""
    with sqlite3.connect(f"file:{crv.home / 'service' / 'state.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT node, role, state, check_output FROM role_states WHERE cluster = ?",
            (cluster,),
        ).fetchall()
    return {(n, r): (s, (out or "").strip()) for n, r, s, out in rows}


def guest(crv: Crv, node: str, command: str, timeout: float = 180) -> str:
    """Run `command` in a lab guest through qemu-guest-agent (docs/lab.md), its stdout."""
    virsh = ["virsh", "-c", f"qemu:///system?socket={crv.home}/lab/libvirt/run/libvirt-sock",
             "qemu-agent-command", node]  # fmt: skip
    run = {"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", command],
                                                  "capture-output": True}}  # fmt: skip
    pid = json.loads(subprocess.check_output([*virsh, json.dumps(run)], text=True))["return"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ask = {"execute": "guest-exec-status", "arguments": {"pid": pid["pid"]}}
        got = json.loads(subprocess.check_output([*virsh, json.dumps(ask)], text=True))["return"]
        if got["exited"]:
            err = base64.b64decode(got.get("err-data", "")).decode(errors="replace")
            assert got.get("exitcode") == 0, (node, command, got, err)
            return base64.b64decode(got.get("out-data", "")).decode()
        time.sleep(1)
    raise AssertionError(f"{node}: {command} did not end in {timeout:.0f} s")


def test_slurm_with_its_compute_nodes_on_pxe_machines(lab: Lab) -> None:
    crv = lab.crv
    started = time.monotonic()
    out = crv.ok("deploy", str(SLURM), "--pool", "lab", "--pool-for", "compute=rack",
                 "--name", "sl", "--set", f"computes={MACHINES}", "--boot-timeout", "900",
                 timeout=LONG)  # fmt: skip
    print(f"deploy: {time.monotonic() - started:.0f} s")
    assert "cluster sl is ready (3 nodes)" in out, out
    computes = [f"sl-compute-{i}" for i in range(MACHINES)]

    # where each node is: the controller a lab guest, the compute nodes rack machines
    status = crv.json("status", "sl")
    pools = {n["name"]: n["pool"] for n in status["nodes"]}
    assert pools == {"sl-controller-0": "lab", **dict.fromkeys(computes, "rack")}, status
    print(crv.ok("status", "sl", "--timings"))
    leased = {r["node"]: r for r in rack_listed(lab.crv).values() if r["state"] == "leased"}
    assert set(leased) == set(computes), leased
    machines = rack_machines(lab.crv)
    address = {node: machines[r["machine"]]["address"] for node, r in leased.items()}

    found = roles(crv, "sl")
    assert {s for s, _ in found.values()} == {"verified"}, found
    assert found[("sl-controller-0", "slurmctld")][1] == (
        f"srun -N {MACHINES} hostname ran on: {' '.join(computes)}"
    )

    # a job step on both rack machines, from the controller: each one's name, its PID 1 and
    # the units the recipe started with systemctl
    step = ("cd / && srun -N 2 --ntasks-per-node=1 -t 1 --chdir=/ sh -c "
            "'echo \"$(hostname) $(cat /proc/1/comm) $(systemctl is-active munge slurmd "
            "| paste -sd, -)\"' | sort")  # fmt: skip
    answered = guest(crv, "sl-controller-0", step).splitlines()
    assert answered == [f"{n} systemd active,active" for n in computes], answered
    # Slurm reaches each compute node at the address of the machine it runs on
    nodes = guest(crv, "sl-controller-0", "scontrol -o show node")
    addrs = {}
    for line in nodes.splitlines():
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        addrs[fields["NodeName"]] = fields["NodeAddr"]
    assert addrs == address, (addrs, address)

    out = crv.ok("destroy", "sl", timeout=600)
    assert "destroyed sl: 3 nodes removed" in out, out
    listed = rack_listed(lab.crv)
    assert {m: r["state"] for m, r in listed.items()} == dict.fromkeys(listed, "free"), listed
    running = [c for c in processes().values()
               if "qemu-system" in c and str(crv.hardware) in c]  # fmt: skip
    assert running == []


def lab_down(crv: Crv, state: dict[str, Any]) -> None:
    """`crv lab down`, then nothing of the lab and its rack is left (within 15 s)."""
    crv.ok("lab", "down", timeout=300)
    deadline = time.monotonic() + 15
    while lab_leftovers(crv.home, crv.hardware, state) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert lab_leftovers(crv.home, crv.hardware, state) == []


def test_the_lab_leaves_nothing(lab: Lab) -> None:
    lab_down(lab.crv, lab.lab)
