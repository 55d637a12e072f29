"""The lab's own libvirtd: started inside the lab's namespace, with its files in the lab dir.

libvirtd (and the virtlogd that keeps its guests' console logs) run inside the lab's network
namespace, so the qemu processes they start are there too and their NICs join the lab's
bridge. Their directories (/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
/var/log/libvirt) are bind-mounted from the lab dir in a mount namespace of their own (the one
`ip netns exec` makes), so the lab's daemon shares nothing with a libvirtd of the host, two
crv homes each have their own lab, and `crv lab down` removes every file it wrote by removing
the lab dir. The host reaches it at `qemu:///system?socket=<lab dir>/libvirt/run/libvirt-sock`.

Its qemu.conf runs guests as root with no relabelling (dynamic_ownership 0): the images live in
CRV_HOME, which only root reads, and libvirt would otherwise chown them to libvirt-qemu.
Guests are emulated (TCG, domain type `qemu`): nested KVM crashed on the machines crv is tested
on (docs/lab.md); `kvm_works` probes it, and the lab uses KVM only when a guest boots with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lab.network import LabError, run

DIRS = {  # the host's path -> the lab dir's subdirectory bound over it
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
QEMU_CONF = """
# -- crv lab (lab/hypervisor.py): guests run as root, files are not relabelled --
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
"""
STORAGE_POOL = "crv-lab"
NETWORK = "crv-lab"


def root(lab_dir: Path) -> Path:
    return lab_dir / "libvirt"


def uri(lab_dir: Path) -> str:
    return f"qemu:///system?socket={root(lab_dir) / 'run' / 'libvirt-sock'}"


def start(netns: str, lab_dir: Path, timeout: float = 60.0) -> str:
    """virtlogd and libvirtd in `netns` over the lab's own directories; the URI to reach them."""
    base = root(lab_dir)
    for sub in DIRS.values():
        (base / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    etc = base / "etc"
    if not (etc / "qemu.conf").exists():  # the host's configuration, then ours on top
        shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True, symlinks=True)
        for autostart in etc.glob("qemu/networks/autostart/*"):
            autostart.unlink()  # not the host's "default" NAT network
        with open(etc / "qemu.conf", "a") as conf:
            conf.write(QEMU_CONF)
    script = "set -e\n"
    for host_path, sub in DIRS.items():
        script += f"mkdir -p {host_path} && mount --bind '{base / sub}' {host_path}\n"
    script += (
        f"virtlogd -d -p '{base / 'virtlogd.pid'}'\nexec libvirtd -d -p '{base / 'libvirtd.pid'}'\n"
    )
    run("sh", "-c", script, netns=netns)
    return wait_until_up(lab_dir, timeout)


def _quiet() -> Any:
    """libvirt, with its habit of printing every error to stderr turned off."""
    import libvirt  # type: ignore[import-untyped]

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def wait_until_up(lab_dir: Path, timeout: float) -> str:
    libvirt = _quiet()
    address, deadline, last = uri(lab_dir), time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            libvirt.open(address).close()
            return address
        except libvirt.libvirtError as exc:
            last = exc.get_error_message() or str(exc)
            time.sleep(0.2)
    raise LabError(f"the lab's libvirtd did not answer within {timeout:.0f} s: {last}")


def define_storage_and_network(lab_dir: Path) -> None:
    """A directory storage pool for the nodes' disks and seeds, and a libvirt network over the
    lab's bridge (forward mode bridge: libvirt adds nothing, the lab's dnsmasq serves DHCP)."""
    from lab.network import BRIDGE

    libvirt = _quiet()

    volumes = lab_dir / "volumes"
    volumes.mkdir(mode=0o700, exist_ok=True)
    conn = libvirt.open(uri(lab_dir))
    try:
        if STORAGE_POOL not in conn.listStoragePools() + conn.listDefinedStoragePools():
            pool = conn.storagePoolDefineXML(
                f"<pool type='dir'><name>{STORAGE_POOL}</name>"
                f"<target><path>{volumes}</path></target></pool>"
            )
            pool.setAutostart(1)
            pool.create()
        if NETWORK not in conn.listNetworks() + conn.listDefinedNetworks():
            network = conn.networkDefineXML(
                f"<network><name>{NETWORK}</name><forward mode='bridge'/>"
                f"<bridge name='{BRIDGE}'/></network>"
            )
            network.setAutostart(1)
            network.create()
    finally:
        conn.close()


def remove_domains(lab_dir: Path) -> list[str]:
    """Destroy and undefine every domain of the lab's libvirtd, delete every volume of its
    storage pool; the domains' names. Quiet when the daemon is gone."""
    libvirt = _quiet()

    try:
        conn = libvirt.open(uri(lab_dir))
    except libvirt.libvirtError:
        return []
    names = []
    try:
        for dom in conn.listAllDomains(0):
            names.append(dom.name())
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        for pool in conn.listAllStoragePools(0):
            if pool.isActive():
                pool.refresh(0)
                for volume in pool.listAllVolumes(0):
                    volume.delete(0)
    finally:
        conn.close()
    return names


def pids(lab_dir: Path) -> dict[str, int]:
    found = {}
    for name in ("libvirtd", "virtlogd"):
        try:
            found[name] = int((root(lab_dir) / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
    return found


def kvm_works(
    kernel: Path, initrd: Path, timeout: float = 30.0, accel: str = "kvm"
) -> tuple[bool, str]:
    """Whether a guest really boots with KVM here: the image's kernel under `-accel kvm`, with
    qemu's default CPU model (what a libvirt domain without a <cpu> element gets), must reach
    its initramfs ("Run /init as init process") within `timeout`. /dev/kvm alone proves
    nothing: nested KVM aborted or stopped with emulation failures on the machines crv is
    tested on. (True or False, and why, in one line.) No network device: nothing leaves."""
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    with tempfile.TemporaryDirectory(prefix="crv-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            "qemu-system-x86_64", "-accel", accel, "-m", "256", "-nodefaults", "-nic", "none",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{console}", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 break=top",
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while time.monotonic() - started < timeout:
                text = console.read_text(errors="replace") if console.exists() else ""
                if "Run /init as init process" in text:
                    took = time.monotonic() - started
                    return True, f"a {accel} guest reached its initramfs in {took:.1f} s"
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
                    return False, f"qemu with KVM stopped: {(err or ['no message'])[-1][:160]}"
                time.sleep(0.2)
            return False, f"a KVM guest did not reach its initramfs within {timeout:.0f} s"
        finally:
            proc.kill()
            proc.wait()
