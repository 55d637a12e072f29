"""`crv lab rack N`: a rack of machines that really network-boot, in the lab.

Each machine is a qemu VM with no disk and the iPXE firmware of Debian's `ipxe-qemu` on its
NIC, plugged (a tap device) into the lab's bridge, behind its own BMC: OpenIPMI's `ipmi_sim`
speaking IPMI 2.0 on a 127.0.0.x UDP port, so only the host reaches it, never a machine. The
BMC's chassis hook (pools/baremetal/simbmc.py, the simulated rack's) is what presses the power
button: power-on runs the machine's `power-on.sh` (qemu in the lab's namespace, booting from
the network when the BMC was told "next boot: PXE", else from its disk, which it has not: it
then boots nothing), power-off kills it.

The boot chain is the one a real site runs: the lab's dnsmasq, configured with the output of
`crv pxe dnsmasq-config --dhcp` for the `rack` pool, gives each machine its reserved address and
points iPXE at the boot service; the boot service (inside the lab's namespace) serves the
machine's script, the image's kernel and PXE ramdisk; the ramdisk runs crv-agent with
`--cmdline /proc/cmdline`.

What a site keeps for itself stays out of CRV_HOME: the BMCs' configuration and passwords (a
real BMC's flash, and the site's secret store) live in the hardware directory
`$CRV_LAB_HARDWARE/<namespace>/` (default /run/crv-lab), and the machines file refers to each
password as `{file: ...}` there. CRV_HOME holds the machines file, the pool entry, the boot
files the service serves and the dnsmasq configuration.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

import yaml

from crv.base.home import Home
from lab import network, poolfile
from lab.network import LabError, Net
from pools import images
from pools.baremetal import simbmc, simrack

POOL = "rack"
DESCRIPTION = "real PXE machines in the lab (crv lab rack)"
BOOT_PORT = 8067
USER = "crv"
MAX_MACHINES = 39  # addresses .11 to .49: below the lab's dynamic range (.50 on)
FIRST_HOST = 10


def hardware_dir(net: Net) -> Path:
    base = Path(os.environ.get("CRV_LAB_HARDWARE", "/run/crv-lab"))
    return base / net.netns


def rack_dir(home: Home) -> Path:
    return home.lab_dir / "rack"


def machine_name(i: int) -> str:
    return f"{POOL}-m{i:02d}"


def tap(i: int) -> str:
    return f"crvtap{i}"


def create(
    home: Home,
    lab: dict[str, Any],
    machines: int,
    *,
    image: Path,
    memory_mb: int = 1536,
    boot_timeout: float = 900.0,
    attempts: int = 3,
    phase_timeouts: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The rack of `machines` machines in the lab `lab` (control.state), every one powered
    off, its BMC answering; the `rack` pool in pools.yaml and the PXE boot in the lab's
    dnsmasq. A rack that was there is removed first. Returns what `crv lab rack` shows."""
    if not 1 <= machines <= MAX_MACHINES:
        raise LabError(f"a lab rack has 1 to {MAX_MACHINES} machines, not {machines}")
    manifest = images.load(image)
    if "ramdisk" not in manifest.files:
        raise LabError(f"image {image}: no PXE ramdisk (built with --no-ramdisk)")
    net = Net(int(lab["index"]))
    remove(home, lab)
    hw, root = hardware_dir(net), rack_dir(home)
    for sub in (hw / "secrets", hw / "machines", root / "files"):
        sub.mkdir(mode=0o700, parents=True, exist_ok=True)
    hw.chmod(0o700)
    # what the boot service serves: the image's kernel and ramdisk (links into the cache)
    (root / "files" / "vmlinuz").symlink_to(manifest.path("kernel"))
    (root / "files" / "ramdisk.cpio.gz").symlink_to(manifest.path("ramdisk"))
    accel = "kvm" if lab.get("domain_type") == "kvm" else "tcg"
    entries, specs = [], []
    try:
        for i in range(1, machines + 1):
            entry, spec = _machine(net, hw, i, memory_mb, accel)
            entries.append(entry)
            specs.append(spec)
        simrack.start_bmcs(hw, specs)  # bmcs.json there: remove() finds them
    except BaseException:
        remove(home, lab)
        raise
    header = "# the lab's rack, written by `crv lab rack`: as a site writes its own\n"
    text = header + yaml.safe_dump({"machines": entries}, sort_keys=False)
    (root / "machines.yaml").write_text(text)
    url = f"http://{net.gateway}:{BOOT_PORT}"
    options: dict[str, Any] = {
        "machines": str(root / "machines.yaml"),
        "kernel": f"{url}/files/vmlinuz",
        "initrd": f"{url}/files/ramdisk.cpio.gz",
        "cmdline": ["console=ttyS0"],
        "http_listen": f"{net.gateway}:{BOOT_PORT}",
        "http_netns": net.netns,
        "files": str(root / "files"),
        "service_address": net.gateway,
        "boot_timeout": boot_timeout,
        "attempts": attempts,
        "min_interval": 0.1,
        "power_window": 30.0,
    }
    if phase_timeouts:
        options["phase_timeouts"] = dict(phase_timeouts)
    _write_pool(home, options)
    _configure_dnsmasq(home, net)
    return describe(home, lab)


def _machine(
    net: Net, hw: Path, i: int, memory_mb: int, accel: str
) -> tuple[dict[str, Any], simbmc.SimBmcSpec]:
    """Machine `i`: its tap on the bridge, its power button and its BMC (configured, not
    started); its entry of the machines file."""
    name = machine_name(i)
    mac = f"52:54:00:77:{net.index:02x}:{i:02x}"
    ns = net.netns
    network.run("ip", "tuntap", "add", "dev", tap(i), "mode", "tap", netns=ns)
    network.run("ip", "link", "set", tap(i), "master", network.BRIDGE, "up", netns=ns)
    machine_dir = hw / "machines" / name
    machine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    qemu = [
        "qemu-system-x86_64", "-name", name, "-machine", "pc", "-accel", accel,
        "-m", str(memory_mb), "-smp", "1", "-display", "none", "-monitor", "none",
        "-serial", f"file:{machine_dir / 'serial.log'}",
        "-netdev", f"tap,id=nic0,ifname={tap(i)},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=nic0,mac={mac}",
    ]  # fmt: skip
    script = (
        "#!/bin/sh\n"
        f"# the power button of {name} (lab/rack.py), pressed by its BMC's chassis hook:\n"
        "# iPXE from the NIC when the BMC was told `next boot: PXE`, else the disk (it has none)\n"
        "boot=c\n"
        '[ "$CRV_RACK_BOOTDEV" = pxe ] && boot=n\n'
        f"exec ip netns exec {shlex.quote(ns)} {shlex.join(qemu)} -boot order=$boot,strict=on\n"
    )
    button = machine_dir / "power-on.sh"
    button.write_text(script)
    button.chmod(0o700)
    (machine_dir / "machine-command.json").write_text(json.dumps(["/bin/sh", str(button)]))
    bmc_address = f"127.0.0.{10 + (net.index * 7 + i) % 240}"
    password = secrets.token_urlsafe(12)  # 16 characters: ipmi_sim's limit is 16-20
    secret = hw / "secrets" / f"{name}.pass"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    port = simrack.free_udp_port(bmc_address)
    spec = simbmc.SimBmcSpec(name, bmc_address, port, USER, password, machine_dir)
    simbmc.write_config(spec)
    entry = {
        "name": name,
        "macs": [mac],
        "address": str(net.subnet.network_address + FIRST_HOST + i),
        "class": "std",
        "labels": {"rack": "lab"},
        "bmc": {
            "address": bmc_address,
            "port": port,
            "username": USER,
            "password": {"file": str(secret)},
            "cipher_suite": 3,  # ipmi_sim has no SHA-256 (suite 17)
        },
    }
    return entry, spec


def _write_pool(home: Home, options: dict[str, Any]) -> None:
    poolfile.put(
        home, POOL, {"driver": "baremetal", "description": DESCRIPTION, "options": options}
    )


def _configure_dnsmasq(home: Home, net: Net) -> None:
    """The lab's dnsmasq gets the rack's PXE boot from `crv pxe dnsmasq-config --dhcp`, as a
    site's dnsmasq would, and starts again with it."""
    from pools import get_pool
    from pools.baremetal.boot import dnsmasq_config

    pool = get_pool(POOL, home.pool_dir(POOL))
    text = dnsmasq_config(
        pool, network=str(net.subnet.network_address), interface=network.BRIDGE, dhcp=True
    )
    conf = home.lab_dir / "dnsmasq.d" / "rack.conf"
    conf.parent.mkdir(mode=0o700, exist_ok=True)
    conf.write_text(text)
    network.restart_dnsmasq(net, home.lab_dir)


def machine_dirs(net: Net) -> list[Path]:
    with suppress(FileNotFoundError):
        return sorted(p for p in (hardware_dir(net) / "machines").iterdir() if p.is_dir())
    return []


def describe(home: Home, lab: dict[str, Any]) -> dict[str, Any]:
    """The rack as `crv lab rack --json` shows it: each machine, its BMC and its power."""
    net = Net(int(lab["index"]))
    try:
        doc = yaml.safe_load((rack_dir(home) / "machines.yaml").read_text()) or {}
    except OSError:
        return {"pool": POOL, "machines": []}
    shown = []
    for entry in doc.get("machines", []):
        machine_dir = hardware_dir(net) / "machines" / entry["name"]
        shown.append(
            {
                "name": entry["name"],
                "mac": entry["macs"][0],
                "address": entry["address"],
                "bmc": f"{entry['bmc']['address']}:{entry['bmc']['port']}",
                "power": "on" if simbmc.machine_running(machine_dir) else "off",
                "serial_log": str(machine_dir / "serial.log"),
            }
        )
    return {
        "pool": POOL,
        "machines": shown,
        "boot_service": f"http://{net.gateway}:{BOOT_PORT}",
        "hardware": str(hardware_dir(net)),
    }


def remove(home: Home, lab: dict[str, Any]) -> int:
    """Power every machine off, stop the BMCs, take the taps off the bridge, drop the pool
    entry and the PXE boot from dnsmasq, and the files; the number of machines there were.
    Idempotent (also what `crv lab down` does first)."""
    net = Net(int(lab["index"]))
    hw = hardware_dir(net)
    dirs = machine_dirs(net)
    for machine_dir in dirs:
        with suppress(RuntimeError, OSError):
            simbmc.machine_off(machine_dir)
    try:
        bmcs = json.loads((hw / "bmcs.json").read_text())
    except (OSError, ValueError):
        bmcs = []
    simrack.stop_bmcs(bmcs)
    if net.netns in network.namespaces():
        links = network.run("ip", "-o", "link", "show", netns=net.netns, check=False)
        for i in range(1, MAX_MACHINES + 1):
            if f" {tap(i)}:" in links or f" {tap(i)}@" in links:
                network.run("ip", "link", "del", tap(i), netns=net.netns, check=False)
    conf = home.lab_dir / "dnsmasq.d" / "rack.conf"
    if conf.exists():
        conf.unlink()
        if net.netns in network.namespaces():
            network.restart_dnsmasq(net, home.lab_dir)
    poolfile.drop(home, POOL)
    shutil.rmtree(hw, ignore_errors=True)
    shutil.rmtree(rack_dir(home), ignore_errors=True)
    shutil.rmtree(home.pool_dir(POOL), ignore_errors=True)
    return len(dirs)
