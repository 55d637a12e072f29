"""Real guests for tests: crv's image (built once, cached across runs) and qemu under TCG.

`built_image` (session-scoped; conftest.py makes it visible to every test module) is a
function: `built_image()` is the base image, `built_image("mariadb-server", "haproxy")` the
base plus those packages, `built_image(..., ramdisk=False)` without the PXE ramdisk. Images
are cached in CRV_TEST_IMAGES (default /var/tmp/crv-test-images, shared with
tests/test_vm_lab.py and benchmarks/bench_guest.py), so only the first run with a given package
set builds (a few minutes); a build's lock lets two xdist workers ask for the same image.

    @pytest.mark.vm
    def test_x(built_image):
        image = built_image("gmetad")            # pools.images.ImageManifest
        image.path("disk"), image.path("kernel"), image.cmdline

`boot(...)` runs one qemu guest (TCG, serial console to a file, no network unless given one
that leaves nothing: `-nic none` by default) from a kernel, an initrd and optionally a disk and
a NoCloud seed; `Guest.wait_for(pattern)` reads its console. `overlay` and `seed_iso` make a
guest's own disk on top of an image (never boot the image itself) and its cloud-init seed.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from crv.base.home import Home
from pools.images import ImageManifest

IMAGE_CACHE = Path(os.environ.get("CRV_TEST_IMAGES", "/var/tmp/crv-test-images"))
BuiltImage = Callable[..., ImageManifest]


def cannot_build() -> str:
    """Why this machine cannot build images (empty when it can)."""
    if os.geteuid() != 0:
        return "building an image needs root (mmdebstrap's root mode)"
    needed = ("mmdebstrap", "mke2fs", "qemu-img", "cpio", "qemu-system-x86_64")
    missing = [tool for tool in needed if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (./dev test -m vm installs them)" if missing else ""


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """`built_image(*packages, ramdisk=True) -> ImageManifest`: see the module docstring."""
    why = cannot_build()
    if why:
        pytest.skip(why)
    from lab import images

    home = Home(tmp_path_factory.mktemp("image-home"))
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    home.images_dir.symlink_to(IMAGE_CACHE)  # CRV_HOME/images is the shared cache

    def build(*packages: str, ramdisk: bool = True) -> ImageManifest:
        return images.build(home, packages, ramdisk=ramdisk, progress=print)

    return build


def overlay(image: ImageManifest, path: Path) -> Path:
    """A guest's own disk: a qcow2 whose backing file is the image's disk."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(image.path("disk")), str(path)], check=True)  # fmt: skip
    return path


def seed_iso(path: Path, user_data: str, hostname: str = "guest") -> Path:
    """A NoCloud seed (ISO 9660, Joliet and Rock Ridge names, volume id cidata; pycdlib)."""
    files = {
        "user-data": user_data.encode(),
        "meta-data": f"instance-id: {hostname}-{time.time_ns()}\nlocal-hostname: {hostname}\n".encode(),
    }
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for index, (name, data) in enumerate(files.items()):
        iso.add_fp(io.BytesIO(data), len(data), f"/SEED{index}.;1", rr_name=name,
                   joliet_path=f"/{name}")  # fmt: skip
    iso.write(str(path))
    iso.close()
    return path


class Guest:
    def __init__(self, proc: subprocess.Popen[bytes], console: Path) -> None:
        self.proc, self.console, self.started = proc, console, time.monotonic()

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of `pattern` on the console; fails with the console's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = "\n".join(self.text().splitlines()[-40:])
        qemu = self.console.with_name(self.console.name + ".qemu")
        said = qemu.read_text(errors="replace") if qemu.exists() else ""
        pytest.fail(f"no {pattern!r} on the console in {timeout:.0f} s; qemu said: {said}\n"
                    f"the console's tail:\n{tail}")  # fmt: skip


@contextmanager
def boot(
    kernel: Path,
    initrd: Path,
    append: str,
    console: Path,
    *,
    disk: Path | None = None,
    seed: Path | None = None,
    memory: int = 768,
    nic: str = "none",
) -> Iterator[Guest]:
    """One qemu guest under TCG, killed when the block ends. Only `-nic none` or a user-mode
    NIC with `restrict=on` are allowed: no traffic may leave the machine."""
    assert nic == "none" or "restrict=on" in nic, "a guest's NIC must not reach outside"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-serial", f"file:{console}", "-nic", nic,
            "-device", "virtio-rng-pci"]  # fmt: skip
    if disk is not None:
        argv += ["-drive", f"file={disk},format=qcow2,if=virtio"]
    if seed is not None:  # the cloud kernel has no AHCI: the seed sits on virtio-scsi
        argv += ["-device", "virtio-scsi-pci,id=scsi0",
                 "-drive", f"file={seed},format=raw,if=none,id=seed,media=cdrom,readonly=on",
                 "-device", "scsi-cd,drive=seed,bus=scsi0.0"]  # fmt: skip
    with open(console.with_name(console.name + ".qemu"), "wb") as errors:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors)
        try:
            yield Guest(proc, console)
        finally:
            proc.kill()
            proc.wait(timeout=30)


def processes() -> dict[str, str]:
    """pid -> command line (NULs as spaces), of every process of the host."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found[proc.name] = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
    return found


def lab_leftovers(home: Path, hardware: Path, lab: dict[str, Any]) -> list[str]:
    """What is left of a lab (and its rack) after `crv lab down`: its namespace, route, veth,
    processes naming the crv home or the hardware directory, and its directories."""

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True).stdout

    found = []
    if str(lab["netns"]) in ip("netns", "list").split():
        found.append(f"namespace {lab['netns']}")
    if str(lab["subnet"]) in ip("route"):
        found.append(f"route {lab['subnet']}")
    if f" {lab['veth']}@" in ip("-o", "link"):
        found.append(f"veth {lab['veth']}")
    names = ("qemu-system", "ipmi_sim", "power-on.sh", "libvirtd", "virtlogd", "dnsmasq")
    for pid, cmdline in processes().items():
        mentions = str(home) in cmdline or str(hardware) in cmdline
        if mentions and any(name in cmdline for name in names):
            found.append(f"process {pid}: {cmdline[:120]}")
    if (hardware / str(lab["netns"])).exists():
        found.append("the rack's hardware directory")
    if (home / "lab").exists():
        found.append("the lab dir")
    return found


def tear_down_lab(
    crv: Callable[..., subprocess.CompletedProcess[str]],
    home: Path,
    hardware: Path,
    lab: dict[str, Any] | None,
) -> None:
    """Destroy every cluster of the home, `crv lab down`, `crv down`; then nothing may be left
    of the lab (`lab_leftovers`) within 15 s."""
    import json

    listed = crv("list", "--json")
    if listed.returncode == 0:
        for cluster in json.loads(listed.stdout).get("clusters", []):
            crv("destroy", cluster["name"], timeout=600)
    crv("lab", "down", timeout=300)
    crv("down", timeout=120)
    deadline = time.monotonic() + 15
    while lab is not None and lab_leftovers(home, hardware, lab) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert lab is None or lab_leftovers(home, hardware, lab) == []
