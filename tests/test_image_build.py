"""A real image: `crv image build`'s base image (cached in CRV_TEST_IMAGES across runs, see
tests/vm_fixtures.py), its manifest and cache, its disk booted with its kernel and initrd under
qemu TCG until cloud-init has finished, and its PXE ramdisk booted until its systemd runs
the agent.
Guests have no NIC, or qemu's user-mode NIC with restrict=on: nothing leaves the machine.
Marked vm: `./dev test -m vm tests/test_image_build.py` (the first run builds for minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crv.base.home import Home
from lab import images
from pools import images as manifests
from tests.conftest import REPO
from tests.vm_fixtures import IMAGE_CACHE, BuiltImage, boot, overlay, seed_iso

pytestmark = pytest.mark.vm
FINISHED = r"Cloud-init v\. \S+ finished at .*Up ([0-9.]+) seconds"


def test_the_base_image_has_a_whole_manifest_and_is_warm_the_second_time(
    built_image: BuiltImage,
) -> None:
    image = built_image()
    data = json.loads((image.dir / "image.json").read_text())
    assert data["format"] == 1 and data["builder"] == images.BUILDER and data["suite"] == "bookworm"
    assert data["packages"] == sorted(images.BASE_PACKAGES)
    assert data["cmdline"] == images.CMDLINE and data["built_at"]
    assert set(data["files"]) == {"disk", "kernel", "initrd", "ramdisk"}
    for role in data["files"]:
        manifests.verify(image.path(role), image.files[role].sha256)  # type: ignore[arg-type]
        assert image.path(role).stat().st_size == image.files[role].size  # type: ignore[index]
    assert manifests.backing_file(image.path("disk")) is None
    assert (image.dir / "build.log").is_file() and not (image.dir / "tree").exists()
    assert not list(image.dir.parent.glob(f".{image.key[:16]}-*"))  # no temporary dir left

    started = time.monotonic()
    again = built_image()
    assert time.monotonic() - started < 1.0 and again.dir == image.dir

    # the CLI, warm, in a temporary CRV_HOME whose images are the shared cache
    home = Home(Path(os.environ.get("TMPDIR", "/tmp")) / f"crv-image-cli-{os.getpid()}")
    home.root.mkdir(parents=True, exist_ok=True)
    try:
        if not home.images_dir.exists():
            home.images_dir.symlink_to(IMAGE_CACHE)
        r = subprocess.run([sys.executable, "-m", "crv_cli", "image", "build", "--json"],
                           capture_output=True, text=True, cwd=REPO, timeout=60,
                           env={**os.environ, "CRV_HOME": str(home.root)})  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["dir"] == str(home.images_dir / image.dir.name)
    finally:
        home.images_dir.unlink(missing_ok=True)
        home.root.rmdir()


def test_no_daemon_was_started_during_the_build(built_image: BuiltImage) -> None:
    log = (built_image().dir / "build.log").read_text(errors="replace")
    assert "I: success in" in log
    # qemu-guest-agent's postinst asks to start it; mmdebstrap's policy-rc.d refuses
    assert "invoke-rc.d: policy-rc.d denied execution of start." in log


def test_the_disk_boots_to_cloud_init_with_its_own_kernel(
    built_image: BuiltImage, tmp_path: Path
) -> None:
    image = built_image()
    user_data = """#cloud-config
runcmd:
  - echo "crv-check machine-id=$(cat /etc/machine-id) root=$(passwd -S root | cut -d' ' -f2) keys=$(ls /etc/ssh 2>/dev/null | grep -c host_) leases=$(ls /var/lib/dhcp | grep -c lease)" > /dev/ttyS0
"""
    console = tmp_path / "console.log"
    with boot(image.path("kernel"), image.path("initrd"), image.cmdline, console,
              disk=overlay(image, tmp_path / "guest.qcow2"),
              seed=seed_iso(tmp_path / "seed.iso", user_data)) as guest:  # fmt: skip
        done = guest.wait_for(FINISHED, timeout=420)
        took = time.monotonic() - guest.started
        check = guest.wait_for(r"crv-check machine-id=(\S*) root=(\S+) keys=(\d+) leases=(\d+)", 30)
    print(f"boot to cloud-init done: {took:.0f} s (the guest's own Up {done.group(1)} s)")
    machine_id, root, _keys, leases = check.groups()
    assert len(machine_id) == 32  # made at this boot: the image's is empty
    assert root == "L"  # root's password is locked: there is none
    assert leases == "0"
    assert manifests.backing_file(tmp_path / "guest.qcow2") == str(image.path("disk"))


def test_the_ramdisk_takes_dhcp_and_its_systemd_runs_the_agent(
    built_image: BuiltImage, tmp_path: Path
) -> None:
    image = built_image()
    # no crv.service=: the agent must say so (a service it could not reach would be retried
    # for its 600 s deadline). user-mode NIC with restrict=on: DHCP from qemu, nothing beyond.
    append = ("console=ttyS0 crv.ca_sha256=" + "0" * 64 +
              " crv.cluster=c1 crv.node=pxe-0 crv.token=t0")  # fmt: skip
    with boot(image.path("kernel"), image.path("ramdisk"), append, tmp_path / "console.log",
              memory=1536, nic="user,restrict=on,model=virtio-net-pci") as guest:  # fmt: skip
        guest.wait_for(r"crv ramdisk: network: eth0|crv ramdisk: network: ens\d+", timeout=300)
        guest.wait_for(r"inet 10\.0\.2\.15/", timeout=30)
        guest.wait_for(r"crv ramdisk: starting systemd", timeout=30)
        guest.wait_for(r"systemd \S+ running in system mode", timeout=60)
        # the ramdisk's own unit (crv-agent-pxe.service), its output on the console via journald
        guest.wait_for(r"crv-agent\[\d+\]: crv ramdisk: starting crv-agent", timeout=180)
        took = time.monotonic() - guest.started
        guest.wait_for(
            r"crv-agent: /proc/cmdline: no crv\.service= on the kernel command line", 120
        )
        # Restart=always: systemd starts it again (5 s later)
        again = r"(?s)crv-agent exited.*crv-agent\[\d+\]: crv ramdisk: starting crv-agent"
        guest.wait_for(again, 120)
        text = guest.text()
    print(f"ramdisk boot to the agent's start: {took:.0f} s")
    assert "Kernel panic" not in text
    # nothing that waits for a disk, a datasource or a login on a diskless boot
    assert "FAILED" not in text, [line for line in text.splitlines() if "FAILED" in line]
    assert "Cloud-init" not in text and "login:" not in text
