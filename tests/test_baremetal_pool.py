"""The bare-metal pool (pools/baremetal) against a simulated rack: ipmi_sim BMCs speaking real
IPMI 2.0, machines that follow the real boot chain (TFTP, iPXE script by MAC, kernel and initrd
over HTTP, crv-agent with --cmdline) and the pool's own boot service, run in-process.

No crv service runs, so a booted agent never calls back by itself: the tests call back for it
(POST /callback/<machine>/<nonce>), or do not, to make a machine miss its boot deadline.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import logging
import os
import re
import secrets
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import pools
from crv.base.errors import SpecError
from crv.base.home import Home
from crv.service.pki import CertificateAuthority
from pools.baremetal import boot, inventory, simbmc, simrack
from pools.baremetal.pool import BaremetalOptions, BaremetalPool
from pools.base import NodeSpec, PoolError, write_atomic
from pools.credentials import SecretRef, check, resolve
from tests.conftest import crv, needs_ipmi_sim

pytestmark = needs_ipmi_sim

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent" / "crv_agent.py"
POOL = "rack"
STD = [f"{POOL}-m0{i}" for i in range(1, 5)]  # simrack: std machines first, then the classes
GPU = [f"{POOL}-m05", f"{POOL}-m06"]
CA_SHA256 = "ab" * 32
SERVICE = "https://127.0.0.1:9"


# -- helpers -----------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def node_spec(node: str, cluster: str = "c1", group: str = "web") -> NodeSpec:
    bootstrap = {
        "service": SERVICE,
        "ca_sha256": CA_SHA256,
        "cluster": cluster,
        "node": node,
        "token": secrets.token_urlsafe(32),
    }
    return NodeSpec(name=node, cluster=cluster, group=group, bootstrap=bootstrap)


def fetch(method: str, url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def kernel_words(script: str) -> list[str]:
    line = next(ln for ln in script.splitlines() if ln.startswith("kernel "))
    return line.split(" ")


def word(words: list[str], key: str) -> str:
    found = [w.partition("=")[2] for w in words if w.startswith(f"{key}=")]
    assert len(found) == 1, f"{key} in {words}"
    return found[0]


@dataclass
class Rack:
    home: Home
    root: Path
    pool: BaremetalPool
    secrets: dict[str, bytes]
    commands: dict[str, bytes]
    bmcs: list[Any] = field(default_factory=list)  # BMCs restarted by tests

    def dir(self, machine: str) -> Path:
        return self.root / "machines" / machine

    def running(self, machine: str) -> bool:
        return simbmc.machine_running(self.dir(machine))

    def mac(self, machine: str) -> str:
        return boot.url_mac(self.pool.machines()[machine].macs[0])

    def script(self, machine: str) -> tuple[int, str]:
        return fetch("GET", f"{self.pool.http_url}/ipxe/{self.mac(machine)}")

    def variant(self, **update: Any) -> BaremetalPool:
        """Another pool object on the same state (ledger, boot files) with other options."""
        return BaremetalPool(POOL, self.pool.state_dir, self.pool.options.model_copy(update=update))

    def set_password(self, machine: str, value: bytes) -> None:
        write_atomic(self.root / "secrets" / f"{machine}.pass", value, 0o600)

    def console(self, machine: str) -> str:
        path = self.dir(machine) / "console.log"
        return path.read_text() if path.exists() else ""

    def wait_booted(self, machine: str, since: int) -> str:
        """The kernel command line the machine's OS got, once crv-agent runs on it (in the
        console written after offset `since`, so an earlier boot does not count)."""
        wait_for(
            lambda: "starting crv-agent" in self.console(machine)[since:],
            what=f"{machine} to boot",
        )
        return (self.dir(machine) / "os" / "cmdline").read_text()


@pytest.fixture(scope="module")
def rack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rack]:
    root = tmp_path_factory.mktemp("crvhome")
    home = Home(root)
    restarted: list[Any] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRV_HOME", str(root))
        mp.delenv("CRV_POOLS_FILE", raising=False)
        try:
            simrack.create(home, POOL, machines=6, classes={"gpu": 2}, boot_timeout=60, attempts=3)
            pools_file = root / "pools.yaml"
            doc = yaml.safe_load(pools_file.read_text())
            options = doc["pools"][POOL]["options"]
            options["class"] = "std"
            options["groups"] = {"g": {"class": "gpu"}}
            write_atomic(pools_file, yaml.safe_dump(doc).encode(), 0o600)
            pool = pools.get_pool(POOL, home.pool_dir(POOL))
            assert isinstance(pool, BaremetalPool)
            assert pool.options.default_class == "std"
            rack_root = simrack.rack_dir(home, POOL)
            machines = [*STD, *GPU]
            assert sorted(pool.machines()) == machines
            r = Rack(
                home,
                rack_root,
                pool,
                {m: (rack_root / "secrets" / f"{m}.pass").read_bytes() for m in machines},
                {
                    m: (rack_root / "machines" / m / "machine-command.json").read_bytes()
                    for m in machines
                },
                restarted,
            )
            ready = threading.Event()
            threading.Thread(target=pool.serve_boot, args=(ready,), daemon=True).start()
            assert ready.wait(10), "the boot service did not start"
            yield r
        finally:
            simrack.stop(home, POOL)
            for proc in restarted:
                simbmc.stop(proc)


@pytest.fixture
def clean_rack(rack: Rack) -> Iterator[Rack]:
    """Every test starts and ends with every machine free and powered off."""
    yield rack
    for machine, data in rack.secrets.items():
        rack.set_password(machine, data)
        path = rack.dir(machine) / "machine-command.json"
        if not path.exists():
            write_atomic(path, rack.commands[machine], 0o644)
    ledger = rack.pool.leases.read()
    for node in ledger.leases:
        rack.pool.destroy_node(node)
    for machine in rack.pool.leases.read().failed:
        rack.pool.clear(machine)
    ledger = rack.pool.leases.read()
    assert not ledger.leases and not ledger.failed
    on = [m for m in rack.secrets if rack.running(m)]
    assert not on, f"machines left powered on: {on}"


# -- 1. the machines file ------------------------------------------------------------------------

MACHINE_1 = """machines:
  - name: m1
    macs: ["52:54:00:00:00:01"]
    bmc: {address: 10.1.0.1, username: crv, password: {file: m1.pass}}
"""
MACHINE_2 = """  - name: m2
    macs: ["52:54:00:00:00:02"]
    bmc: {address: 10.1.0.2, username: crv, password: {file: m2.pass}}
"""


@pytest.mark.parametrize(
    ("text", "field_", "message"),
    [
        (
            MACHINE_1.replace("{file: m1.pass}", "hunter2"),
            "machines[0].bmc.password",
            "must be a reference such as {env: NAME}",
        ),
        (
            MACHINE_1.replace("username: crv,", "username: crv, cipher_suite: 0,"),
            "machines[0].bmc.cipher_suite",
            "cipher suite 0 has no authentication",
        ),
        (
            "bmc_defaults: {cipher_suite: 0}\n" + MACHINE_1,
            "machines[0].bmc.cipher_suite",
            "no authentication",
        ),
        (
            MACHINE_1 + MACHINE_2.replace("00:02", "00:01"),
            "machines[1]",
            "52:54:00:00:00:01 is also machine 'm1''s",
        ),
        (
            MACHINE_1.replace("52:54:00:00:00:01", "52:54:00:00:01"),
            "machines[0].macs",
            "'52:54:00:00:01' is not a MAC address",
        ),
        (
            MACHINE_1.replace("    macs:", "    colour: red\n    macs:"),
            "machines[0].colour",
            "unknown field",
        ),
        (MACHINE_1 + MACHINE_2.replace("m2", "m1"), "machines[1].name", "'m1' is listed twice"),
        (
            MACHINE_1.replace("username: crv,", 'username: "",'),
            "machines[0].bmc.username",
            "must not be empty: an empty (NULL) user name logs in anonymously",
        ),
        (
            'bmc_defaults: {username: ""}\n' + MACHINE_1.replace("username: crv, ", ""),
            "machines[0].bmc.username",
            "must not be empty: an empty (NULL) user name logs in anonymously",
        ),
        (
            MACHINE_1.replace("username: crv,", 'username: "\\0",'),
            "machines[0].bmc.username",
            "must not hold a control character (a NUL ends an IPMI user name)",
        ),
        (
            MACHINE_1.replace("username: crv,", 'username: "\\0admin",'),
            "machines[0].bmc.username",
            "must not hold a control character (a NUL ends an IPMI user name)",
        ),
        (
            MACHINE_1.replace("username: crv, ", ""),
            "machines[0].bmc.username",
            "required field is missing",
        ),
        *[
            (
                MACHINE_1.replace("username: crv,", f"username: crv, cipher_suite: {suite},"),
                "machines[0].bmc.cipher_suite",
                "must be 17 (HMAC-SHA256, AES-128) or 3 (HMAC-SHA1, AES-128)",
            )
            for suite in (1, 2, 15, 16)
        ],
        (
            MACHINE_1 + MACHINE_2.replace("m2.pass", "m1.pass"),
            "machines[1].bmc.password",
            "file {dir}/m1.pass is also machine 'm1''s: give each BMC its own password",
        ),
        (
            MACHINE_1 + MACHINE_2.replace("{file: m2.pass}", "{file: ./bmc/../m1.pass}"),
            "machines[1].bmc.password",
            "file {dir}/bmc/../m1.pass is also machine 'm1''s: give each BMC its own password",
        ),
        (
            (MACHINE_1 + MACHINE_2)
            .replace("{file: m1.pass}", "{env: BMC_PW}")
            .replace("{file: m2.pass}", "{env: BMC_PW}"),
            "machines[1].bmc.password",
            "environment variable BMC_PW is also machine 'm1''s: give each BMC its own password",
        ),
        (
            (MACHINE_1 + MACHINE_2)
            .replace("{file: m1.pass}", "{prefect_secret: bmc}")
            .replace("{file: m2.pass}", "{prefect_secret: bmc}"),
            "machines[1].bmc.password",
            "Prefect Secret block 'bmc' is also machine 'm1''s: give each BMC its own password",
        ),
        (
            "bmc_defaults: {password: {file: rack.pass}}\n"
            + (MACHINE_1 + MACHINE_2)
            .replace(", password: {file: m1.pass}", "")
            .replace(", password: {file: m2.pass}", ""),
            "machines[1].bmc.password",
            "file {dir}/rack.pass (from bmc_defaults) is also machine 'm1''s: "
            "give each BMC its own password",
        ),
    ],
    ids=[
        "literal-password",
        "suite-0",
        "suite-0-default",
        "dup-mac",
        "bad-mac",
        "unknown",
        "dup",
        "empty-user",
        "empty-user-default",
        "nul-user",
        "nul-prefixed-user",
        "no-user",
        "suite-1",
        "suite-2",
        "suite-15",
        "suite-16",
        "shared-password-file",
        "shared-password-file-other-spelling",
        "shared-password-env",
        "shared-password-prefect-secret",
        "shared-password-default",
    ],
)
def test_machines_file_error_names_file_and_field(
    tmp_path: Path, text: str, field_: str, message: str
) -> None:
    path = tmp_path / "machines.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        inventory.load(path)
    err = caught.value
    assert (err.file, err.field) == (str(path), field_)
    shown = str(err)
    assert "\n" not in shown
    assert shown.startswith(f"{path}: {field_}: ")
    assert message.replace("{dir}", str(tmp_path)) in shown


@pytest.mark.parametrize(
    ("text", "field_", "message"),
    [
        (
            MACHINE_1 + MACHINE_2.replace("m2.pass", "m1.pass"),
            "machines[1].bmc.password",
            "file {dir}/m1.pass is also machine 'm1''s: give each BMC its own password",
        ),
        (
            MACHINE_1.replace("username: crv,", 'username: "",'),
            "machines[0].bmc.username",
            "must not be empty: an empty (NULL) user name logs in anonymously",
        ),
    ],
    ids=["shared-password", "empty-user"],
)
def test_machines_file_error_is_one_line_and_exit_2_from_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, field_: str, message: str
) -> None:
    """`crv baremetal list` and `check` read the machines file first: the same line, exit 2, and
    no BMC asked anything."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "machines.yaml").write_text(text)
    pool = {"driver": "baremetal", "options": {
        "machines": str(tmp_path / "machines.yaml"),
        "kernel": "http://127.0.0.1:9/vmlinuz", "initrd": "http://127.0.0.1:9/initrd",
    }}  # fmt: skip
    write_atomic(home / "pools.yaml", yaml.safe_dump({"pools": {"rack": pool}}).encode(), 0o600)
    monkeypatch.setenv("CRV_HOME", str(home))
    monkeypatch.delenv("CRV_POOLS_FILE", raising=False)
    path = tmp_path / "machines.yaml"
    line = f"error: pool rack: {path}: {field_}: {message.replace('{dir}', str(tmp_path))}\n"
    for command in (["list"], ["check"], ["check", "m1"]):
        result = crv("baremetal", *command, "--pool", "rack")
        assert (result.exit_code, result.stdout, result.stderr) == (2, "", line), command


def test_literal_password_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "machines.yaml"
    path.write_text(MACHINE_1.replace("{file: m1.pass}", "hunter2"))
    with pytest.raises(SpecError) as caught:
        inventory.load(path)
    assert "hunter2" not in str(caught.value)
    assert str(caught.value).endswith(
        "machines[0].bmc.password: must be a reference such as {env: NAME} or {file: PATH}, "
        "not a value"
    )


def test_missing_machines_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=re.escape(f"{tmp_path / 'nope.yaml'}: machines: no such")):
        inventory.load(tmp_path / "nope.yaml")


# -- 2. credential references ----------------------------------------------------------------------


def test_file_credential_is_relative_to_the_machines_file_and_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "bmc").mkdir(parents=True)
    (site / "machines.yaml").write_text(MACHINE_1.replace("m1.pass", "bmc/m1.pass"))
    value = "S3cret-" + secrets.token_hex(6)
    secret = site / "bmc" / "m1.pass"
    secret.write_text(value + "\n")
    secret.chmod(0o600)
    monkeypatch.chdir(tmp_path)  # not the machines file's directory
    ref = inventory.load(site / "machines.yaml")["m1"].bmc.password
    assert ref == SecretRef(file=str(site / "bmc" / "m1.pass"))
    assert resolve(ref, "p", "machines.m1.bmc.password") == value

    secret.chmod(0o644)
    for call in (check, resolve):
        with pytest.raises(PoolError) as caught:
            call(ref, "p", "machines.m1.bmc.password")
        text = str(caught.value)
        assert text.startswith("pool p: option machines.m1.bmc.password: ")
        assert "chmod 600" in text and str(secret) in text and "0o644" in text
        assert value not in text
        assert not caught.value.temporary

    secret.unlink()
    with pytest.raises(PoolError) as caught:
        resolve(ref, "p", "machines.m1.bmc.password")
    assert str(secret) in str(caught.value) and "No such file" in str(caught.value)


def test_the_simulated_rack_gives_each_bmc_its_own_long_random_password(rack: Rack) -> None:
    """What the machines-file loader cannot see (it holds references, never values): the rack
    `crv baremetal simulate-rack` makes has a 16-to-20-character password per BMC, none shared,
    each in its own 0600 file."""
    machines = rack.pool.machines()
    files = {m.name: m.bmc.password.file for m in machines.values()}
    assert len(set(files.values())) == len(machines) == 6
    values = {}
    for name, file in files.items():
        assert file is not None and stat.S_IMODE(os.stat(file).st_mode) == 0o600
        values[name] = resolve(machines[name].bmc.password, POOL, "password")
        assert 16 <= len(values[name].encode()) <= 20, name
    assert len(set(values.values())) == len(values)


# -- 3. boot scripts ---------------------------------------------------------------------------------


def _render(**change: Any) -> str:
    args: dict[str, Any] = {
        "machine": "r1-01",
        "node": "c1-web-0",
        "cluster": "c1",
        "kernel": "http://boot/vmlinuz",
        "initrd": "http://boot/initrd.img",
        "cmdline": ["console=ttyS0", "crv.node=c1-web-0", "crv.token=abc_-DEF"],
    }
    args.update(change)
    return boot.render_script("p", **args)


@pytest.mark.parametrize("bad", ["a$b", "${x}", "a b", "a\nb", "a#b", 'a"b', "a'b", "", "a\tb"])
def test_render_script_refuses_unsafe_words(bad: str) -> None:
    with pytest.raises(PoolError, match="unsafe characters"):
        _render(cmdline=["console=ttyS0", f"crv.token={bad}" if bad else bad])
    with pytest.raises(PoolError, match="kernel word"):
        _render(kernel=f"http://boot/{bad}" if bad else bad)
    with pytest.raises(PoolError, match="initrd word"):
        _render(initrd=f"http://boot/{bad}" if bad else bad)


@pytest.mark.parametrize("label", ["machine", "node", "cluster"])
def test_render_script_refuses_unsafe_names(label: str) -> None:
    with pytest.raises(PoolError, match=f"{label} name"):
        _render(**{label: "x\nkernel http://evil/k"})


def test_render_script_kernel_line_carries_the_words_in_order() -> None:
    script = _render()
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    assert kernel_words(script) == [
        "kernel",
        "--name",
        "kernel",
        "http://boot/vmlinuz",
        "initrd=initrd",
        "console=ttyS0",
        "crv.node=c1-web-0",
        "crv.token=abc_-DEF",
    ]
    assert "initrd --name initrd http://boot/initrd.img" in lines
    assert lines[-1] == "boot"
    assert any("r1-01" in ln and "c1-web-0" in ln for ln in lines if ln.startswith("#"))


# -- 4. create_node ------------------------------------------------------------------------------------


def test_create_node_powers_on_and_network_boots_the_machine(clean_rack: Rack) -> None:
    rack, pool = clean_rack, clean_rack.pool
    mark = len(rack.console(STD[0]))
    spec = node_spec("c1-web-0")
    info = pool.create_node(spec)
    machine = info.extra["machine"]
    assert machine == STD[0]  # inventory order
    assert info.state == "pending"
    assert info.address == pool.machines()[machine].address
    assert info.tags == {"crv-cluster": "c1", "crv-node": "c1-web-0"}
    assert rack.running(machine)

    cmdline = rack.wait_booted(machine, mark).split()
    console = rack.console(machine)[mark:]
    assert f"PXE: tftp://{pool.options.tftp_listen}/undionly.kpxe" in console
    assert f"iPXE: chain {pool.http_url}/ipxe/{rack.mac(machine)}" in console
    nonce = pool.leases.read().leases["c1-web-0"].nonce
    b = spec.bootstrap
    assert word(cmdline, "crv.service") == SERVICE
    assert word(cmdline, "crv.ca_sha256") == b["ca_sha256"]
    assert word(cmdline, "crv.cluster") == "c1"
    assert word(cmdline, "crv.node") == "c1-web-0"
    assert word(cmdline, "crv.token") == b["token"]
    assert word(cmdline, "crv.callback") == f"{pool.http_url}/callback/{machine}/{nonce}"
    assert "console=ttyS0" in cmdline

    before = Counter(pool.power.commands)
    assert before[machine] > 0
    again = pool.create_node(spec)
    assert again.extra["machine"] == machine and again.state == "pending"
    assert pool.power.commands == before  # no IPMI command for an existing node

    with pytest.raises(PoolError, match="node c1-web-0 is leased to cluster c1"):
        pool.create_node(node_spec("c1-web-0", cluster="c2"))
    assert pool.power.commands == before
    assert [n.name for n in pool.list_nodes("c2")] == []
    assert [n.name for n in pool.list_nodes("c1")] == ["c1-web-0"]


# -- 5. leases ---------------------------------------------------------------------------------------


def test_concurrent_creates_get_distinct_machines_until_the_class_is_used_up(
    clean_rack: Rack,
) -> None:
    rack, pool = clean_rack, clean_rack.pool
    names = [f"c1-web-{i}" for i in range(4)]
    barrier = threading.Barrier(len(names))
    results: dict[str, Any] = {}

    def create(name: str) -> None:
        barrier.wait()
        try:
            results[name] = pool.create_node(node_spec(name))
        except Exception as exc:  # reported below
            results[name] = exc

    threads = [threading.Thread(target=create, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = {n: r for n, r in results.items() if isinstance(r, Exception)}
    assert not errors
    got = {n: results[n].extra["machine"] for n in names}
    assert sorted(got.values()) == STD
    ledger = pool.leases.read()
    assert {n: le.machine for n, le in ledger.leases.items()} == got
    assert all(rack.running(m) for m in STD)

    with pytest.raises(PoolError) as caught:
        pool.create_node(node_spec("c1-web-4"))
    assert str(caught.value) == f"pool {POOL}: no free machine of class std: 4 of 4 in use"
    assert pool.get_node("c1-web-4") is None

    gpu = pool.create_node(node_spec("c1-g-0", group="g"))
    assert gpu.extra["machine"] == GPU[0] and gpu.extra["class"] == "gpu"


# -- 6. the boot script's life ---------------------------------------------------------------------


def test_script_is_served_only_while_provisioning(clean_rack: Rack) -> None:
    rack, pool = clean_rack, clean_rack.pool
    spec = node_spec("c1-web-0")
    machine = pool.create_node(spec).extra["machine"]
    status, script = rack.script(machine)
    assert status == 200
    assert word(kernel_words(script), "crv.token") == spec.bootstrap["token"]
    assert fetch("GET", f"{pool.http_url}/ipxe/{rack.mac(STD[1])}")[0] == 404  # not leased

    nonce = pool.leases.read().leases["c1-web-0"].nonce
    wrong = secrets.token_urlsafe(24)
    assert fetch("POST", f"{pool.http_url}/callback/{machine}/{wrong}")[0] == 404
    assert fetch("POST", f"{pool.http_url}/callback/{STD[1]}/{nonce}")[0] == 404
    assert rack.script(machine)[0] == 200
    assert pool.get_node("c1-web-0").state == "pending"  # type: ignore[union-attr]

    assert fetch("POST", f"{pool.http_url}/callback/{machine}/{nonce}")[0] == 204
    assert rack.script(machine)[0] == 404
    assert pool.get_node("c1-web-0").state == "running"  # type: ignore[union-attr]
    tended = pool.tend("c1-web-0")
    assert tended is not None and tended.state == "running" and tended.extra["lease"] == "up"
    # a repeated call-back (a lost answer, retried) brings nothing back
    assert fetch("POST", f"{pool.http_url}/callback/{machine}/{nonce}")[0] in (204, 404)
    assert rack.script(machine)[0] == 404

    assert rack.running(machine)
    pool.destroy_node("c1-web-0")
    assert not rack.running(machine)
    assert pool.leases.read().state_of(machine) == "free"
    assert pool.get_node("c1-web-0") is None
    assert rack.script(machine)[0] == 404
    pool.destroy_node("c1-web-0")  # again: nothing to do, no error


# -- 7. failover ---------------------------------------------------------------------------------------


def test_tend_moves_a_node_that_did_not_call_back_and_gives_up_after_attempts(
    clean_rack: Rack,
) -> None:
    rack = clean_rack
    pool = rack.variant(boot_timeout=2.0, attempts=2)
    first, second = STD[0], STD[1]
    (rack.dir(first) / "machine-command.json").unlink()  # powers on into `sleep infinity`
    mark = len(rack.console(second))
    spec = node_spec("c1-web-0")
    info = pool.create_node(spec)
    assert info.extra["machine"] == first
    assert rack.running(first)
    status, script = rack.script(first)
    assert status == 200
    first_words = kernel_words(script)

    tended = pool.tend("c1-web-0")
    assert tended is not None and tended.state == "pending" and tended.extra["machine"] == first
    lease = pool.leases.read().leases["c1-web-0"]
    time.sleep(max(0.0, lease.deadline - time.time()) + 0.1)

    moved = pool.tend("c1-web-0")
    assert moved is not None and moved.state == "pending"
    assert moved.extra["machine"] == second and moved.extra["failed_machines"] == [first]
    assert moved.address == pool.machines()[second].address
    assert not rack.running(first)
    ledger = pool.leases.read()
    failed = ledger.failed[first]
    assert failed["reason"] == "did not call back within 2 s of power-on"
    assert (failed["node"], failed["cluster"], failed["power"]) == ("c1-web-0", "c1", "off")
    assert rack.script(first)[0] == 404
    status, script = rack.script(second)
    assert status == 200
    second_words = kernel_words(script)
    assert word(second_words, "crv.token") == word(first_words, "crv.token")
    assert word(second_words, "crv.token") == spec.bootstrap["token"]
    assert word(second_words, "crv.callback") != word(first_words, "crv.callback")
    nonce = ledger.leases["c1-web-0"].nonce
    assert word(second_words, "crv.callback") == f"{pool.http_url}/callback/{second}/{nonce}"
    assert f"# crv: machine {second} boots node c1-web-0 of cluster c1." in script
    cmdline = rack.wait_booted(second, mark).split()  # the second one really boots it
    assert word(cmdline, "crv.token") == spec.bootstrap["token"]

    lease = ledger.leases["c1-web-0"]
    time.sleep(max(0.0, lease.deadline - time.time()) + 0.1)
    with pytest.raises(PoolError) as caught:
        pool.tend("c1-web-0")
    text = str(caught.value)
    assert not caught.value.temporary
    assert f"2 machines did not boot ({first}, {second})" in text
    assert pool.get_node("c1-web-0") is None
    assert set(pool.leases.read().failed) == {first, second}
    assert [m for m in rack.secrets if rack.running(m)] == []


# -- 8. BMC failures -------------------------------------------------------------------------------


def test_refused_credentials_write_the_machine_off(
    clean_rack: Rack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rack, pool = clean_rack, clean_rack.pool
    first = STD[0]
    real = rack.secrets[first].decode().strip()
    wrong = secrets.token_urlsafe(12)
    assert len(wrong) == 16
    rack.set_password(first, wrong.encode() + b"\n")

    info = pool.create_node(node_spec("c1-web-0"))
    assert info.extra["machine"] == STD[1]
    assert info.extra["failed_machines"] == [first]
    failed = pool.leases.read().failed[first]
    assert "refused the credentials of user 'crv'" in failed["reason"]
    assert not rack.running(first)
    pool.destroy_node("c1-web-0")
    rack.set_password(first, rack.secrets[first])
    pool.clear(first)

    rack.set_password(first, wrong.encode() + b"\n")
    single = rack.variant(attempts=1)
    with pytest.raises(PoolError) as caught:
        single.create_node(node_spec("c1-web-1"))
    text = str(caught.value)
    assert not caught.value.temporary
    assert f"node c1-web-1: no machine could be powered on: machine {first}" in text
    assert "refused the credentials of user 'crv'" in text
    assert single.get_node("c1-web-1") is None
    assert first in single.leases.read().failed
    assert not rack.running(STD[1])  # nothing else was tried
    for secret in (real, wrong):
        assert secret not in text
        assert secret not in caplog.text
        assert secret not in json.dumps(single.leases.read().failed)


def test_unreachable_bmc_is_a_temporary_failure_of_that_machine(clean_rack: Rack) -> None:
    rack = clean_rack
    first = STD[0]
    bmcs = json.loads((rack.root / "bmcs.json").read_text())
    entry = next(e for e in bmcs if e["machine"] == first)
    os.kill(entry["pid"], signal.SIGTERM)
    with suppress(ChildProcessError):
        os.waitpid(entry["pid"], 0)
    try:
        single = rack.variant(attempts=1, power_window=1.0)
        began = time.monotonic()
        with pytest.raises(PoolError) as caught:
            single.create_node(node_spec("c1-web-0"))
        assert time.monotonic() - began < 15
        assert caught.value.temporary
        text = str(caught.value)
        assert f"machine {first}: BMC" in text and "not answering" in text
        failed = single.leases.read().failed[first]
        assert "not answering" in failed["reason"]
        assert failed["power"].startswith("unknown: ") and "not answering" in failed["power"]
        assert single.get_node("c1-web-0") is None
    finally:  # the BMC back, so the rack's cleanup can clear the machine
        m = rack.pool.machines()[first]
        spec = simbmc.SimBmcSpec(
            first,
            m.bmc.address,
            m.bmc.port,
            m.bmc.username,
            rack.secrets[first].decode().strip(),
            rack.dir(first).resolve(),
        )
        rack.bmcs.append(simbmc.start(spec))


# -- 9. clear ----------------------------------------------------------------------------------------


def test_clear_powers_a_failed_machine_off_and_frees_it(clean_rack: Rack) -> None:
    rack, pool = clean_rack, clean_rack.pool
    first = STD[0]
    every = len(pool.machines())
    assert pool.capacity() == every  # the optional capability: machines free now
    # for a node group: only machines of its class (g: gpu; any other group: the pool's std)
    assert (pool.capacity("g"), pool.capacity("web")) == (len(GPU), len(STD))
    pool.power.on(first, pool.bmc(pool.machines()[first]))  # on, as a broken machine may be
    wait_for(lambda: rack.running(first), what=f"{first} to power on")
    rack.set_password(first, secrets.token_urlsafe(12).encode())
    with pytest.raises(PoolError):
        rack.variant(attempts=1).create_node(node_spec("c1-web-0"))
    ledger = pool.leases.read()
    assert ledger.state_of(first) == "failed"
    assert ledger.failed[first]["power"].startswith("unknown: ")
    assert "refused the credentials" in ledger.failed[first]["power"]
    assert rack.running(first)  # the write-off could not power it off
    assert pool.capacity() == every - 1  # a failed machine is not free
    assert (pool.capacity("g"), pool.capacity("web")) == (len(GPU), len(STD) - 1)

    rack.set_password(first, rack.secrets[first])
    pool.clear(first)
    assert pool.leases.read().state_of(first) == "free"
    assert not rack.running(first)
    with pytest.raises(PoolError, match=f"machine {first} is free"):
        pool.clear(first)
    with pytest.raises(PoolError, match="no machine 'nope'"):
        pool.clear("nope")
    info = pool.create_node(node_spec("c1-web-0"))
    assert info.extra["machine"] == first  # free again, first in inventory order
    assert pool.capacity() == every - 1  # nor is a leased one


# -- 10. the agent's kernel-command-line bootstrap -------------------------------------------------


def _load_agent() -> Any:
    name = "crv_agent_for_baremetal_tests"
    spec = importlib.util.spec_from_file_location(name, AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


agent = _load_agent()


def test_parse_cmdline_keeps_crv_words_only() -> None:
    text = (
        "BOOT_IMAGE=/vmlinuz initrd=initrd console=ttyS0 quiet crv.node=c1-web-0 "
        f"crv.service={SERVICE} crv.ca_sha256={CA_SHA256} crv.cluster=c1 crv.token=a_b-C "
        "crv.callback=http://10.0.0.1:8067/callback/r1-01/n0nce crv.flag\n"
    )
    assert agent.parse_cmdline(text) == {
        "node": "c1-web-0",
        "service": SERVICE,
        "ca_sha256": CA_SHA256,
        "cluster": "c1",
        "token": "a_b-C",
        "callback": "http://10.0.0.1:8067/callback/r1-01/n0nce",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crv.node=a crv.colour=red", "unknown parameter 'crv.colour'"),
        ('crv.token=ab"cd', "crv.token has characters"),
        ("crv.node=a<b", "crv.node has characters"),
        ("crv.token=", "crv.token has characters"),
    ],
)
def test_parse_cmdline_refuses(text: str, message: str) -> None:
    with pytest.raises(agent.ConfigError, match=re.escape(message)):
        agent.parse_cmdline(text)


@pytest.fixture(scope="module")
def ca_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes, str]]:
    """A real HTTPS server answering GET /v1/ca with the CA's PEM, as the crv service does."""
    directory = tmp_path_factory.mktemp("ca")
    ca = CertificateAuthority.create_or_load(directory)
    key_pem, cert = ca.issue_server_certificate(["localhost"], ["127.0.0.1"])
    from cryptography.hazmat.primitives.serialization import Encoding

    (directory / "server.crt").write_bytes(cert.public_bytes(Encoding.PEM))
    (directory / "server.key").write_bytes(key_pem)
    pem = ca.certificate_pem

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, status = (pem, 200) if self.path == "/v1/ca" else (b"{}", 404)
            self.send_response(status)
            self.send_header("Content-Type", "application/x-pem-file")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", pem, ca.fingerprint_sha256
    finally:
        server.shutdown()
        server.server_close()


def test_bootstrap_from_cmdline_fetches_the_pinned_ca(
    tmp_path: Path, ca_server: tuple[str, bytes, str]
) -> None:
    url, pem, fingerprint = ca_server
    assert fingerprint == hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()
    home = tmp_path / "agent"
    home.mkdir()
    cmdline = tmp_path / "cmdline"
    callback = "http://127.0.0.1:8067/callback/r1-01/n0nce"
    cmdline.write_text(
        f"initrd=initrd console=ttyS0 crv.service={url} crv.ca_sha256={fingerprint} "
        f"crv.cluster=c1 crv.node=c1-web-0 crv.token=tok_en-1 crv.callback={callback}\n"
    )
    agent.bootstrap_from_cmdline(home, cmdline, time.monotonic() + 20)
    path = home / "bootstrap.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    boot_doc = json.loads(path.read_text())
    assert boot_doc == {
        "service": url,
        "ca_sha256": fingerprint,
        "cluster": "c1",
        "node": "c1-web-0",
        "token": "tok_en-1",
        "callback": callback,
        "ca": pem.decode(),
    }
    assert agent.load_bootstrap(home)["node"] == "c1-web-0"
    ca_path = agent.install_ca(home, boot_doc)
    assert ssl.PEM_cert_to_DER_cert(ca_path.read_text()) == ssl.PEM_cert_to_DER_cert(pem.decode())

    # written once: a later boot's (spent) command line does not replace it
    cmdline.write_text(cmdline.read_text().replace("tok_en-1", "other"))
    agent.bootstrap_from_cmdline(home, cmdline, time.monotonic() + 5)
    assert json.loads(path.read_text())["token"] == "tok_en-1"


def test_bootstrap_from_cmdline_ca_not_matching_the_pin_is_refused(
    tmp_path: Path, ca_server: tuple[str, bytes, str]
) -> None:
    url, _, fingerprint = ca_server
    other = "0" * 64
    assert other != fingerprint
    home = tmp_path / "agent"
    home.mkdir()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(
        f"crv.service={url} crv.ca_sha256={other} crv.cluster=c1 crv.node=n1 crv.token=t\n"
    )
    agent.bootstrap_from_cmdline(home, cmdline, time.monotonic() + 20)
    boot_doc = json.loads((home / "bootstrap.json").read_text())
    with pytest.raises(agent.ConfigError, match="does not match ca_sha256"):
        agent.install_ca(home, boot_doc)
    assert not (home / "ca.crt").exists()


@pytest.mark.parametrize("missing", ["service", "ca_sha256", "cluster", "node", "token"])
def test_bootstrap_from_cmdline_needs_every_field(tmp_path: Path, missing: str) -> None:
    words = {
        "service": SERVICE,
        "ca_sha256": CA_SHA256,
        "cluster": "c1",
        "node": "n1",
        "token": "t",
    }
    del words[missing]
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(" ".join(f"crv.{k}={v}" for k, v in words.items()))
    with pytest.raises(agent.ConfigError, match=re.escape(f"no crv.{missing}= on the kernel")):
        agent.bootstrap_from_cmdline(tmp_path, cmdline, time.monotonic() + 1)
    assert not (tmp_path / "bootstrap.json").exists()


# -- 11. dnsmasq ----------------------------------------------------------------------------------


def _pxe_pool(tmp_path: Path, **options: Any) -> BaremetalPool:
    values = {
        "machines": "machines.yaml",
        "kernel": "http://10.0.0.5:8067/files/vmlinuz",
        "initrd": "http://10.0.0.5:8067/files/initrd.img",
        "http_listen": "10.0.0.5:8067",
        **options,
    }
    return BaremetalPool("pxe", tmp_path / "pools" / "pxe", BaremetalOptions(**values))


def test_dnsmasq_config(tmp_path: Path) -> None:
    pool = _pxe_pool(tmp_path)
    text = boot.dnsmasq_config(pool, network="10.0.0.0", interface=None)
    lines = text.splitlines()
    assert "dhcp-range=10.0.0.0,proxy" in lines
    assert "port=0" in lines
    assert 'pxe-service=tag:!ipxe,x86PC,"crv: iPXE (BIOS)",undionly.kpxe,10.0.0.5' in lines
    assert 'pxe-service=tag:!ipxe,X86-64_EFI,"crv: iPXE (UEFI)",ipxe.efi,10.0.0.5' in lines
    assert "dhcp-boot=tag:ipxe,http://10.0.0.5:8067/ipxe/${mac:hexhyp}" in lines
    assert not any(ln.startswith("interface=") for ln in lines)
    with_if = boot.dnsmasq_config(pool, network="10.0.0.0", interface="eth0").splitlines()
    assert "interface=eth0" in with_if and "bind-interfaces" in with_if

    for network in ("10.0.0.0/24", "not-an-ip", "10.0.0.0\ndhcp-range=x"):
        with pytest.raises(PoolError, match="--network"):
            boot.dnsmasq_config(pool, network=network, interface=None)
    with pytest.raises(PoolError, match="--interface"):
        boot.dnsmasq_config(pool, network="10.0.0.0", interface="eth0\nport=53")
    odd = _pxe_pool(tmp_path, tftp_listen="0.0.0.0:6969", tftp_root=str(tmp_path))
    with pytest.raises(PoolError, match="port 69"):
        boot.dnsmasq_config(odd, network="10.0.0.0", interface=None)


@pytest.mark.skipif(not os.access("/usr/sbin/dnsmasq", os.X_OK), reason="dnsmasq not installed")
def test_dnsmasq_accepts_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(boot.dnsmasq_config(_pxe_pool(tmp_path), network="10.0.0.0", interface=None))
    result = subprocess.run(
        ["/usr/sbin/dnsmasq", "--test", f"--conf-file={conf}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_dnsmasq_config_as_the_dhcp_server_reserves_every_machines_address(
    tmp_path: Path,
) -> None:
    machines = {"machines": [
        {"name": "m1", "macs": ["52:54:00:00:00:01", "52:54:00:00:01:01"], "address": "10.0.0.11",
         "bmc": {"address": "10.1.0.11", "username": "u", "password": {"env": "X1"}}},
        {"name": "m2", "macs": ["52:54:00:00:00:02"], "address": "10.0.0.12",
         "bmc": {"address": "10.1.0.12", "username": "u", "password": {"env": "X2"}}},
    ]}  # fmt: skip
    (tmp_path / "machines.yaml").write_text(yaml.safe_dump(machines))
    pool = _pxe_pool(tmp_path, machines=str(tmp_path / "machines.yaml"))
    text = boot.dnsmasq_config(pool, network="10.0.0.0", interface="br0", dhcp=True)
    lines = text.splitlines()
    assert "dhcp-range=10.0.0.0,static" in lines and "dhcp-range=10.0.0.0,proxy" not in lines
    # every NIC of the machine, on one line (dnsmasq refuses an address reserved twice)
    assert "dhcp-host=52:54:00:00:00:01,52:54:00:00:01:01,10.0.0.11,m1" in lines
    assert "dhcp-host=52:54:00:00:00:02,10.0.0.12,m2" in lines
    assert "dhcp-boot=tag:ipxe,http://10.0.0.5:8067/ipxe/${mac:hexhyp}" in lines
    if os.access("/usr/sbin/dnsmasq", os.X_OK):
        conf = tmp_path / "dnsmasq.conf"
        conf.write_text(text.replace("interface=br0\n", "").replace("bind-interfaces\n", ""))
        result = subprocess.run(["/usr/sbin/dnsmasq", "--test", f"--conf-file={conf}"],
                                capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
    entry = {k: v for k, v in machines["machines"][0].items() if k != "address"}
    named = {"machines": [entry]}  # no address: nothing to reserve
    (tmp_path / "machines.yaml").write_text(yaml.safe_dump(named))
    with pytest.raises(PoolError, match="m1 has no IP address"):
        boot.dnsmasq_config(_pxe_pool(tmp_path, machines=str(tmp_path / "machines.yaml")),
                            network="10.0.0.0", interface=None, dhcp=True)  # fmt: skip
