"""The lab's network (lab/network.py) and the service's listener inside it (crv.base.netns), for
real: namespaces, a bridge, veths, iptables, dnsmasq. Needs root and iproute2; no guest boots
here (tests/test_vm_lab.py boots real ones). A "guest" is a network namespace of the test's own
with a veth on the lab's bridge: traffic stays inside namespaces this test created, except the
one connection the lab's firewall must stop (to the host's end of the lab's own veth)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crv.base.netns import listen_in, netns_path
from lab import network
from lab.network import BRIDGE, Net

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("dnsmasq") is None,
    reason="needs root, iproute2 and dnsmasq (network namespaces)",
)


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Net]:
    net = network.free_index()
    network.create(net, tmp_path)
    try:
        yield net
    finally:
        network.remove(net, tmp_path)


@pytest.fixture
def guest(lab: Net) -> Iterator[tuple[str, str]]:
    """A namespace plugged into the lab's bridge, with a static address and the lab's router."""
    name, address = f"crvguest-{os.getpid()}", str(lab.subnet.network_address + 20)
    ip("netns", "add", name)
    try:
        ip("link", "add", "g0", "netns", name, "type", "veth", "peer", "name", "gport", "netns",
           lab.netns)  # fmt: skip
        ip("-n", lab.netns, "link", "set", "gport", "master", BRIDGE, "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "addr", "add", f"{address}/24", "dev", "g0")
        ip("-n", name, "link", "set", "g0", "up")
        ip("-n", name, "route", "add", "default", "via", lab.gateway)
        yield name, address
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def connect_from(netns: str, host: str, port: int) -> str:
    """Try a TCP connection from inside `netns`: 'ok' or the error's name."""
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout=3).close(); print('ok')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    return out.stdout.strip()


def serve_once(sock: socket.socket) -> threading.Thread:
    def accept() -> None:
        sock.settimeout(20)
        try:
            conn, _ = sock.accept()
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def test_a_socket_made_in_a_namespace_listens_there_and_not_on_the_host(lab: Net) -> None:
    sock = listen_in(netns_path(lab.netns), "127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        serve_once(sock)
        assert connect_from(lab.netns, "127.0.0.1", port) == "ok"
        with pytest.raises(OSError):  # the host's loopback is another namespace's
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        sock.close()


def test_a_missing_namespace_is_an_error_naming_it() -> None:
    with pytest.raises(OSError, match="crv-no-such-lab"):
        listen_in(netns_path("crv-no-such-lab"), "127.0.0.1", 0)


def test_the_host_reaches_a_guest_and_the_guest_reaches_only_the_lab(
    lab: Net, guest: tuple[str, str]
) -> None:
    name, address = guest
    # host -> guest: routed through the veth into the namespace, answers come back
    code = (
        "import socket\n"
        f"s = socket.create_server(({address!r}, 8080)); print('up', flush=True)\n"
        "c, _ = s.accept(); c.sendall(b'hi'); c.close()\n"
    )
    server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", code],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        with socket.create_connection((address, 8080), timeout=5) as c:
            assert c.recv(10) == b"hi"
    finally:
        server.kill()
        server.wait()
    # guest -> a listener of the lab (where the crv service listens): allowed
    sock = listen_in(netns_path(lab.netns), lab.gateway, 0)
    try:
        serve_once(sock)
        assert connect_from(name, lab.gateway, sock.getsockname()[1]) == "ok"
    finally:
        sock.close()
    # guest -> the host (the host's end of the lab's own veth): the firewall drops it
    host = socket.create_server((lab.host_end, 0))
    try:
        assert connect_from(name, lab.host_end, host.getsockname()[1]) in (
            "TimeoutError",
            "timeout",
        )
    finally:
        host.close()
    # and the lab has no route anywhere else
    assert (
        "default"
        not in subprocess.run(
            ["ip", "-n", lab.netns, "route"], capture_output=True, text=True
        ).stdout
    )


def test_dnsmasq_serves_dhcp_on_the_bridge_only(lab: Net, tmp_path: Path) -> None:
    pid = int((tmp_path / "dnsmasq.pid").read_text())
    assert Path(f"/proc/{pid}").exists()
    listening = subprocess.run(["ip", "netns", "exec", lab.netns, "ss", "-lunp"],
                               capture_output=True, text=True).stdout  # fmt: skip
    assert ":67 " in listening and f"pid={pid}" in listening
    assert ":53 " not in listening  # no DNS


def test_remove_leaves_nothing_and_is_idempotent(tmp_path: Path) -> None:
    net = network.free_index()
    network.create(net, tmp_path)
    dnsmasq = int((tmp_path / "dnsmasq.pid").read_text())
    network.remove(net, tmp_path)
    network.remove(net, tmp_path)
    assert net.netns not in network.namespaces()
    deadline = time.monotonic() + 5  # killed; its parent (init) reaps it
    while Path(f"/proc/{dnsmasq}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{dnsmasq}").exists()
    assert str(net.subnet) not in subprocess.run(["ip", "route"], capture_output=True,
                                                 text=True).stdout  # fmt: skip
    assert net.veth not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


def test_two_labs_get_different_numbers(tmp_path: Path) -> None:
    first = network.free_index()
    network.create(first, tmp_path / "a")
    try:
        second = network.free_index()
        assert second.index != first.index
        assert not second.subnet.overlaps(first.subnet)
    finally:
        network.remove(first, tmp_path / "a")


def run_crv(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", "crv_cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "CRV_HOME": str(home)}, timeout=120)  # fmt: skip


def test_bad_lab_input_is_one_line_and_makes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = run_crv(home, "lab", "up")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "no image built yet: run `crv image build` first" in r.stderr
    r = run_crv(home, "lab", "up", "--image", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "neither a file nor a cached image" in r.stderr
    (tmp_path / "bad.json").write_text("{}")
    r = run_crv(home, "lab", "up", "--image", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "bad.json" in r.stderr and "format" in r.stderr
    r = run_crv(home, "lab", "status")
    assert r.returncode == 1 and "no lab" in r.stdout
    r = run_crv(home, "deploy", "appliances/webfarm", "--pool", "lab")
    assert r.returncode == 2 and "`crv lab up` makes the lab pool" in r.stderr
    assert not (home / "lab").exists() and not (home / "pools.yaml").exists()


def test_the_kvm_probe_runs_once_per_host_and_guest_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import json

    from crv.base.home import Home
    from lab import control, hypervisor

    image = tmp_path / "img"
    image.mkdir()
    files = {}
    for role, name in (("disk", "disk.qcow2"), ("kernel", "vmlinuz"), ("initrd", "initrd.img")):
        (image / name).write_bytes(name.encode())
        files[role] = {"path": name, "sha256": hashlib.sha256(name.encode()).hexdigest(), "size": 1}
    (image / "image.json").write_text(json.dumps({"format": 1, "key": "k", "files": files}))
    calls: list[Path] = []

    def probe(kernel: Path, initrd: Path) -> tuple[bool, str]:
        calls.append(kernel)
        return False, "a KVM guest did not reach its initramfs within 30 s"

    monkeypatch.setattr(hypervisor, "kvm_works", probe)
    home = Home(tmp_path / "home")
    home.root.mkdir()
    assert control._kvm(home, image / "image.json") == (False, probe(image, image)[1])
    calls.clear()
    assert control._kvm(home, image / "image.json")[0] is False
    assert calls == []  # remembered
    assert control._kvm(home, None) == (False, "no image to probe KVM with: TCG")
