"""`crv image build`: crv's own Debian 12 guest images, from Debian's mirror only.

An image is built by `mmdebstrap` (no root filesystem, kernel or cloud image is downloaded from
anywhere but the Debian mirror the host's apt uses) into a directory tree, and from that tree:

- `disk.qcow2`: an ext4 root filesystem made without mounting anything (`mke2fs -d`), converted
  to qcow2 with no backing file. It has no boot loader: the libvirt pool boots it with direct
  kernel boot (the kernel and initrd below, `cmdline` of the manifest);
- `vmlinuz`, `initrd.img`: the tree's Debian cloud kernel and its initramfs;
- `ramdisk.cpio.gz` (unless --no-ramdisk): the whole tree as an initramfs whose `/init` brings
  the network up by DHCP and execs the image's systemd, which runs `crv-agent run --cmdline
  /proc/cmdline` (a unit only the ramdisk has), for machines that PXE-boot (the role Ironic's
  IPA ramdisk plays): recipes that use systemctl work there as on a disk guest;
- `build.log`, everything the steps printed (mmdebstrap's apt and dpkg output included);
- `image.json`, the manifest (pools/images.py reads it), written last: every file with its
  SHA-256 and size, the packages, the suite and mirror, the builder version.

What a guest must not inherit from the build is taken out of the tree: the machine id (empty:
systemd makes one at first boot), DHCP leases, ssh host keys (cloud-init makes them), the
host's hostname and resolv.conf (mmdebstrap copies them in), apt's package lists and daily
timers (the lab has no mirror). Root has no password (`*`). Daemons that packages install are
enabled but never started during the build: mmdebstrap's policy-rc.d refuses (build.log shows
`invoke-rc.d: policy-rc.d denied execution of start`).

Images are cached by content: the key hashes the builder version, suite, mirror, the sorted
package list and (with the ramdisk) the agent's SHA-256 and the ramdisk's own files; the
image lives in `$CRV_HOME/images/<key[:16]>/`. A warm cache answers at once; a build goes to a
temporary directory renamed into place at the end under a lock, so a failed or killed build
never leaves a half image that looks whole.
"""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
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

BUILDER = "crv-image/4"  # part of the cache key: a change to what a build makes bumps it
SUITE = "bookworm"
# What every guest needs: systemd, python3 for the agent and recipes, cloud-init, the cloud
# kernel (virtio drivers), DHCP, the guest agent libvirt asks for addresses, CA certificates,
# kmod (the PXE ramdisk loads its NIC driver), openssl (recipes make keys and check certs).
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
    "kmod",
    "openssl",
)
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,99}$")  # Debian policy 5.6.1, at most 100 chars
# dpkg leaves these out of every package (dpkg's path-exclude globs have no {a,b})
DROPPED = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
KEPT = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")
MIRROR = re.compile(r"^(https?|file)://[^\s,]+$")
Progress = Callable[[str], None]

# /init of the PXE ramdisk: the tree is the root filesystem (in RAM). It brings up what the
# boot needs and hands over to the image's systemd, which starts the agent (RAMDISK_UNIT): the
# recipes can then use systemctl as on a disk guest (munge, slurmd...).
RAMDISK_INIT = r"""#!/bin/sh
# crv PXE ramdisk: drivers, network by DHCP, the machine's name, then the image's systemd as
# PID 1. systemd starts crv-agent-pxe.service (a unit only the ramdisk has): the agent with its
# bootstrap from the kernel command line (crv.service= crv.ca_sha256= crv.cluster= crv.node=
# crv.token=). Without systemd, the agent runs from here as before.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/lib/crv-agent
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
echo "crv ramdisk: kernel $(uname -r), loading drivers"
# drivers of the devices present; twice: virtio_pci's devices appear once it is loaded
for pass in 1 2; do
    cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u | xargs -r modprobe -qab 2>/dev/null
done
node=$(sed -n 's/.*crv\.node=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$node" ]; then
    hostname "$node"
    echo "$node" >/etc/hostname  # systemd sets the name from it
    printf '127.0.1.1\t%s\n' "$node" >>/etc/hosts
fi
ip link set lo up
up=""
for dev in /sys/class/net/*; do
    name=${dev##*/}
    [ "$name" = lo ] && continue
    ip link set "$name" up
    if dhclient -1 -4 "$name"; then up=$name; break; fi
done
echo "crv ramdisk: network: ${up:-no DHCP answer on any interface}"
ip -4 -o addr show scope global
grep -q 'crv\.token=' /proc/cmdline || echo "crv ramdisk: no crv.token= on the command line"
if [ -x /sbin/init ]; then
    echo "crv ramdisk: starting systemd (crv-agent-pxe.service runs the agent)"
    exec /sbin/init
fi
while true; do
    echo "crv ramdisk: starting crv-agent"
    python3 /usr/local/bin/crv-agent run --home /var/lib/crv-agent --cmdline /proc/cmdline
    echo "crv ramdisk: crv-agent exited ($?); again in 5 s"
    sleep 5
done
"""
# The agent of a PXE-booted machine, as the disk guests' crv-agent.service (pools/cloudinit.py)
# but: its bootstrap from the kernel command line; started as soon as systemd runs
# (DefaultDependencies=no: /init brought the network up, so it enrols while the rest of the boot
# goes on, which under TCG took 7-25 s; what its recipes start with systemctl waits for that
# boot as usual); started again whatever its exit; its output on the console too (the rack's
# serial logs); KillMode=process: an agent that starts again leaves the processes its recipes
# started (as when /init ran it), daemons or not.
RAMDISK_UNIT = """\
[Unit]
Description=crv agent of a PXE-booted machine (bootstrap from the kernel command line)
ConditionKernelCommandLine=crv.token
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
StartLimitIntervalSec=0

[Service]
Environment=CRV_AGENT_HOME=/var/lib/crv-agent PYTHONUNBUFFERED=1
ExecStartPre=/bin/echo "crv ramdisk: starting crv-agent"
ExecStart=/usr/bin/python3 /usr/local/bin/crv-agent run --home /var/lib/crv-agent \\
    --cmdline /proc/cmdline
ExecStopPost=/bin/sh -c 'echo "crv ramdisk: crv-agent exited ($$EXIT_STATUS)"'
Restart=always
RestartSec=5
KillMode=process
StandardOutput=journal+console
StandardError=journal+console
SyslogIdentifier=crv-agent

[Install]
WantedBy=multi-user.target
"""
# What only the ramdisk has (the disk image boots without any of it): path in the tree -> text.
RAMDISK_FILES = {
    "init": RAMDISK_INIT,
    "etc/systemd/system/crv-agent-pxe.service": RAMDISK_UNIT,
    # no datasource on a PXE boot: cloud-init's generator leaves it out
    "etc/cloud/cloud-init.disabled": "crv PXE ramdisk: the bootstrap is on the command line\n",
    # the root is RAM: a journal on "disk" is RAM as well
    "etc/systemd/journald.conf.d/crv-pxe.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n",
}  # fmt: skip
# path in the tree -> link target; /dev/null masks a unit
RAMDISK_LINKS = {
    "etc/systemd/system/multi-user.target.wants/crv-agent-pxe.service":
        "/etc/systemd/system/crv-agent-pxe.service",
    # the root is the initramfs: nothing to check or remount
    "etc/systemd/system/systemd-fsck-root.service": "/dev/null",
    "etc/systemd/system/systemd-remount-fs.service": "/dev/null",
    # a first boot every time (no machine id): no wizard waiting on the console
    "etc/systemd/system/systemd-firstboot.service": "/dev/null",
    # nobody logs in (root has no password): no getty on the console or a VT
    "etc/systemd/system/serial-getty@.service": "/dev/null",
    "etc/systemd/system/getty@.service": "/dev/null",
    "etc/systemd/system/getty-static.service": "/dev/null",
    # /init brought the NIC up with its kernel name: udev must not try to rename it
    "etc/systemd/network/99-default.link": "/dev/null",
}  # fmt: skip


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
    """The content key: builder version, suite, mirror, sorted packages and, when the ramdisk
    is built, the agent's SHA-256 and what only the ramdisk has (its /init, its units)."""
    agent = hashlib.sha256(AGENT.read_bytes()).hexdigest() if ramdisk else ""
    own = [RAMDISK_FILES, RAMDISK_LINKS] if ramdisk else []
    text = json.dumps(
        [BUILDER, suite, mirror.rstrip("/"), sorted(set(packages)), ramdisk, agent, *own],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def images_dir(home: Home) -> Path:
    return home.images_dir


def cached(home: Home) -> list[ImageManifest]:
    """The images in the cache, newest first (a directory without a readable manifest is a
    build in progress or a broken one, and not listed)."""
    found = []
    for manifest in home.images_dir.glob(f"*/{MANIFEST}"):
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
    packages_of([], wanted)  # a bad name is refused before anything is made
    mirror = (mirror or default_mirror()).rstrip("/")
    if not MIRROR.match(mirror):
        raise ImageBuildError(f"--mirror: {mirror!r} is not an http://, https:// or file:// URL")
    key = key_of(wanted, suite, mirror, ramdisk)
    root = home.images_dir
    target = root / key[:16]
    if (target / MANIFEST).is_file():  # a whole image: the manifest is written last
        progress(f"cached: {target}")
        return load(target)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive(root / f".{key[:16]}.lock"):
        for stale in root.glob(f".{key[:16]}-*"):  # a killed build's (we hold the lock)
            progress(f"removing a killed build's {stale.name}")
            remove_tree(stale)
        if (target / MANIFEST).is_file():  # built by whoever held the lock before us
            progress(f"cached: {target}")
            return load(target)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
        try:
            _build_into(work, wanted, suite, mirror, ramdisk, progress, key)
            os.replace(work, target)  # whole, or not there at all
        except BaseException as exc:
            failed = root / f"{key[:16]}-failed.log"  # kept: the error points here
            if (work / "build.log").exists():
                os.replace(work / "build.log", failed)
            remove_tree(work)
            if isinstance(exc, ImageBuildError):
                raise ImageBuildError(f"{exc} (log: {failed})") from None
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
    started = time.monotonic()

    def say(line: str) -> None:
        progress(f"[{time.monotonic() - started:5.1f} s] {line}")

    say(f"mmdebstrap {suite} from {mirror}: {len(packages)} packages")
    _mmdebstrap(tree, packages, suite, mirror, log, say)
    _prepare(tree)
    say("root filesystem (mke2fs -d) and qcow2")
    _disk(tree, work, log)
    _boot_files(tree, work)
    if ramdisk:
        say("PXE ramdisk (cpio.gz of the tree; /init, then systemd, runs the agent)")
        _ramdisk(tree, work / "ramdisk.cpio.gz", log)
    say("SHA-256 of the files, manifest")
    manifest = _manifest(work, key, suite, mirror, packages, ramdisk)
    say("removing the build tree")
    remove_tree(tree)
    manifest["build_seconds"] = round(time.monotonic() - started, 1)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"built in {manifest['build_seconds']} s")


def _mmdebstrap(
    tree: Path, packages: list[str], suite: str, mirror: str, log: Path, say: Progress
) -> None:
    argv = ["mmdebstrap", "--verbose", "--variant=minbase", f"--include={','.join(packages)}"]
    argv += [f"--dpkgopt=path-exclude={p}" for p in DROPPED]
    argv += [f"--dpkgopt=path-include={p}" for p in KEPT]
    argv += [suite, str(tree), mirror]

    def phase(line: str) -> None:  # mmdebstrap's own "I: downloading packages with apt..."
        if re.match(r"I: [a-z][^:]*\.\.\.$", line.rstrip()):
            say(f"mmdebstrap: {line[3:].strip()}")

    _step("mmdebstrap", argv, log, on_line=phase)


def _prepare(tree: Path) -> None:
    """What a guest must not inherit from the build (module docstring), and the agent."""
    etc = tree / "etc"
    (etc / "machine-id").write_text("")  # systemd makes one at first boot
    (tree / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)
    (etc / "hostname").write_text("localhost\n")  # cloud-init names the guest
    (etc / "resolv.conf").unlink(missing_ok=True)  # the host's; DHCP writes the guest's
    (etc / "resolv.conf").write_text("")
    for lease in (tree / "var" / "lib" / "dhcp").glob("*.lease*"):
        lease.unlink()  # a stale lease cost 16 s of DHCP
    # secrets a package made at install time would be the same in every guest of the image
    for host_key in (etc / "ssh").glob("ssh_host_*"):
        host_key.unlink()  # one per guest: cloud-init makes them
    (etc / "munge" / "munge.key").unlink(missing_ok=True)  # slurm's munge role makes one
    shadow = etc / "shadow"
    lines = shadow.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("root:"):
            fields = line.split(":")
            fields[1] = "*"  # no password: nobody logs in as root with one
            lines[i] = ":".join(fields)
    shadow.write_text("".join(lines))
    shutil.rmtree(tree / "var" / "lib" / "apt" / "lists", ignore_errors=True)
    (tree / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    for cache in (tree / "var" / "cache" / "apt").glob("*.bin"):
        cache.unlink()
    # apt-daily would hold dpkg's lock while failing to reach a mirror the lab does not have
    for timer in (etc / "systemd" / "system" / "timers.target.wants").glob("apt-daily*"):
        timer.unlink()
    _quiet_services(tree)
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
    priority: dict[str, str] = {}
    package = ""
    for line in (tree / "var/lib/dpkg/status").read_text(errors="replace").splitlines():
        if line.startswith("Package: "):
            package = line.split(": ", 1)[1].strip()
        elif line.startswith("Priority: "):
            priority[package] = line.split(": ", 1)[1].strip()
    owner: dict[str, str] = {}
    for listing in (tree / "var/lib/dpkg/info").glob("*.list"):
        pkg = listing.name[: -len(".list")].split(":")[0]
        for path in listing.read_text(errors="replace").splitlines():
            if "/systemd/system/" in path and not path.endswith("/"):
                owner.setdefault(path.rsplit("/", 1)[1], pkg)
    disabled = []
    for link in sorted((tree / "etc/systemd/system").glob("*.wants/*")):
        owner_pkg = owner.get(link.name)
        if owner_pkg in (None, *BASE_PACKAGES) or priority.get(owner_pkg or "") in keep_priority:
            continue
        link.unlink()
        disabled.append(link.name)
    return disabled


def _disk(tree: Path, work: Path, log: Path) -> None:
    """disk.qcow2: ext4 of the tree (mke2fs -d: nothing mounted), the tree's size + headroom."""
    used = sum(f.lstat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
    size_mb = max(2048, int(used * 1.3) // (1 << 20) + 1024)
    raw = work / "disk.raw"
    _step("mke2fs", ["mke2fs", "-q", "-t", "ext4", "-L", "crv-root", "-d", str(tree),
                     str(raw), f"{size_mb}M"], log)  # fmt: skip
    _step("qemu-img convert", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                               str(raw), str(work / "disk.qcow2")], log)  # fmt: skip
    raw.unlink()


def _boot_files(tree: Path, work: Path) -> None:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageBuildError("kernel: no vmlinuz/initrd.img in the tree's /boot")
    shutil.copyfile(kernels[-1], work / "vmlinuz")
    shutil.copyfile(initrds[-1], work / "initrd.img")


def _manifest(
    work: Path, key: str, suite: str, mirror: str, packages: list[str], ramdisk: bool
) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}
    for role, name in (("disk", "disk.qcow2"), ("kernel", "vmlinuz"), ("initrd", "initrd.img"),
                       ("ramdisk", "ramdisk.cpio.gz")):  # fmt: skip
        path = work / name
        if path.exists():
            files[role] = {"path": name, "sha256": sha256_of(path), "size": path.stat().st_size}
    files["disk"]["format"] = "qcow2"
    return {
        "format": 1,
        "key": key,
        "builder": BUILDER,
        "suite": suite,
        "mirror": mirror,
        "packages": packages,
        "cmdline": CMDLINE,
        "agent_sha256": hashlib.sha256(AGENT.read_bytes()).hexdigest() if ramdisk else None,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }


def _ramdisk(tree: Path, out: Path, log: Path) -> None:
    """The tree but /boot as a gzip'd newc cpio with RAMDISK_INIT as /init and the rest of
    RAMDISK_FILES and RAMDISK_LINKS, which are taken out of the tree again afterwards."""
    added = _add_ramdisk_files(tree)
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
            try:
                cpio = subprocess.Popen(
                    argv, cwd=tree, stdin=listing, stdout=subprocess.PIPE, stderr=errors
                )
            except FileNotFoundError:
                raise ImageBuildError("ramdisk: cpio is not installed (package cpio)") from None
            assert cpio.stdout is not None
            while chunk := cpio.stdout.read(1 << 20):
                gz.write(chunk)
            if cpio.wait() != 0:
                raise ImageBuildError("ramdisk: cpio failed")
    finally:
        for path in reversed(added):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        names.unlink(missing_ok=True)


def _add_ramdisk_files(tree: Path) -> list[Path]:
    """RAMDISK_FILES and RAMDISK_LINKS into the tree; what was added (directories first)."""
    added: list[Path] = []
    wanted: list[tuple[str, str | None, str | None]] = [
        (name, text, None) for name, text in RAMDISK_FILES.items()
    ]
    wanted += [(name, None, target) for name, target in RAMDISK_LINKS.items()]
    for name, text, target in wanted:
        path = tree / name
        missing = [p for p in path.parents if p != tree and p.is_relative_to(tree)]
        for parent in reversed(missing):
            if not parent.exists():
                parent.mkdir(mode=0o755)
                added.append(parent)
        if path.exists() or path.is_symlink():
            raise ImageBuildError(f"ramdisk: the tree already has /{name}")
        if target is not None:
            path.symlink_to(target)
        else:
            path.write_text(text or "")
            path.chmod(0o755 if name == "init" else 0o644)
        added.append(path)
    return added


# apt's and dpkg's words for a package it cannot install: (pattern, what the error line says)
_APT_ERRORS = (
    (re.compile(r"Unable to locate package (\S+)"), "package {0}: not at the mirror"),
    (re.compile(r"Package '?([^' ]+)'? has no installation candidate"),
     "package {0}: no installation candidate at the mirror"),
    (re.compile(r"Couldn't find any package by (?:glob|regex) '([^']+)'"),
     "package {0}: not at the mirror"),
    (re.compile(r"^ ?(\S+) : Depends: (.*) but it is not (?:going to be installed|installable)",
                re.M), "package {0}: unmet dependency {1}"),
    (re.compile(r"dpkg: error processing package (\S+) \(--configure\)"),
     "package {0}: its installation script failed"),
    (re.compile(r"Failed to fetch (\S+)[ \t]+(\S.*)"), "cannot fetch {0}: {1}"),
    (re.compile(r"Failed to fetch (\S+)()"), "cannot fetch {0} (the mirror?){1}"),
)  # fmt: skip


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when crv goes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _step(
    name: str, argv: list[str], log: Path, *, on_line: Callable[[str], None] | None = None
) -> None:
    """Run one build step, its output appended to the build log (and each line to `on_line`);
    ImageBuildError in one line naming the step, and for apt failures the package."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError:
            raise ImageBuildError(f"{name}: {argv[0]} is not installed") from None
        assert proc.stdout is not None
        with proc:
            for raw in proc.stdout:
                out.write(raw)
                if on_line is not None:
                    on_line(raw.decode(errors="replace"))
        code = proc.wait()
    if code != 0:
        raise ImageBuildError(_failure(name, code, log.read_text(errors="replace")))


def _failure(name: str, code: int, text: str) -> str:
    """One line for a failed step: the package apt named, else the step's last words."""
    text = text[text.rfind("\n$ ") :]  # this step's output only
    for pattern, says in _APT_ERRORS:
        found = pattern.search(text)
        if found:
            return f"{name}: " + says.format(*(g.strip()[:160] for g in found.groups()))
    last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
    return f"{name} failed (exit {code}): {last[0].strip()[:200]}"


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or under `path` (a killed mmdebstrap leaves /sys, /proc, /dev mounted
    in its tree), deepest first."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            point = line.split()[4].encode().decode("unicode_escape")  # \040 for a space
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mount (rmtree would follow a bind of the host's /sys):
    whatever is mounted below is detached first, and if that fails nothing is removed."""
    if not path.exists():
        return
    for point in _mounts_under(path):
        subprocess.run(["umount", "-R", "-l", point], capture_output=True)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError(f"{path}: still has mounts ({left[0]}); not removing it")
    shutil.rmtree(path, ignore_errors=True)
