"""`crv image build`: crv's own Debian 12 guest images, from Debian's mirror only.

An image is built by `mmdebstrap` (no root filesystem, kernel or cloud image is downloaded from
anywhere but the Debian mirror the host's apt uses) into a directory tree, and from that tree:

- `disk.qcow2`: an ext4 root filesystem made without mounting anything (`mke2fs -d`), converted
  to qcow2 with no backing file. It has no boot loader: the libvirt pool boots it with direct
  kernel boot (the kernel and initrd below, `cmdline` of the manifest);
- `vmlinuz`, `initrd.img`: the tree's Debian cloud kernel and its initramfs;
- `ramdisk.cpio.gz` (unless --no-ramdisk): the whole tree as an initramfs whose `/init` brings
  the network up by DHCP and runs `crv-agent run --cmdline /proc/cmdline`, for machines that
  PXE-boot (the role Ironic's IPA ramdisk plays);
- `image.json`, the manifest (pools/images.py reads it), written last: every file with its
  SHA-256 and size, the packages, the suite and mirror, the builder version.

Images are cached by content: the key hashes the builder version, suite, mirror, the sorted
package list and the agent's SHA-256, and the image lives in `$CRV_HOME/images/<key[:16]>/`. A
warm cache answers at once; a build goes to a temporary directory renamed into place at the end
under a lock, so a failed or killed build never leaves a half image that looks whole.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crv.base.errors import CrvError
from crv.base.flock import exclusive
from crv.base.home import Home
from pools import AGENT
from pools.images import MANIFEST, ImageManifest, load, sha256_of

BUILDER = "crv-image/2"  # part of the cache key: a change to what a build makes bumps it
SUITE = "bookworm"
# What every guest needs: systemd, python3 for the agent and recipes, cloud-init, the cloud
# kernel (virtio built in), DHCP, and the guest agent libvirt asks for addresses.
BASE_PACKAGES = (
    "systemd-sysv",
    "python3",
    "cloud-init",
    "linux-image-cloud-amd64",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "iproute2",
    "qemu-guest-agent",
    "ca-certificates",
)
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,99}$")
Progress = Callable[[str], None]

# /init of the PXE ramdisk: a tmpfs root holding the whole tree, so the agent runs from RAM
RAMDISK_INIT = """#!/bin/sh
# crv PXE ramdisk: network by DHCP, then the agent with its bootstrap from the kernel command line
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp && mount -t tmpfs tmpfs /run
for m in virtio_net e1000 e1000e; do modprobe -q "$m" 2>/dev/null || true; done
ip link set lo up
for dev in /sys/class/net/*; do
    name=${dev##*/}
    [ "$name" = lo ] && continue
    ip link set "$name" up
    dhclient -1 -v "$name" && break
done
hostname "$(sed -n 's/.*crv\\.node=\\([^ ]*\\).*/\\1/p' /proc/cmdline)" 2>/dev/null || true
while true; do
    python3 /usr/local/bin/crv-agent run --home /var/lib/crv-agent --cmdline /proc/cmdline
    echo "crv-agent exited ($?); again in 5 s" >&2
    sleep 5
done
"""


class ImageBuildError(CrvError):
    """A build that failed: one line saying which step (and which package) failed."""


def packages_of(appliances: Iterable[Any], extra: Iterable[str] = ()) -> list[str]:
    """The union of the appliances' `image.packages` and `extra`, checked, sorted."""
    found = set(extra)
    for appliance in appliances:
        found |= set(appliance.packages)
    bad = sorted(p for p in found if not PACKAGE.match(p))
    if bad:
        raise ImageBuildError(f"--package: {bad[0]!r} is not a Debian package name")
    return sorted(found)


def default_mirror() -> str:
    """The Debian mirror the host's apt uses (deb822 or one-line sources), else deb.debian.org."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(path.read_text())
        except OSError:
            continue
    for text in texts:
        for match in re.finditer(r"(?:URIs:|^deb)\s+(\S+)", text, re.M):
            uri = match.group(1)
            if uri.startswith("http") and "security" not in uri:
                return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def key_of(packages: Iterable[str], suite: str, mirror: str, ramdisk: bool) -> str:
    agent = hashlib.sha256(AGENT.read_bytes()).hexdigest() if ramdisk else ""
    text = json.dumps([BUILDER, suite, mirror, sorted(set(packages)), ramdisk, agent])
    return hashlib.sha256(text.encode()).hexdigest()


def images_dir(home: Home) -> Path:
    return home.root / "images"


def cached(home: Home) -> list[ImageManifest]:
    """The images in the cache, newest first (a directory without a readable manifest is a
    build in progress or a broken one, and not listed)."""
    found = []
    for manifest in images_dir(home).glob(f"*/{MANIFEST}"):
        try:
            found.append(load(manifest))
        except CrvError:
            continue
    return sorted(found, key=lambda m: m.dir.stat().st_mtime, reverse=True)


def build(
    home: Home,
    packages: Iterable[str] = (),
    *,
    mirror: str | None = None,
    suite: str = SUITE,
    ramdisk: bool = True,
    progress: Progress = lambda _line: None,
) -> ImageManifest:
    """The image with BASE_PACKAGES + `packages`: from the cache, else built (see the module
    docstring). ImageBuildError names the failed step."""
    wanted = sorted(set(BASE_PACKAGES) | set(packages))
    mirror = (mirror or default_mirror()).rstrip("/")
    key = key_of(wanted, suite, mirror, ramdisk)
    target = images_dir(home) / key[:16]
    images_dir(home).mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive(images_dir(home) / f".{key[:16]}.lock"):
        for stale in images_dir(home).glob(f".{key[:16]}-*"):  # a killed build's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if (target / MANIFEST).is_file():
            progress(f"cached: {target}")
            return load(target)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=images_dir(home)))
        try:
            _build_into(work, wanted, suite, mirror, ramdisk, progress, key)
            shutil.rmtree(work / "tree")
            os.replace(work, target)  # whole, or not there at all
        except BaseException:
            failed = images_dir(home) / f"{key[:16]}-failed.log"  # kept: the error points here
            if (work / "build.log").exists():
                os.replace(work / "build.log", failed)
            shutil.rmtree(work, ignore_errors=True)
            raise
    return load(target)


def _build_into(
    work: Path,
    packages: list[str],
    suite: str,
    mirror: str,
    ramdisk: bool,
    progress: Progress,
    key: str,
) -> None:
    tree, log = work / "tree", work / "build.log"
    failed_log = work.parent / f"{key[:16]}-failed.log"  # where build() keeps it on failure
    started = time.monotonic()
    progress(f"mmdebstrap {suite} from {mirror}: {len(packages)} packages")
    _step(
        "mmdebstrap",
        ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}",
         "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*",
         "--dpkgopt=path-include=/usr/share/locale/locale.alias",
         suite, str(tree), mirror],
        log,
    )  # fmt: skip
    _prepare(tree)
    progress("root filesystem (mke2fs -d) and qcow2")
    used = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
    size_mb = max(2048, int(used * 1.6) // (1 << 20) + 1024)
    _step("mke2fs", ["mke2fs", "-q", "-t", "ext4", "-L", "crv-root", "-d", str(tree),
                     str(work / "disk.raw"), f"{size_mb}M"], log)  # fmt: skip
    _step("qemu-img convert", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                               str(work / "disk.raw"), str(work / "disk.qcow2")], log)  # fmt: skip
    (work / "disk.raw").unlink()
    boot = tree / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    initrds = sorted(boot.glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageBuildError(
            f"kernel: no vmlinuz/initrd.img in the tree's /boot; see {failed_log}"
        )
    shutil.copyfile(kernels[-1], work / "vmlinuz")
    shutil.copyfile(initrds[-1], work / "initrd.img")
    if ramdisk:
        progress("PXE ramdisk (cpio.gz of the tree, /init runs the agent)")
        _ramdisk(tree, work / "ramdisk.cpio.gz", log, failed_log)
    files: dict[str, dict[str, Any]] = {}
    for role, name in (("disk", "disk.qcow2"), ("kernel", "vmlinuz"), ("initrd", "initrd.img"),
                       ("ramdisk", "ramdisk.cpio.gz")):  # fmt: skip
        path = work / name
        if path.exists():
            files[role] = {"path": name, "sha256": sha256_of(path), "size": path.stat().st_size}
    files["disk"]["format"] = "qcow2"
    manifest = {
        "format": 1,
        "key": key,
        "builder": BUILDER,
        "suite": suite,
        "mirror": mirror,
        "packages": packages,
        "cmdline": CMDLINE,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "files": files,
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"built in {manifest['build_seconds']} s")


def _prepare(tree: Path) -> None:
    """What a guest must not inherit from the build: a machine id, DHCP leases, apt lists."""
    (tree / "etc" / "machine-id").write_text("")  # systemd makes one at first boot
    for lease in (tree / "var" / "lib" / "dhcp").glob("*.lease*"):
        lease.unlink()  # a stale lease cost 16 s of DHCP
    shutil.rmtree(tree / "var" / "lib" / "apt" / "lists", ignore_errors=True)
    (tree / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    _quiet_services(tree)
    # secrets a package made at install time would be the same in every guest of the image
    for secret in (
        "etc/munge/munge.key",
        "etc/ssh/ssh_host_rsa_key",
        "etc/ssh/ssh_host_ed25519_key",
    ):
        (tree / secret).unlink(missing_ok=True)
    # the agent for the PXE ramdisk (cloud-init guests get theirs from the seed's user-data)
    agent = tree / "usr" / "local" / "bin" / "crv-agent"
    agent.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(AGENT, agent)
    agent.chmod(0o755)


def _quiet_services(tree: Path) -> list[str]:
    """Disable at boot the services of the appliances' packages (mariadb, apache2, munge...):
    Debian enables them on install, so every guest would start them with Debian's defaults,
    slower to boot (seen: 3 TCG guests 20 s later to cloud-init) and before the recipe has
    configured them. The recipes enable and start what they run. Kept: the units of the base
    packages and of Debian's required and important ones (systemd, networking, cloud-init)."""
    keep_priority = {"required", "important"}
    priority, package = {}, ""
    for line in (tree / "var/lib/dpkg/status").read_text(errors="replace").splitlines():
        if line.startswith("Package: "):
            package = line.split(": ", 1)[1].strip()
        elif line.startswith("Priority: "):
            priority[package] = line.split(": ", 1)[1].strip()
    owner = {}
    for listing in (tree / "var/lib/dpkg/info").glob("*.list"):
        pkg = listing.name[: -len(".list")].split(":")[0]
        for path in listing.read_text(errors="replace").splitlines():
            if "/systemd/system/" in path and not path.endswith("/"):
                owner.setdefault(path.rsplit("/", 1)[1], pkg)
    disabled = []
    for link in sorted((tree / "etc/systemd/system").glob("*.wants/*")):
        pkg = owner.get(link.name)
        if pkg is None or pkg in BASE_PACKAGES or priority.get(pkg) in keep_priority:
            continue
        link.unlink()
        disabled.append(link.name)
    return disabled


def _ramdisk(tree: Path, out: Path, log: Path, failed_log: Path) -> None:
    init = tree / "init"
    init.write_text(RAMDISK_INIT)
    init.chmod(0o755)
    names = log.parent / "ramdisk.files"
    try:
        with open(names, "wb") as listing:  # a file, not a pipe: cpio reads while we write
            subprocess.run(["find", ".", "-path", "./boot", "-prune", "-o", "-print0"],
                           cwd=tree, stdout=listing, check=True)  # fmt: skip
        with (
            open(names, "rb") as listing,
            open(log, "ab") as errors,
            open(out, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
        ):
            argv = ["cpio", "--null", "-o", "-H", "newc", "--quiet"]
            cpio = subprocess.Popen(
                argv, cwd=tree, stdin=listing, stdout=subprocess.PIPE, stderr=errors
            )
            assert cpio.stdout is not None
            while chunk := cpio.stdout.read(1 << 20):
                gz.write(chunk)
            if cpio.wait() != 0:
                raise ImageBuildError(f"ramdisk: cpio failed; see {failed_log}")
    finally:
        init.unlink()
        names.unlink(missing_ok=True)


_APT_ERRORS = (
    re.compile(r"Unable to locate package (\S+)"),
    re.compile(r"Package '?([^' ]+)'? has no installation candidate"),
    re.compile(r"Couldn't find any package by (?:glob|regex) '([^']+)'"),
    re.compile(r"(\S+) : Depends: .*but it is not (?:going to be installed|installable)"),
)


def _step(name: str, argv: list[str], log: Path) -> None:
    """Run one build step, its output appended to the build log; ImageBuildError in one line
    naming the step, and for apt failures the package."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise ImageBuildError(f"{name}: {argv[0]} is not installed") from None
    if done.returncode == 0:
        return
    text = log.read_text(errors="replace")
    for pattern in _APT_ERRORS:
        found = pattern.search(text)
        if found:
            raise ImageBuildError(f"{name}: package {found.group(1)}: {found.group(0).strip()}")
    last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
    raise ImageBuildError(f"{name} failed (exit {done.returncode}): {last[0].strip()[:200]}")
