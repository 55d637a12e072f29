"""A real PXE rack in the lab, through the CLI as a user runs it: `crv lab rack 4` (4 diskless
qemu machines with iPXE firmware behind ipmi_sim BMCs, the bare-metal pool `rack`), then

- the web farm on 3 of them (lb + 2 web servers), network-booted for real: the load balancer
  answers from both web servers, the machines are leased and their BMCs say the power is on;
- a machine whose cable is pulled (its tap off the bridge: iPXE gets no DHCP answer, it never
  fetches its script) is written off after the script deadline and the node it was booting
  moves to another machine; `crv baremetal clear` returns it once plugged back;
- `crv destroy`: every machine off (asked through its BMC) and free;
- no BMC password and no enrolment token anywhere under CRV_HOME (Prefect's database and crv's
  logs are there), nor on any process's command line.

The module's teardown destroys what is left, `crv lab down`, `crv down`, and checks that
nothing is left: namespace, route, veth, BMCs, machines, hardware directory.
The BMCs' configuration and passwords live outside CRV_HOME, in $CRV_LAB_HARDWARE (a tmp dir
per module here). Marked `rack`: `./dev test -m rack tests/test_vm_rack.py -n 0`; measured
5 min 17 s with the image cached, 9 min with another CI run beside it (load 17 on 2 cores);
most of it is the written-off machine's 90 s script deadline and TCG boots.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import CATALOG, REPO
from tests.vm_fixtures import BuiltImage, processes, tear_down_lab

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

WEBFARM = str(CATALOG / "webfarm")
POOL = "rack"
MACHINES = 4
SCRIPT_TIMEOUT = 90  # seconds from power-on until iPXE must have fetched its script
LONG = 1200.0  # a deploy or grow under TCG on a busy 2-core host
PHASES = (
    "provision", "power_on", "script", "kernel", "initrd", "callback", "enrolled", "recipes",
    "verified",
)  # fmt: skip


class Crv:
    def __init__(self, home: Path, hardware: Path) -> None:
        self.home = home
        self.hardware = hardware
        self.env = {
            **os.environ,
            "CRV_HOME": str(home),
            "CRV_LAB_HARDWARE": str(hardware),
            "PYTHONUNBUFFERED": "1",
        }

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "crv_cli", *args]

    def __call__(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, cwd=REPO,
                              env=self.env, timeout=timeout)  # fmt: skip

    def ok(self, *args: str, timeout: float = 900) -> str:
        r = self(*args, timeout=timeout)
        assert r.returncode == 0, f"crv {' '.join(args)}: {r.stdout}{r.stderr}{self.serials()}"
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def serials(self) -> str:
        """The tail of each machine's serial console, for a failure message."""
        out = []
        for log in sorted(self.hardware.glob("*/machines/*/serial.log")):
            tail = log.read_text(errors="replace").splitlines()[-8:]
            out.append(f"\n--- {log.parent.name}\n" + "\n".join(tail))
        return "".join(out)

    def watching_scripts(
        self, *args: str, timeout: float = LONG
    ) -> tuple[subprocess.CompletedProcess[str], set[str]]:
        """Run `crv ARGS` while reading every boot script the pool writes (a script lives from
        power-on to the call-back): the run, and the enrolment tokens the scripts held."""
        boot = self.home / "pools" / POOL / "boot"
        tokens: set[str] = set()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(self.argv(*args), stdout=out, stderr=err, cwd=REPO,
                                    env=self.env)  # fmt: skip
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                for script in boot.glob("*/script.ipxe"):
                    try:
                        tokens.update(re.findall(r"crv\.token=(\S+)", script.read_text()))
                    except OSError:  # deleted by the call-back meanwhile
                        continue
                if time.monotonic() > deadline:
                    proc.kill()
                time.sleep(0.2)
            out.seek(0)
            err.seek(0)
            run = subprocess.CompletedProcess(
                args, proc.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"),
            )  # fmt: skip
        return run, tokens


@dataclass
class Rack:
    crv: Crv
    lab: dict[str, Any]
    shown: dict[str, Any]
    tokens: set[str] = field(default_factory=set)  # seen in boot scripts during the deploys

    @property
    def netns(self) -> str:
        return str(self.lab["netns"])

    def machines(self) -> list[dict[str, Any]]:
        """The entries of the machines file the pool names in pools.yaml."""
        pools = yaml.safe_load((self.crv.home / "pools.yaml").read_text())
        path = Path(pools["pools"][POOL]["options"]["machines"])
        return list(yaml.safe_load(path.read_text())["machines"])

    def password(self, machine: dict[str, Any]) -> str:
        return Path(machine["bmc"]["password"]["file"]).read_text().splitlines()[0]

    def power(self, machine: dict[str, Any]) -> str:
        """The machine's power as its BMC reports it (IPMI 2.0 with crv's own client)."""
        from pools.baremetal.ipmi import Bmc, Power

        b = machine["bmc"]
        bmc = Bmc(b["address"], int(b["port"]), b["username"], self.password(machine),
                  int(b["cipher_suite"]))  # fmt: skip
        return Power("rack-test", min_interval=0.1, window=20).state(machine["name"], bmc)

    def listed(self) -> dict[str, dict[str, Any]]:
        """`crv baremetal list --json`, by machine."""
        rows = self.crv.json("baremetal", "list", "--pool", POOL)["machines"]
        return {r["machine"]: r for r in rows}

    def tap(self, machine: str) -> str:
        return "crvtap" + str(int(machine.rsplit("-m", 1)[1]))

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.netns, *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def rack(tmp_path_factory: pytest.TempPathFactory, built_image: BuiltImage) -> Iterator[Rack]:
    image = built_image()  # with the PXE ramdisk; cached across runs
    crv = Crv(tmp_path_factory.mktemp("rackhome"), tmp_path_factory.mktemp("rackhw"))
    lab: dict[str, Any] | None = None
    try:
        shown = json.loads(
            crv.ok("lab", "rack", str(MACHINES), "--image", str(image.dir), "--boot-timeout",
                   "240", "--script-timeout", str(SCRIPT_TIMEOUT), "--json", timeout=600)
        )  # fmt: skip
        lab = crv.json("lab", "status")
        assert [m["power"] for m in shown["machines"]] == ["off"] * MACHINES, shown
        yield Rack(crv, lab, shown)
    finally:
        tear_down_lab(crv, crv.home, crv.hardware, lab)
    assert "rack:" not in (crv.home / "pools.yaml").read_text()


def answers(url: str, tries: int = 6) -> set[str]:
    seen = set()
    for _ in range(tries):
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            seen.add(r.read().decode().strip())
    return seen


def lb_url(out: str, lab: dict[str, Any]) -> str:
    lines = [line for line in out.splitlines() if line.startswith("lb on ")]
    assert len(lines) == 1, out
    url = lines[0].split(": ", 1)[1]
    assert url.startswith(f"http://{str(lab['subnet']).rsplit('.', 1)[0]}."), url  # a lab address
    return url


def test_webfarm_on_three_pxe_machines(rack: Rack) -> None:
    crv = rack.crv
    run, tokens = crv.watching_scripts(
        "deploy", WEBFARM, "--pool", POOL, "--set", "workers=2", "--name", "wf",
        "--boot-timeout", "900",
    )  # fmt: skip
    rack.tokens |= tokens
    assert run.returncode == 0, f"{run.stdout}{run.stderr}{crv.serials()}"
    assert "cluster wf is ready (3 nodes)" in run.stdout
    assert tokens, "no boot script held a crv.token while the machines booted"

    url = lb_url(run.stdout, rack.lab)
    assert answers(url) == {"hello from wf-worker-0", "hello from wf-worker-1"}

    status = crv.json("status", "wf")
    nodes = {n["name"]: n for n in status["nodes"]}
    assert len(nodes) == 3, status
    assert all(n["pool"] == POOL and n["address"] for n in nodes.values()), status

    listed = rack.listed()
    leased = {m: r for m, r in listed.items() if r["state"] == "leased"}
    assert {r["node"] for r in leased.values()} == set(nodes), listed
    assert all(r["cluster"] == "wf" and r["lease"] == "up" for r in leased.values()), listed
    assert all(r["address"] == nodes[r["node"]]["address"] for r in leased.values()), listed
    for machine in rack.machines():
        expected = "on" if machine["name"] in leased else "off"
        assert rack.power(machine) == expected, (machine["name"], listed)


def test_timings_of_the_pxe_nodes_are_in_order(rack: Rack) -> None:
    status = rack.crv.json("status", "wf")
    nodes = [n for n in status["nodes"] if n["pool"] == POOL]
    assert len(nodes) == 3, status
    for node in nodes:
        timings = node.get("timings") or {}
        assert set(PHASES) <= set(timings), (node["name"], timings)
        at = {phase: datetime.fromisoformat(timings[phase]) for phase in PHASES}
        # each phase at or after the one before it; `callback` and `enrolled` between them in
        # either order: the agent enrols, then calls the boot service back, while the flow
        # notices the enrolment on its own (seen: enrolled 0.4 s before the call-back)
        for before, after in itertools.pairwise(PHASES):
            if {before, after} != {"callback", "enrolled"}:
                assert at[after] >= at[before], (node["name"], after, before, timings)
        assert at["initrd"] <= at["enrolled"] and at["callback"] <= at["recipes"], timings


def test_a_machine_that_never_fetches_its_script_is_written_off_and_the_node_moves(
    rack: Rack,
) -> None:
    crv = rack.crv
    crv.ok("scale", "wf", "worker", "1", timeout=LONG)  # frees a machine: 2 free now
    before = {n["name"] for n in crv.json("status", "wf")["nodes"]}
    free = [m for m, r in rack.listed().items() if r["state"] == "free"]
    assert len(free) == 2, rack.listed()
    victim = free[0]  # inventory order: the one the next node gets first
    rack.ip("link", "set", rack.tap(victim), "nomaster")
    try:
        run, tokens = crv.watching_scripts("scale", "wf", "worker", "2", "--boot-timeout", "900")
        rack.tokens |= tokens
        assert run.returncode == 0, f"{run.stdout}{run.stderr}{crv.serials()}"
        assert "cluster wf is ready (3 nodes)" in run.stdout

        listed = rack.listed()
        assert listed[victim]["state"] == "failed", listed[victim]
        reason = listed[victim].get("failure") or ""
        assert "script" in reason and re.search(rf"\b{SCRIPT_TIMEOUT} s\b", reason), reason
        machine = next(m for m in rack.machines() if m["name"] == victim)
        assert rack.power(machine) == "off"

        status = crv.json("status", "wf")
        (new,) = {n["name"] for n in status["nodes"]} - before
        holder = next(r for r in listed.values() if r["node"] == new)
        assert holder["machine"] != victim and holder["state"] == "leased", listed
        assert holder["lease"] == "up", holder
        workers = sorted(n["name"] for n in status["nodes"] if n["group"] == "worker")
        assert answers(lb_url(run.stdout, rack.lab)) == {f"hello from {n}" for n in workers}
    finally:
        rack.ip("link", "set", rack.tap(victim), "master", "crvbr0")
    out = crv.ok("baremetal", "clear", victim, "--pool", POOL)
    assert f"machine {victim} is free again" in out
    row = rack.listed()[victim]
    assert row["state"] == "free" and "failure" not in row, row


def test_destroy_powers_every_machine_off_and_frees_it(rack: Rack) -> None:
    crv = rack.crv
    out = crv.ok("destroy", "wf", timeout=600)
    assert "destroyed wf: 3 nodes removed" in out, out
    listed = rack.listed()
    assert {m: r["state"] for m, r in listed.items()} == dict.fromkeys(listed, "free"), listed
    assert all(r["node"] is None for r in listed.values()), listed
    assert {m["name"]: rack.power(m) for m in rack.machines()} == dict.fromkeys(listed, "off")
    running = [c for c in processes().values()
               if "qemu-system" in c and str(crv.hardware) in c]  # fmt: skip
    assert running == []


def secrets_under(root: Path, secrets: dict[str, str]) -> tuple[list[str], list[Path]]:
    """Where under `root` each secret appears (file contents, byte for byte; symlink targets;
    names), and the regular files read. Nothing is skipped but sockets; symlinks are not
    followed; anything else (a FIFO, a device) is reported as a finding."""
    found: list[str] = []
    scanned: list[Path] = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            try:
                st = path.lstat()
                if stat.S_ISSOCK(st.st_mode):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    data = os.readlink(path).encode()
                elif stat.S_ISREG(st.st_mode):
                    data = path.read_bytes()
                    scanned.append(path)
                elif stat.S_ISDIR(st.st_mode):
                    data = b""
                else:
                    found.append(f"{path}: neither file, link, directory nor socket")
                    continue
            except FileNotFoundError:  # gone meanwhile (a lock, a journal)
                continue
            for what, secret in secrets.items():
                if secret.encode() in data or secret in name:
                    found.append(f"{what} in {path}")
    return found, scanned


def test_no_bmc_password_or_enrolment_token_is_left_anywhere(rack: Rack) -> None:
    crv = rack.crv
    assert rack.tokens, "the deploys saw no enrolment token (test_webfarm... did not run?)"
    machines = rack.machines()
    passwords = {m["name"]: rack.password(m) for m in machines}
    for m in machines:  # the site's secret store: outside CRV_HOME
        assert not Path(m["bmc"]["password"]["file"]).is_relative_to(crv.home), m
    secrets = {f"BMC password of {n}": p for n, p in passwords.items()}
    secrets |= {f"enrolment token {t[:6]}...": t for t in rack.tokens}
    assert all(len(s) >= 16 for s in secrets.values()), "too short to search for"

    found, scanned = secrets_under(crv.home, secrets)
    prefect_db = crv.home / "prefect" / "prefect.db"
    assert prefect_db in scanned, "Prefect's database is not CRV_HOME/prefect/prefect.db"
    with sqlite3.connect(f"file:{prefect_db}?mode=ro", uri=True) as db:  # the one in use
        assert db.execute("SELECT count(*) FROM flow_run").fetchone()[0] >= 3  # deploy, scales
    logs = [p for p in scanned if p.suffix == ".log"]
    assert any(p.parent == crv.home / "service" for p in logs), logs
    assert any(p.parent == crv.home / "prefect" for p in logs), logs

    for pid, cmdline in processes().items():
        found += [f"{what} on the command line of {pid}: {cmdline[:80]}"
                  for what, s in secrets.items() if s in cmdline]  # fmt: skip
    assert found == []
