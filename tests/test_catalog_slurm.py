"""The slurm appliance's shape (appliances/slurm): what waits for what, who may read the munge
key, what a resize runs again, what its image must hold, and that its recipes refuse what other
nodes publish before it reaches a config file. It runs for real in tests/test_vm_slurm.py
(marked vm)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import networkx as nx
import pytest

from crv.appliance.loader import load_appliance
from crv.appliance.plan import expand
from tests.conftest import CATALOG

SLURM = CATALOG / "slurm"
CONTROLLER_ROLES = {"munge-key", "slurmctld"}


def test_the_key_goes_first_then_every_slurmd_then_the_node_list() -> None:
    g = expand(load_appliance(SLURM, {"computes": "3"}), "s").graph
    ctl, computes = "s-controller-0", [f"s-compute-{i}" for i in range(3)]
    for node in computes:
        assert nx.has_path(g, f"{ctl}:verify:munge-key", f"{node}:contextualize:slurmd")
        assert nx.has_path(g, f"{node}:verify:slurmd", f"{ctl}:contextualize:slurmctld")
    # the key does not wait for the compute nodes: it is what they wait for
    assert not any(nx.has_path(g, f"{n}:provision", f"{ctl}:contextualize:munge-key")
                   for n in computes)  # fmt: skip


def test_only_the_compute_nodes_and_the_controller_may_read_the_munge_key() -> None:
    # the service lets a node read the attributes of the roles it hosts and of those they
    # depend on (crv.service.state.readable_roles)
    appliance = load_appliance(SLURM)
    readers = {name for name, role in appliance.roles.items()
               if "munge-key" in {d.role for d in role.depends_on}}  # fmt: skip
    assert readers == {"slurmd", "slurmctld"}
    assert {g.name for g in appliance.hosts("slurmd")} == {"compute"}
    assert {g.name for g in appliance.hosts("munge-key")} == {"controller"}
    local = {d.role: d.local for d in appliance.roles["slurmctld"].depends_on}
    assert local == {"munge-key": True, "slurmd": False}  # the controller's own key only


def test_a_resize_of_compute_runs_again_the_node_list_and_nothing_else() -> None:
    """The service runs a converged role again when what it reads changed: the nodes and
    attributes of the roles it depends on (store._inputs). A resize of `compute` changes what
    reads a role hosted by `compute`, and then what reads a role that re-ran."""
    appliance = load_appliance(SLURM)
    compute_roles = set(appliance.groups["compute"].roles)
    readers_of = {name: {d.role for d in role.depends_on if not d.local}
                  for name, role in appliance.roles.items()}  # fmt: skip
    again = {name for name, deps in readers_of.items() if deps & compute_roles}
    while True:  # what reads a role that runs again may run again too
        more = {name for name, deps in readers_of.items() if deps & again} - again
        if not more:
            break
        again |= more
    assert again == {"slurmctld"}  # on the controller; the compute nodes that stay: nothing
    assert not compute_roles & again
    assert CONTROLLER_ROLES - again == {"munge-key"}

    # the plans of 2 and 3 compute nodes: the new node feeds the node list, nothing else
    two = expand(load_appliance(SLURM, {"computes": "2"}), "s").graph
    three = expand(load_appliance(SLURM, {"computes": "3"}), "s").graph
    new = set(three.nodes) - set(two.nodes)
    assert {s.split(":")[0] for s in new} == {"s-compute-2"}
    reached = {s for n in new for s in nx.descendants(three, n)} - new
    assert reached == {"s-controller-0:contextualize:slurmctld", "s-controller-0:verify:slurmctld"}


def test_the_image_holds_every_package_a_recipe_needs() -> None:
    packages = set(load_appliance(SLURM).packages)
    needed = set()
    for recipe in (SLURM / "roles").glob("*.sh"):
        for line in recipe.read_text().splitlines():
            if m := re.match(r"\s*need\s+(.+)$", line):
                needed.update(m.group(1).split())
    assert needed and needed <= packages, needed - packages
    assert "slurm-wlm" in packages


# --- what other nodes publish is checked before it reaches a file ---------------------------

FAKE_BIN = {
    # the blackboard as the test sets it: $BOARD/<role>/<key>, one value per line
    "crv-agent": '#!/bin/sh\ncase "$1" in get) cat "$BOARD/$2/$3" ;; list) cat "$BOARD/$2/$3" ;;'
    ' set) echo "set $2" >>"$BOARD/set.log" ;; esac\n',
    "dpkg-query": "#!/bin/sh\necho 'install ok installed'\n",  # `need`: all there
    "hostname": "#!/bin/sh\necho s-controller-0\n",
}
# anything that would touch the machine: recorded, and the test fails if one ran
TOUCHES = ("systemctl", "install", "chown", "mungekey", "scontrol", "sinfo", "slurmd", "apt-get")


def run_recipe(
    tmp_path: Path, recipe: str, board: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    bin_dir, work, boarddir = tmp_path / "bin", tmp_path / "work", tmp_path / "board"
    for d in (bin_dir, work, boarddir):
        d.mkdir(exist_ok=True)
    for name, text in FAKE_BIN.items():
        (bin_dir / name).write_text(text)
    for name in TOUCHES:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >>"$BOARD/touched"\n')
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    for path, value in board.items():
        (boarddir / path).parent.mkdir(parents=True, exist_ok=True)
        (boarddir / path).write_text(value)
    # the bundle's layout: lib/crv.sh next to the appliance's own directory
    bundle = tmp_path / "bundle"
    if not bundle.exists():
        (bundle / "lib").mkdir(parents=True)
        (bundle / "lib" / "crv.sh").write_text(
            (CATALOG.parent / "crv/appliance/lib/crv.sh").read_text()
        )
        shutil.copytree(SLURM, bundle / "a0")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "BOARD": str(boarddir),
           "CRV_APPLIANCE_DIR": str(bundle / "a0"), "CRV_CLUSTER": "s", "CRV_NODE": "s-compute-0",
           "CRV_ADDRESS": "10.0.0.5", "CRV_PARAM_PARTITION": "batch"}  # fmt: skip
    return subprocess.run(["sh", str(SLURM / "roles" / recipe)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip


GOOD_LINE = "NodeName=s-compute-0 NodeAddr=10.0.0.5 CPUs=1 RealMemory=700\n"


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (GOOD_LINE + "PartitionName=evil Nodes=ALL\n", "refusing node line"),
        ("NodeName=s-compute-0 NodeAddr=10.0.0.5 CPUs=1 RealMemory=700 Weight=0\n", "refusing"),
        ("NodeName=s-compute-0 NodeAddr=evil.example CPUs=1 RealMemory=700\n", "refusing"),
        ("NodeName=../x NodeAddr=10.0.0.5 CPUs=1 RealMemory=700\n", "refusing"),
        ("NodeName=s-compute-0 NodeAddr=10.0.0.5 CPUs=1 RealMemory=700 \n", "refusing"),
        ('NodeName=s-compute-0 NodeAddr=10.0.0.5 CPUs=1 RealMemory=700"\n', "refusing"),
        (GOOD_LINE + GOOD_LINE, "listed twice"),
        ("", "no compute node published"),
    ],
)
def test_the_node_list_refuses_a_node_line_before_writing_anything(
    tmp_path: Path, lines: str, says: str
) -> None:
    r = run_recipe(
        tmp_path, "slurmctld.sh", {"munge-key/port": "6817\n", "slurmd/slurm_node": lines}
    )
    assert r.returncode == 1 and says in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "board" / "touched").exists()
    assert not (tmp_path / "board" / "set.log").exists()


@pytest.mark.parametrize(
    ("host", "port", "says"),
    [
        ("10.0.0.1;reboot", "6817", "bad controller address"),
        ("10.0.0.1\nx", "6817", "bad controller address"),  # a second line in a config file
        ("10.0.0.1", "6817\n1", "bad slurmctld port"),
        ("ctl.example", "6817", "bad controller address"),
        ("10.0.0.1", "6817 -N evil", "bad slurmctld port"),
        ("10.0.0.1", "123456", "bad slurmctld port"),
        ("10.0.0.1", "", "bad slurmctld port"),
    ],
)
def test_slurmd_refuses_a_controller_address_before_touching_the_machine(
    tmp_path: Path, host: str, port: str, says: str
) -> None:
    board = {"munge-key/host": host + "\n", "munge-key/port": port + "\n"}
    r = run_recipe(tmp_path, "slurmd.sh", board)
    assert r.returncode == 1 and says in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "board" / "touched").exists()


def test_the_munge_key_is_never_printed_by_a_recipe() -> None:
    """Only base64 of the key file, straight into `crv-agent set`, and `crv-agent get` piped
    straight into base64 -d: no echo, no cat, no set -x."""
    for recipe in (SLURM / "roles").glob("*.sh"):
        text = recipe.read_text()
        assert "set -x" not in text and "set -eux" not in text
        for line in text.splitlines():
            if "munge_key" in line and not line.lstrip().startswith("#"):
                assert re.search(r'crv-agent set munge_key "\$\(base64 -w0 "\$key"\)"$', line) or (
                    "crv-agent get munge-key munge_key | base64 -d >" in line
                ), line


# --- the node list's verify: every node runs a step, or is busy with users' jobs -------------


def srun_check(tmp_path: Path) -> Path:
    """The verify script slurmctld.sh writes (its quoted here-document), as a file."""
    text = (SLURM / "roles" / "slurmctld.sh").read_text()
    body = text.split("cat >slurm-srun-everywhere.sh <<'CHECK'\n", 1)[1].split("\nCHECK\n", 1)[0]
    script = tmp_path / "check.sh"
    script.write_text(body + "\n")
    return script


@pytest.mark.parametrize(
    ("states", "answers", "code", "says"),
    [
        ("c-0 idle\nc-1 idle\n", "c-1\nc-0\n", 0, "srun -N 2 hostname ran on: c-0 c-1"),
        (
            "c-0 mix\nc-1 alloc\n",
            "c-0\n",
            0,
            "srun -N 1 hostname ran on: c-0 (busy with users' jobs: c-1)",
        ),
        ("c-0 alloc\nc-1 alloc\n", "", 0, "every compute node is busy with users' jobs: c-0 c-1"),
        ("c-0 idle\nc-1 idle\n", "c-0\n", 1, "srun -N 2 hostname said: c-0"),  # c-1 silent
        ("c-0 idle\nc-1 idle\n", "c-0\nc-1\nc-2\n", 1, "said: c-0 c-1 c-2"),  # not ours
        ("c-0 idle\nc-1 drain\n", "c-0\n", 1, "c-1 is 'drain' in Slurm"),
        ("c-0 idle\nc-1 idle*\n", "c-0\n", 1, "c-1 is 'idle*' in Slurm"),  # not responding
        ("c-0 idle\n", "c-0\n", 1, "c-1 is 'not listed' in Slurm"),
    ],
)
def test_the_verify_needs_every_node_to_run_a_step_or_be_busy(
    tmp_path: Path, states: str, answers: str, code: int, says: str
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "states").write_text(states)
    (tmp_path / "answers").write_text(answers)
    (bin_dir / "sinfo").write_text(f'#!/bin/sh\ncat "{tmp_path}/states"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "$*" >>"{tmp_path}/srun.log"\n'
                                  f'cat "{tmp_path}/answers"\n')  # fmt: skip
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    (tmp_path / "slurm-compute-nodes").write_text("c-0\nc-1\n")
    r = subprocess.run(["sh", str(srun_check(tmp_path))], cwd=tmp_path, capture_output=True,
                       text=True, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})  # fmt: skip
    assert r.returncode == code, r.stdout + r.stderr
    assert says in (r.stdout if code == 0 else r.stderr), r.stdout + r.stderr
    if "busy" in says and "srun -N 1" in says:  # the step went only to the free node
        assert "-N 1 -w c-0 " in (tmp_path / "srun.log").read_text()
