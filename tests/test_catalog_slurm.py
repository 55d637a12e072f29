"""The slurm appliance's shape (appliances/slurm): what waits for what, who may read the munge
key, what a resize runs again, what its image must hold, and that its recipes refuse what other
nodes publish before it reaches a config file. It runs for real in tests/test_vm_slurm.py
(marked vm)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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


# --- the queue the controller publishes for the compute group's autoscaling ------------------


def test_the_compute_group_is_scaled_by_the_queue_the_controller_publishes() -> None:
    from crv.appliance.spec import QUEUE_KEYS

    appliance = load_appliance(SLURM)
    compute = appliance.groups["compute"]
    scaling = compute.scaling
    assert scaling is not None and scaling.queue is not None
    assert scaling.queue.role == "slurmctld" and scaling.queue.jobs_per_node == 1
    assert set(QUEUE_KEYS) <= set(appliance.roles["slurmctld"].publishes)
    assert (compute.scale_min, compute.scale_max) == (1, 1000)
    # a boot under TCG takes minutes: no shrink before a few idle minutes, nor right after an
    # action; the queue is published often enough to stay fresh
    assert scaling.scale_down_delay >= 120 and scaling.cooldown >= 60
    every = appliance.parameter_specs["queue-every"]
    assert every.default == 15 and every.maximum is not None
    assert 2 * every.maximum <= scaling.queue.stale_after


def queue_script(tmp_path: Path) -> Path:
    """The publisher slurmctld.sh writes (its quoted here-document), as a file."""
    text = (SLURM / "roles" / "slurmctld.sh").read_text()
    body = text.split("cat >slurm-queue.py.new <<'QUEUE'\n", 1)[1].split("\nQUEUE\n", 1)[0]
    script = tmp_path / "slurm-queue.py"
    script.write_text(body + "\n")
    return script


SQUEUE = (
    "RUNNING 1 None\n"
    "PENDING 1 Resources\n"
    "PENDING 2 Priority\n"
    "PENDING 3-4 PartitionNodeLimit\n"  # more nodes would start it: counted, at its minimum
    "PENDING 5 Dependency\n"  # more nodes would not start these: left out
    "PENDING 6 JobHeldUser\n"
    "PENDING 7 BeginTime\n"
    "COMPLETING 1 None\n"
)
SINFO = "c-1 mixed\nc-0 idle\nc-0 idle\nc-2 down*\nother allocated\n"
# the agent as a shell command, and as the Python program it is on crv's guests (loaded once)
AGENT_SH = '#!/bin/sh\nprintf "%s\\n" "$*" >>"$LOG"\n'
AGENT_PY = (
    "#!/usr/bin/env python3\nimport os\n"
    "def main(argv):\n"
    "    with open(os.environ['LOG'], 'a') as f:\n"
    "        f.write(' '.join(argv) + ' pid=' + str(os.getpid()) + chr(10))\n"
    "    return 0\n"
    "if __name__ == '__main__':\n    raise SystemExit('run as a command')\n"
)


def publish_once(
    tmp_path: Path,
    squeue: str | None = SQUEUE,
    sinfo: str | None = SINFO,
    nodes: str = "c-0\nc-1\nc-2\n",
    agent: str = AGENT_SH,
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """One round of the publisher with squeue, sinfo and crv-agent faked (None: the command
    fails); its output and the `crv-agent` calls it made."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    for name, out in (("squeue", squeue), ("sinfo", sinfo)):
        if out is None:
            (bin_dir / name).write_text(f"#!/bin/sh\necho '{name}: error: Unable to contact "
                                        "slurm controller' >&2\nexit 1\n")  # fmt: skip
        else:
            (tmp_path / name).write_text(out)
            (bin_dir / name).write_text(f'#!/bin/sh\necho "$*" >"{tmp_path}/{name}.args"\n'
                                        f'cat "{tmp_path}/{name}"\n')  # fmt: skip
    (bin_dir / "crv-agent").write_text(agent)
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    (work / "slurm-compute-nodes").write_text(nodes)
    log = tmp_path / "set.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)}
    r = subprocess.run([sys.executable, str(queue_script(tmp_path)), "once"], cwd=work,
                       capture_output=True, text=True, env=env, timeout=30)  # fmt: skip
    return r, log.read_text().splitlines() if log.exists() else []


def test_the_publisher_sends_the_four_queue_keys_counts_first(tmp_path: Path) -> None:
    from crv.appliance.spec import QUEUE_KEYS

    r, sets = publish_once(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sets == [
        "set pending_nodes 6",  # 1 + 2 + 3: not the dependent, held or later jobs
        "set pending 3",
        "set running 2",  # running and completing
        "set node_states c-0=idle c-1=mixed c-2=down*",  # crv's nodes only, each once
    ]
    assert tuple(s.split()[1] for s in sets) == QUEUE_KEYS
    squeue = (tmp_path / "squeue.args").read_text().split()
    assert squeue == ["-h", "-t", "PENDING,RUNNING,COMPLETING,CONFIGURING", "-o", "%T", "%D", "%r"]
    assert (tmp_path / "sinfo.args").read_text().split() == ["-h", "-N", "-o", "%N", "%T"]


def test_the_publisher_runs_the_agent_in_its_own_process(tmp_path: Path) -> None:
    """On crv's guests crv-agent is a Python program: its main() is loaded once and called for
    each value, not a new Python per value (0.7 s of a TCG controller's CPU each)."""
    r, sets = publish_once(tmp_path, agent=AGENT_PY)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [s.rsplit(" pid=", 1) for s in sets]
    assert [c[0].split()[1] for c in calls] == [
        "pending_nodes",
        "pending",
        "running",
        "node_states",
    ]
    assert len({c[1] for c in calls}) == 1, sets  # one process made every call


def test_what_the_publisher_sends_is_what_the_autoscaler_reads(tmp_path: Path) -> None:
    from crv.engine.autoscale import Memory, decide_queue, from_queue, node_class

    _, sets = publish_once(tmp_path)
    readings = {s.split()[1]: [{"node": "s-controller-0", "value": s.split(" ", 2)[2], "age": 1.0}]
                for s in sets}  # fmt: skip
    scaling = load_appliance(SLURM).groups["compute"].scaling
    assert scaling is not None
    queue = from_queue(scaling, readings)
    assert queue.problem == "" and queue.pending_nodes == 6 and queue.pending == 3
    assert {n: node_class(s) for n, s in queue.states.items()} == {
        "c-0": "idle", "c-1": "busy", "c-2": "other"
    }  # fmt: skip
    d = decide_queue(scaling, 1, 5, ["c-2", "c-1", "c-0"], queue, 1000.0, Memory())
    assert (d.action, d.target) == ("grow", 5)  # 1 busy + 6 waiting, clamped, by max_step 2


def test_an_empty_queue_publishes_zeros(tmp_path: Path) -> None:
    r, sets = publish_once(tmp_path, squeue="", sinfo="c-0 idle\n", nodes="c-0\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sets == ["set pending_nodes 0", "set pending 0", "set running 0",
                    "set node_states c-0=idle"]  # fmt: skip


@pytest.mark.parametrize(
    ("squeue", "sinfo", "nodes", "says"),
    [
        (None, SINFO, "c-0\n", "squeue failed (squeue: error: Unable to contact slurm"),
        (SQUEUE, None, "c-0\n", "sinfo failed"),
        ("RUNNING one None\n", SINFO, "c-0\n", "squeue printed an unexpected line"),
        ("squeue: error: Invalid user\n", SINFO, "c-0\n", "squeue printed an unexpected line"),
        ("PENDING 1 \n", SINFO, "c-0\n", "squeue printed an unexpected line"),
        (SQUEUE, "c-0 idle\nc-1 \n", "c-0\n", "sinfo printed an unexpected line"),
        (SQUEUE, "c-0 idle extra\n", "c-0\n", "sinfo printed an unexpected line"),
        (SQUEUE, "c-0=x idle\n", "c-0\n", "sinfo printed an unexpected line"),
        (SQUEUE, SINFO, "", "no compute node list yet"),
    ],
)
def test_a_round_that_cannot_read_the_queue_publishes_nothing(
    tmp_path: Path, squeue: str | None, sinfo: str | None, nodes: str, says: str
) -> None:
    r, sets = publish_once(tmp_path, squeue, sinfo, nodes)
    assert r.returncode == 1 and says in r.stdout, r.stdout + r.stderr
    assert sets == []


def test_a_failed_set_ends_the_round_and_says_so(tmp_path: Path) -> None:
    failing = '#!/bin/sh\nprintf "%s\\n" "$*" >>"$LOG"\nexit 1\n'
    r, sets = publish_once(tmp_path, agent=failing)
    assert r.returncode == 1 and "crv-agent set pending_nodes failed" in r.stdout, r.stdout
    assert sets == ["set pending_nodes 6"]


def test_the_publisher_is_one_systemd_service_that_a_rerun_keeps() -> None:
    """The recipe writes the unit with `swap` and restarts it only when it (or the agent it
    loads) changed; otherwise `systemctl start` (a no-op when it runs): one publisher, whatever
    re-runs the recipe."""
    text = (SLURM / "roles" / "slurmctld.sh").read_text()
    assert "swap crv-slurm-queue.service.new /etc/systemd/system/crv-slurm-queue.service" in text
    assert "swap slurm-queue.py.new slurm-queue.py" in text
    assert "Restart=always" in text
    assert "systemctl restart crv-slurm-queue" in text and "systemctl start crv-slurm-queue" in text
    assert "nohup" not in text and " &\n" not in text  # no loose background process
