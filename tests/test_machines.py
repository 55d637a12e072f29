"""The machine emulators (tests/machines.py) end to end: a pool makes a machine with the real
bootstrap of a real service, the emulator boots it from the bytes the pool handed over, the real
agent enrols; destroying the machine powers its agent off.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crv.base.home import Home
from pools import cloudinit
from pools.base import NodeSpec, Pool
from tests.machines import Ec2Machines, LibvirtMachines, Machines
from tests.moto_server import MotoServer, moto_ec2
from tests.test_pool_cloud import KEY_VAR, SECRET_VAR
from tests.test_pool_cloud import make_pool as make_cloud_pool
from tests.test_pool_libvirt import URI
from tests.test_pool_libvirt import make_pool as make_libvirt_pool
from tests.test_service_security import Service, _free_port, node_state, setup_cluster

__all__ = ["moto_ec2"]

ENROL_TIMEOUT = 30.0
POWER_OFF_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("crv-home")
    service = Service(Home(root), _free_port(), root / "service.log")
    service.start()
    try:
        yield service
    finally:
        service.stop()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def bootstrap(svc: Service, admin: httpx.Client, cluster: str, name: str) -> dict[str, str]:
    """The cluster and node in the service, and the node's bootstrap with a fresh token."""
    token = setup_cluster(svc, admin, cluster, nodes=[(name, "web")])[name]
    ca_pem = svc.home.ca_file.read_text()
    return {
        "service": svc.url,
        "ca": ca_pem,
        "ca_sha256": hashlib.sha256(ssl.PEM_cert_to_DER_cert(ca_pem)).hexdigest(),
        "cluster": cluster,
        "node": name,
        "token": token,
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def boot_enrol_destroy(
    svc: Service, pool: Pool, machines: Machines, cluster: str, name: str, id_key: str
) -> None:
    with svc.admin() as admin:
        boot = bootstrap(svc, admin, cluster, name)
        mark = svc.log_mark()
        info = pool.create_node(NodeSpec(name, cluster, "web", bootstrap=boot))
        machine = info.extra[id_key]
        machines.wait(
            lambda: node_state(admin, cluster, name)["state"] == "enrolled",
            ENROL_TIMEOUT,
            f"{name} enrolled; agent log:\n{machines.log(machine)}",
        )
        assert machines.booted == {machine}
        assert machines.running() == {machine}, machines.log(machine)
        pid = machines.pid(machine)
        assert pid is not None and alive(pid)
        # the agent's own enrolment: the service records it before the agent writes the answer
        machines.wait(
            lambda: (machines.home(machine) / "node.crt").is_file(),
            ENROL_TIMEOUT,
            f"{name}'s node.crt; agent log:\n{machines.log(machine)}",
        )
        assert boot["token"] not in machines.log(machine)
        assert boot["token"] not in svc.log_since(mark)

        pool.destroy_node(name)
        machines.wait(lambda: not machines.running(), POWER_OFF_TIMEOUT, "the agent's end")
        assert not alive(pid)
        assert machines.booted == {machine}  # not booted again
        assert machines.errors == {}


def test_ec2_machine_boots_enrols_and_powers_off(
    svc: Service, moto_ec2: MotoServer, tmp_path: Path
) -> None:
    pool = make_cloud_pool(tmp_path)
    cluster = unique("t-ec2-")
    name = f"{cluster}-web-0"
    key, secret = os.environ[KEY_VAR], os.environ[SECRET_VAR]  # make_pool set them
    with Ec2Machines(
        moto_ec2.url, "us-east-1", key, secret, tmp_path / "machines", cluster=cluster
    ) as machines:
        try:
            boot_enrol_destroy(svc, pool, machines, cluster, name, "id")
        finally:
            pool.destroy_node(name)


def test_libvirt_machine_boots_enrols_and_powers_off(svc: Service, tmp_path: Path) -> None:
    pool = make_libvirt_pool(tmp_path)
    assert pool._seed_mode() == "file"  # test: URIs need no seed volume; the emulator reads files
    cluster = unique("t-lv-")
    name = f"{cluster}-web-0"
    with LibvirtMachines(URI, tmp_path / "machines", cluster=cluster) as machines:
        try:
            boot_enrol_destroy(svc, pool, machines, cluster, name, "uuid")
        finally:
            pool.destroy_node(name)


def test_agents_stop_on_leaving_the_context(svc: Service, tmp_path: Path) -> None:
    pool = make_libvirt_pool(tmp_path)
    cluster = unique("t-lv-")
    name = f"{cluster}-web-0"
    try:
        with svc.admin() as admin:
            boot = bootstrap(svc, admin, cluster, name)
        with LibvirtMachines(URI, tmp_path / "machines", cluster=cluster) as machines:
            machine = pool.create_node(NodeSpec(name, cluster, "web", bootstrap=boot)).extra["uuid"]
            machines.wait(lambda: machine in machines.running(), ENROL_TIMEOUT, "the boot")
            pid = machines.pid(machine)
            assert pid is not None
        assert not alive(pid) and not machines.running()
    finally:
        pool.destroy_node(name)


def test_a_seed_volume_is_refused_clearly(tmp_path: Path) -> None:
    xml = """<domain><devices>
      <disk type="volume" device="cdrom"><source pool="p" volume="n-seed.iso"/></disk>
    </devices></domain>"""
    with pytest.raises(NotImplementedError, match="only seed mode 'file'"):
        LibvirtMachines._seed_user_data(xml)


class Scripted(Machines):
    """An emulator over a scripted cloud: each poll takes the next answer (the last repeats)."""

    def __init__(self, base_dir: Path, answers: list[dict[str, bytes] | Exception]) -> None:
        super().__init__(base_dir, deadline=30)
        self.answers = answers

    def discover(self) -> dict[str, bytes]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_discover_errors_are_retried_and_files_are_laid_out_privately(tmp_path: Path) -> None:
    boot = {"service": "https://127.0.0.1:1", "cluster": "c", "node": "n", "token": "tok-x"}
    data = cloudinit.user_data(boot, "n", compress=True)
    machines = Scripted(tmp_path, [RuntimeError("cloud down"), {"m-1": data}])
    with machines:
        machines.wait(lambda: "m-1" in machines.running(), 10, "the boot after an error")
        assert isinstance(machines.last_error, RuntimeError)
        home = machines.home("m-1")
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE((home / "bootstrap.json").stat().st_mode) == 0o600
        assert json.loads((home / "bootstrap.json").read_bytes()) == boot
        pid = machines.pid("m-1")
        assert pid is not None and os.getpgid(pid) == pid  # its own process group
        machines.answers[:] = [{}]  # powered off
        machines.wait(lambda: not machines.running(), POWER_OFF_TIMEOUT, "the power-off")
        assert not alive(pid) and machines.booted == {"m-1"}
