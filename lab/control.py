"""`crv lab up` / `crv lab down`: the lab for real machines, as one unit.

Up makes, in order: the network (lab/network.py: namespace, bridge, veth and route, firewall,
dnsmasq), the lab's libvirtd (lab/hypervisor.py) with a storage pool and a network over the
bridge, and the `lab` pool in pools.yaml (driver libvirt, the image crv built, the service
address inside the lab). It records all of it in `$CRV_HOME/lab/lab.json`. The crv service
listens inside the lab too (crv_cli.daemons reads `service_listeners`), so the caller restarts
it after up and after down.

Down removes the lab's domains and volumes, its daemons, the namespace (bridge, veth and route
with it), the pool entry and the lab dir: nothing is left (tests/test_vm_lab.py checks it).
Both are idempotent; an up that fails half-way removes what it made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from crv.base.home import Home
from crv.base.netns import netns_path
from lab import hypervisor, network, poolfile, rack
from lab.network import LabError, Net
from pools import LAB_POOL

POOL = LAB_POOL
STATE = "lab.json"


def state_file(home: Home) -> Path:
    return home.lab_dir / STATE


def state(home: Home) -> dict[str, Any] | None:
    """What `up` recorded, None when there is no lab (or its record is unreadable)."""
    import json

    try:
        data = json.loads(state_file(home).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def alive(data: dict[str, Any]) -> bool:
    """The namespace exists and the lab's libvirtd and dnsmasq still run."""
    if data.get("netns") not in network.namespaces():
        return False
    lab_dir = Path(data["dir"])
    pids = hypervisor.pids(lab_dir)
    try:
        pids["dnsmasq"] = int((lab_dir / "dnsmasq.pid").read_text().strip())
    except (OSError, ValueError):
        return False
    return all(_running(pids.get(name)) for name in ("libvirtd", "virtlogd", "dnsmasq"))


def _running(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def service_listeners(home: Home) -> list[tuple[str, str]]:
    """(namespace, address) where the crv service must also listen: the lab's, when it is up."""
    data = state(home)
    if data is None or not netns_path(str(data.get("netns", ""))).exists():
        return []
    return [(str(data["netns"]), str(data["gateway"]))]


def up(
    home: Home, image: Path | None, *, memory_mb: int = 768, max_nodes: int = 4
) -> dict[str, Any]:
    """The lab of `home`, made if it is not there (or broken: then remade). `image`: the
    manifest (image.json) of the image its pool boots, None to keep the pool's."""
    _check_can()
    home.ensure()
    existing = state(home)
    if existing is not None:
        if alive(existing):
            if image is not None:
                _write_pool(home, existing, image, memory_mb, max_nodes)
            return existing
        if image is None:  # remade: with the image its pool had
            before = (poolfile.entry(home, POOL) or {}).get("options", {})
            image = Path(before["image"]) if before.get("image") else None
        down(home)
    lab_dir = home.lab_dir
    lab_dir.mkdir(mode=0o700, exist_ok=True)
    kvm = _kvm(home, image)
    net = network.free_index()
    network.create(net, lab_dir)
    try:
        libvirt_uri = hypervisor.start(net.netns, lab_dir)
        hypervisor.define_storage_and_network(lab_dir)
        data: dict[str, Any] = {
            **net.describe(),
            "dir": str(lab_dir),
            "uri": libvirt_uri,
            "pool": POOL,
            "storage_pool": hypervisor.STORAGE_POOL,
            "network": hypervisor.NETWORK,
            "domain_type": "kvm" if kvm[0] else "qemu",
            "kvm": kvm[1],
        }
        network.save(state_file(home), data)
        _write_pool(home, data, image, memory_mb, max_nodes)
    except BaseException:
        down(home)
        raise
    return data


def down(home: Home) -> dict[str, Any]:
    """Remove the lab of `home` and everything it made; what was removed."""
    data = state(home) or {}
    lab_dir = home.lab_dir
    removed: dict[str, Any] = {"domains": [], "netns": None}
    if "index" in data:
        removed["rack"] = rack.remove(home, data)  # its BMCs live outside the namespace
    if lab_dir.is_dir():
        removed["domains"] = hypervisor.remove_domains(lab_dir)
    if "index" in data:
        net = Net(int(data["index"]))
        removed["netns"] = net.netns
        network.remove(net, lab_dir)  # kills libvirtd, virtlogd, qemu and dnsmasq with it
    _remove_pool(home)
    shutil.rmtree(lab_dir, ignore_errors=True)
    shutil.rmtree(home.pool_dir(POOL), ignore_errors=True)  # the pool's locks and consoles
    return removed


def pool_image(home: Home) -> Path | None:
    """The manifest the lab pool boots (pools.yaml), None when there is no lab pool."""
    image = ((poolfile.entry(home, POOL) or {}).get("options") or {}).get("image")
    return Path(image) if image else None


def _kvm(home: Home, image: Path | None) -> tuple[bool, str]:
    """Whether the lab's guests may use KVM: a probe guest must really boot with it (the
    image's kernel to its initramfs; lab/hypervisor.py). The answer is kept per host kernel and
    guest kernel in $CRV_HOME/kvm-probe.json: a failed probe costs 30 s, once."""
    import json
    import platform

    if image is None:
        return False, "no image to probe KVM with: TCG"
    from pools import images

    manifest = images.load(image)
    key = f"{platform.release()} {manifest.files['kernel'].sha256}"
    record = home.root / "kvm-probe.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        works, why = hypervisor.kvm_works(manifest.path("kernel"), manifest.path("initrd"))
        known[key] = [works, why]
        record.write_text(json.dumps(known, indent=1) + "\n")
    works, why = known[key]
    return bool(works), str(why)


def _check_can() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, a bridge, libvirtd)")
    missing = network.missing_tools()
    if missing:
        raise LabError(f"the lab needs these Debian packages: {' '.join(missing)}")


# -- the lab pool in pools.yaml ------------------------------------------------------------------


def _write_pool(
    home: Home, data: dict[str, Any], image: Path | None, memory_mb: int, max_nodes: int
) -> None:
    before = (poolfile.entry(home, POOL) or {}).get("options", {})
    image_path = str(image.resolve()) if image is not None else before.get("image")
    if not image_path:
        raise LabError("no image for the lab pool: build one (crv image build) and pass --image")
    options = {
        "uri": data["uri"],
        "image": image_path,
        "storage_pool": data["storage_pool"],
        "network": data["network"],
        "domain_type": data.get("domain_type", "qemu"),
        "memory_mb": memory_mb,
        "vcpus": 1,
        "service_address": data["gateway"],
        "console_log": True,
        "max_nodes": max_nodes,
    }
    poolfile.put(
        home,
        POOL,
        {
            "driver": "libvirt",
            "description": f"real qemu guests in the lab (namespace {data['netns']})",
            "options": options,
        },
    )


def _remove_pool(home: Home) -> None:
    poolfile.drop(home, POOL)
