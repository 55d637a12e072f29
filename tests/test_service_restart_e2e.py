"""F7: the crv service killed and started again, or cut off from the flow, in the middle of a
deploy and of a resize (docs/reliability.md). The agents back off and resume, the flow's calls
and its event stream try again, no attribute is lost or written twice, and the change
converges.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import write_appliance
from tests.test_deploy_e2e import Crv, free_port, home_up

pytestmark = pytest.mark.faults

# three `svc` nodes publish one attribute each and take a few seconds; `top` reads them all
STEADY = """\
apiVersion: crv/v1
name: steady
nodes:
  node: {count: 3, roles: [svc], scale: {min: 1, max: 6}}
  head: {count: 1, roles: [top]}
roles:
  svc: {recipe: svc.sh, verify: {on_node: {command: "test -f served"}}}
  top: {recipe: top.sh, depends_on: [svc], verify: {command: "true"}}
"""
SVC = """\
#!/bin/sh
crv-agent set name "$CRV_NODE"
echo "run on $CRV_NODE" >> runs.log
sleep 3
touch served
"""
TOP = """\
#!/bin/sh
crv-agent list svc name > seen.txt
"""


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    # the service comes back on the port it had (its agents dial it); the suite's other homes
    # prefer 8443, and one could take it while this one is down: give this home its own
    with home_up(tmp_path_factory.mktemp("crv-home"), service_port=free_port()) as c:
        yield c


def service_pid(crv: Crv) -> int:
    return int(json.loads((crv.home / "service" / "daemon.json").read_text())["pid"])


def wait_for(what: str, check, deadline: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def node_dir(crv: Crv, node: str) -> Path:
    return crv.home / "pools" / "local" / node


def kill_and_restart_service(crv: Crv, down_for: float) -> None:
    """SIGKILL the service (no goodbye to anyone), leave it dead `down_for` seconds, then
    `crv up` starts it again on the same port."""
    pid = service_pid(crv)
    os.kill(pid, signal.SIGKILL)
    time.sleep(down_for)
    up = crv("up")
    assert up.returncode == 0, up.stderr
    assert service_pid(crv) != pid


def with_fault(
    crv: Crv, command: tuple[str, ...], when: Callable[[], bool], fault: Callable[[int], None]
) -> str:
    """Run `crv COMMAND`; once `when()`, inject `fault(pid of the command)`; the command must
    then succeed: its output."""
    change = crv.popen(*command)
    try:
        wait_for(f"the moment to break `crv {' '.join(command)}`", when)
        fault(change.pid)
        out, _ = change.communicate(timeout=300)
    finally:
        if change.poll() is None:
            change.kill()
    assert change.returncode == 0, out
    return out


def enrolled(crv: Crv, cluster: str) -> int:
    r = crv("status", cluster, "--json")
    if r.returncode != 0:
        return 0
    return sum(n["state"] == "enrolled" for n in json.loads(r.stdout)["nodes"])


def test_the_service_killed_during_a_deploy_and_a_resize(crv: Crv, tmp_path: Path) -> None:
    app = write_appliance(tmp_path, "steady", STEADY, ("svc.sh", "top.sh"))
    (app / "svc.sh").write_text(SVC)
    (app / "top.sh").write_text(TOP)

    # while the svc recipes run (some nodes enrolled): kill it, 5 s without a service
    out = with_fault(
        crv, ("deploy", str(app)), lambda: enrolled(crv, "steady") >= 1,
        lambda _: kill_and_restart_service(crv, 5.0),
    )  # fmt: skip
    assert "cluster steady is ready (4 nodes)" in out

    names = [f"steady-node-{i}" for i in range(3)]
    seen = (node_dir(crv, "steady-head-0") / "work" / "seen.txt").read_text()
    assert sorted(seen.split()) == names, seen  # each attribute once, none lost
    for name in names:  # each recipe ran once: nothing was released twice
        runs = (node_dir(crv, name) / "work" / "runs.log").read_text().splitlines()
        assert runs == [f"run on {name}"], runs

    # a resize 3 -> 5, the service killed while the new nodes come up
    with_fault(
        crv, ("scale", "steady", "node", "5"), lambda: enrolled(crv, "steady") >= 5,
        lambda _: kill_and_restart_service(crv, 5.0),
    )  # fmt: skip
    status = crv.status("steady")
    assert status["ready"] and len(status["nodes"]) == 6
    seen = (node_dir(crv, "steady-head-0") / "work" / "seen.txt").read_text()
    assert sorted(seen.split()) == [f"steady-node-{i}" for i in range(5)], seen

    # a resize 5 -> 6 while the flow is cut off from the service (its packets dropped, the
    # agents unaffected) for 15 s
    if not can_cut():
        pytest.skip("needs root, cgroup2 and iptables' cgroup match to cut one process off")
    port = int(
        json.loads((crv.home / "service" / "daemon.json").read_text())["url"].rsplit(":", 1)[1]
    )

    def cut(pid: int) -> None:
        with cut_off(pid, port) as dropped:
            time.sleep(15)
            assert dropped() > 0  # the flow did try to reach the service meanwhile

    with_fault(
        crv, ("scale", "steady", "node", "6"), lambda: len(crv.status("steady")["nodes"]) == 6, cut
    )
    status = crv.status("steady")
    assert status["ready"] and len(status["nodes"]) == 7
    seen = (node_dir(crv, "steady-head-0") / "work" / "seen.txt").read_text()
    assert sorted(seen.split()) == [f"steady-node-{i}" for i in range(6)], seen

    d = crv("destroy", "steady")
    assert d.returncode == 0, d.stderr


CGROUP2 = Path("/sys/fs/cgroup/unified")


def can_cut() -> bool:
    if os.geteuid() != 0 or not (CGROUP2 / "cgroup.procs").exists() or not shutil.which("iptables"):
        return False
    probe = subprocess.run(["iptables", "-m", "cgroup", "--help"], capture_output=True, text=True)
    return "--path" in probe.stdout


@contextlib.contextmanager
def cut_off(pid: int, port: int) -> Iterator[Callable[[], int]]:
    """A network cut between one process and the service: the process moves to a cgroup of its
    own whose packets to the service's port are dropped (a partition: calls hang, nothing is
    refused); the node processes it started before stay where they were."""
    group = CGROUP2 / f"crv-cut-{pid}"
    group.mkdir()
    rule = ["OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", str(port),
            "-m", "cgroup", "--path", group.name, "-j", "DROP"]  # fmt: skip
    try:
        (group / "cgroup.procs").write_text(str(pid))
        subprocess.run(["iptables", "-I", *rule], check=True)

        def dropped() -> int:
            listing = subprocess.run(["iptables", "-L", "OUTPUT", "-v", "-x", "-n"],
                                     capture_output=True, text=True, check=True).stdout  # fmt: skip
            line = next(x for x in listing.splitlines() if group.name in x)
            return int(line.split()[0])

        try:
            yield dropped
        finally:
            subprocess.run(["iptables", "-D", *rule], check=True)
    finally:
        with contextlib.suppress(OSError):
            (CGROUP2 / "cgroup.procs").write_text(str(pid))
        group.rmdir()
