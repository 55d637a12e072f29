"""Golden files for everything the pools render (house rule 7): the iPXE boot script, the
cloud-init document, the libvirt domain and volume XML and the dnsmasq configuration. Each is
rendered with fixed inputs and compared byte for byte with `tests/golden/<name>`; a change to
an output is a reviewed change to its golden file. `CRV_UPDATE_GOLDEN=1` rewrites the files.

The cloud-init document carries the agent program; its source is replaced by a fixed stand-in
here so that the golden file follows the document's shape, not every edit of the agent."""

from __future__ import annotations

import difflib
import gzip
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pools import cloudinit
from pools.baremetal import boot
from pools.baremetal.pool import BaremetalOptions, BaremetalPool
from pools.base import NodeSpec
from pools.libvirt import LibvirtOptions, LibvirtPool

GOLDEN = Path(__file__).resolve().parent / "golden"
BOOTSTRAP = {
    "service": "https://10.0.0.1:8443",
    "ca_sha256": "ab" * 32,
    "cluster": "demo",
    "node": "demo-web-0",
    "token": "tok_-ABC123",
}


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CRV_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())
        return
    expected = path.read_bytes().decode() if path.exists() else ""
    if text != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            text.splitlines(keepends=True),
            f"tests/golden/{name}",
            "rendered",
        )
        pytest.fail(
            f"{name} differs from its golden file (CRV_UPDATE_GOLDEN=1 rewrites it):\n"
            + "".join(diff),
            pytrace=False,
        )


def ipxe_script() -> str:
    return boot.render_script(
        "pxe",
        machine="rack1-m3",
        node="demo-web-0",
        cluster="demo",
        kernel="http://10.0.0.5:8067/files/vmlinuz",
        initrd="http://10.0.0.5:8067/files/initrd.img",
        cmdline=["console=ttyS0", "crv.token=tok_-ABC123", "crv.callback=http://b/cb?a=1&b=2"],
    )


def _libvirt_pool(seed: str) -> LibvirtPool:
    options = {"uri": "qemu:///session", "base_image": "/img/base.qcow2", "seed": seed}
    return LibvirtPool("vm", Path("/srv/crv/pools/vm"), LibvirtOptions.model_validate(options))


def _node() -> NodeSpec:
    return NodeSpec(
        "demo-web-0", "demo", "web", bootstrap=BOOTSTRAP, tags={"k": "a<b", "q": "\"'&"}
    )


def domain_file() -> str:
    return _libvirt_pool("file").domain_xml(_node())


def domain_volume() -> str:
    return _libvirt_pool("volume").domain_xml(_node())


def volume_disk() -> str:
    return LibvirtPool._volume_xml(
        "demo-web-0.qcow2",
        10 << 30,
        backing_path="/img/base&1.qcow2",
        backing_format="qcow2",
        format="qcow2",
    )


def volume_seed() -> str:
    return LibvirtPool._volume_xml("demo-web-0-seed.iso", 372736)


def _pxe_pool(**options: str) -> BaremetalPool:
    values = {
        "machines": "machines.yaml",
        "kernel": "http://10.0.0.5:8067/files/vmlinuz",
        "initrd": "http://10.0.0.5:8067/files/initrd.img",
        "http_listen": "10.0.0.5:8067",
        **options,
    }
    return BaremetalPool("pxe", Path("/srv/crv/pools/pxe"), BaremetalOptions(**values))


def dnsmasq() -> str:
    return boot.dnsmasq_config(_pxe_pool(), network="10.0.0.0", interface=None)


def dnsmasq_interface() -> str:
    pool = _pxe_pool(tftp_listen="10.0.0.6:69", tftp_root="/srv/tftp")
    return boot.dnsmasq_config(pool, network="192.168.1.0", interface="eth0")


RENDERERS: dict[str, Callable[[], str]] = {
    "ipxe-boot.ipxe": ipxe_script,
    "libvirt-domain-seed-file.xml": domain_file,
    "libvirt-domain-seed-volume.xml": domain_volume,
    "libvirt-volume-disk.xml": volume_disk,
    "libvirt-volume-seed.xml": volume_seed,
    "dnsmasq.conf": dnsmasq,
    "dnsmasq-interface.conf": dnsmasq_interface,
}


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_template_golden(name: str) -> None:
    check(name, RENDERERS[name]())


@pytest.fixture
def fixed_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloudinit, "agent_source", lambda: "#!/usr/bin/env python3\nprint(1)\n")
    monkeypatch.setattr(cloudinit, "agent_sha256", lambda: "cd" * 32)


@pytest.mark.usefixtures("fixed_agent")
def test_cloud_init_golden() -> None:
    check("cloud-init.yaml", cloudinit.user_data(BOOTSTRAP, "demo-web-0").decode())


@pytest.mark.usefixtures("fixed_agent")
def test_cloud_init_compressed_golden() -> None:
    data = cloudinit.user_data(BOOTSTRAP, "demo-web-0", compress=True)
    assert data[:2] == b"\x1f\x8b"
    check("cloud-init-compressed.yaml", gzip.decompress(data).decode())


def test_check_fails_and_shows_a_diff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRV_UPDATE_GOLDEN", raising=False)
    monkeypatch.setattr(f"{__name__}.GOLDEN", tmp_path)
    (tmp_path / "x").write_text("a\nb\n")
    check("x", "a\nb\n")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)-b\n\+c"):
        check("x", "a\nc\n")
    monkeypatch.setenv("CRV_UPDATE_GOLDEN", "1")
    check("x", "a\nc\n")
    assert (tmp_path / "x").read_text() == "a\nc\n"
