"""The slurm appliance on real qemu guests in the lab, through the CLI: deploy a controller and
2 compute nodes from crv's own image (built from the appliance's image.packages: the guests have
no mirror), then resize compute 2 -> 3 -> 2 and destroy. Each step reads back what the
controller's verify saw (`srun -N N hostname` answered by exactly the compute nodes), which
roles ran again (a resize runs only the controller's node list: not munge-key, not the slurmds
that stay), what Slurm itself lists, and that the munge key is the same 0400 file owned by
munge on every node and appears in no recipe log.

Slow (TCG, 4 guests of 512 MiB at most; measured 12 min 30 s with the image cached on a quiet
2-core host, 26 min 44 s building it while other labs ran):
`./dev test -m vm tests/test_vm_slurm.py -n 0`.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import CATALOG
from tests.test_vm_lab import IMAGES, Crv, leftovers, pytestmark  # noqa: F401  (vm marker)

SLURM = str(CATALOG / "slurm")
LONG = 2400.0  # a deploy or grow on a busy 2-core TCG host (boots alone take 1.5-4 min)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Crv, dict[str, object]]]:
    home = tmp_path_factory.mktemp("vmslurm")
    IMAGES.mkdir(parents=True, exist_ok=True)
    (home / "images").symlink_to(IMAGES)  # built once, warm for every later run
    crv = Crv(home)
    try:
        built = json.loads(crv.ok("image", "build", "--json", SLURM, timeout=1800))
        up = crv.ok("lab", "up", "--image", built["dir"], "--memory", "512", "--max-nodes", "4",
                    "--json", timeout=300)  # fmt: skip
        yield crv, json.loads(up)
    finally:
        crv("lab", "down", timeout=300)
        crv("down")


def roles(crv: Crv, cluster: str) -> dict[tuple[str, str], tuple[str, int, str]]:
    """(node, role) -> (state, release, what its on-node verify printed), from the service."""
    with sqlite3.connect(f"file:{crv.home / 'service' / 'state.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT node, role, state, release, check_output FROM role_states WHERE cluster = ?",
            (cluster,),
        ).fetchall()
    return {(n, r): (s, rel, (out or "").strip()) for n, r, s, rel, out in rows}


def guest(crv: Crv, node: str, command: str) -> str:
    """Run `command` in a guest through qemu-guest-agent (docs/lab.md), its stdout."""
    virsh = ["virsh", "-c", f"qemu:///system?socket={crv.home}/lab/libvirt/run/libvirt-sock",
             "qemu-agent-command", node]  # fmt: skip
    run = {"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", command],
                                                  "capture-output": True}}  # fmt: skip
    pid = json.loads(subprocess.check_output([*virsh, json.dumps(run)], text=True))["return"]
    for _ in range(120):
        ask = {"execute": "guest-exec-status", "arguments": {"pid": pid["pid"]}}
        got = json.loads(subprocess.check_output([*virsh, json.dumps(ask)], text=True))["return"]
        if got["exited"]:
            assert got.get("exitcode") == 0, (node, command, got)
            return base64.b64decode(got.get("out-data", "")).decode()
        time.sleep(1)
    raise AssertionError(f"{node}: {command} did not end")


def ready(crv: Crv, cluster: str, computes: int) -> dict[tuple[str, str], tuple[str, int, str]]:
    found = roles(crv, cluster)
    assert {s for s, _, _ in found.values()} == {"verified"}, found
    names = [f"{cluster}-compute-{i}" for i in range(computes)]
    assert found[(f"{cluster}-controller-0", "slurmctld")][2] == (
        f"srun -N {computes} hostname ran on: {' '.join(names)}"
    )
    listed = guest(crv, f"{cluster}-controller-0", "sinfo -h -N -o '%N %t' | sort -u")
    assert listed.split("\n")[:-1] == [f"{n} idle" for n in names], listed
    return found


def key_everywhere(crv: Crv, nodes: list[str]) -> None:
    """The one key, 0400 munge on every node; its base64 is in no recipe log."""
    seen = set()
    for node in nodes:
        out = guest(crv, node, "stat -c '%a %U' /etc/munge/munge.key; "
                               "sha256sum </etc/munge/munge.key; "
                               "k=$(base64 -w0 /etc/munge/munge.key); "
                               "! grep -rqF \"$k\" /var/lib/crv-agent/logs /var/log/slurm && "
                               "! journalctl --no-pager -o cat | grep -qF \"$k\"")  # fmt: skip
        mode, digest = out.splitlines()[:2]
        assert mode == "400 munge", (node, mode)
        seen.add(digest)
    assert len(seen) == 1, seen


def test_slurm_runs_jobs_on_every_compute_node_through_a_resize(
    lab: tuple[Crv, dict[str, object]],
) -> None:
    crv, _ = lab
    out = crv.ok("deploy", SLURM, "--pool", "lab", "--name", "sl", "--set", "computes=2",
                 timeout=LONG)  # fmt: skip
    assert "cluster sl is ready (3 nodes)" in out
    before = ready(crv, "sl", 2)
    key_everywhere(crv, ["sl-controller-0", "sl-compute-0", "sl-compute-1"])

    crv.ok("scale", "sl", "compute", "3", timeout=LONG)
    grown = ready(crv, "sl", 3)
    # only the controller's node list ran again; the slurmds that stay learnt the new node from
    # slurmctld (configless), not from crv
    again = {k for k, (_, rel, _) in grown.items() if k in before and rel != before[k][1]}
    assert again == {("sl-controller-0", "slurmctld")}, again
    assert "sl-compute-2" in guest(crv, "sl-compute-0",
                                   "cat /var/lib/slurm/slurmd/conf-cache/slurm.conf")  # fmt: skip
    key_everywhere(crv, ["sl-compute-2"])

    crv.ok("scale", "sl", "compute", "2", timeout=LONG)
    shrunk = ready(crv, "sl", 2)
    again = {k for k, (_, rel, _) in shrunk.items() if rel != grown[k][1]}
    assert again == {("sl-controller-0", "slurmctld")}, again
    partition = guest(crv, "sl-controller-0", "scontrol show partition batch")
    assert "Nodes=sl-compute-[0-1]" in partition, partition

    crv.ok("destroy", "sl", timeout=600)


def test_the_lab_leaves_nothing(lab: tuple[Crv, dict[str, object]]) -> None:
    crv, up = lab
    crv.ok("lab", "down", timeout=300)
    assert leftovers(crv, up) == []
