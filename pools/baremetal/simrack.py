"""A simulated rack: N machines, each behind an `ipmi_sim` BMC speaking real IPMI 2.0, booting
through the bare-metal pool's boot service - for tests and for `crv baremetal simulate-rack`.

Everything lives in `<CRV_HOME>/racks/<pool>/`:

- `machines.yaml`, the inventory an admin would write (MACs, addresses, BMCs, classes);
- `secrets/<machine>.pass`, each BMC's own random password (0600; the machines file refers to
  it as `{file: ...}`, so it is never in pools.yaml or in a flow's parameters);
- `machines/<machine>/`, the machine: `machine.json` (what DHCP would tell it), its BMC's
  configuration and state (`bmc/`), its console log, and the OS it network-booted (`os/`);
- `tftp/` (the boot loader) and `files/` (kernel and initrd: the initrd holds crv-agent);
- `bmcs.json`, the ipmi_sim processes, so `--stop` (and `crv down`) can find them.

The pool entry goes into pools.yaml (driver `baremetal`). The BMCs answer on 127.0.0.x UDP
ports, the machines get addresses 127.1.R.N (the local pool uses 127.0.x.y), and ipmi_sim has no
SHA-256, so the rack's BMCs use cipher suite 3 (17 is the default for real BMCs).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import sys
import tarfile
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crv.base.errors import CrvError
from crv.base.home import Home
from crv.base.processes import start_ticks
from pools import AGENT
from pools.baremetal import simbmc
from pools.base import write_atomic

DESCRIPTION = "simulated rack (crv baremetal simulate-rack)"
USER = "crv"


class RackError(CrvError):
    pass


@dataclass(frozen=True)
class Rack:
    pool: str
    root: Path
    machines: list[dict[str, Any]]
    http_url: str

    def describe(self) -> list[str]:
        lines = [f"rack {self.pool}: {len(self.machines)} machines in {self.root}"]
        for m in self.machines:
            lines.append(
                f"  {m['name']}: class {m['class']}, address {m['address']}, "
                f"BMC {m['bmc']['address']}:{m['bmc']['port']} (IPMI 2.0, cipher suite 3)"
            )
        return lines


def rack_dir(home: Home, pool: str) -> Path:
    return home.root / "racks" / pool


def free_udp_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _initrd() -> bytes:
    """The simulated OS image: a tar archive holding the agent (simmachine.py unpacks it)."""
    data = AGENT.read_bytes()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        info = tarfile.TarInfo("crv-agent")
        info.size, info.mode = len(data), 0o755
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def create(
    home: Home,
    pool: str,
    *,
    machines: int,
    classes: Mapping[str, int] | None = None,
    boot_timeout: float = 60.0,
    attempts: int = 3,
) -> Rack:
    """Write the rack, start its BMCs (every machine powered off) and register the pool. A rack
    of the same name is stopped and replaced."""
    from pools import config

    home.ensure()
    pools_file = config.config_file(home.root)
    existing = config.load(pools_file).get(pool)
    if existing is not None and existing.description != DESCRIPTION:
        raise RackError(
            f"pool {pool} is configured in {existing.source} and is not a simulated rack"
        )
    classes = dict(classes or {})
    if sum(classes.values()) > machines:
        raise RackError(
            f"--class-of: {sum(classes.values())} machines of a class, {machines} in all"
        )
    stop(home, pool)
    root = rack_dir(home, pool)
    for sub in ("machines", "secrets", "tftp", "files"):
        (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    http_port, tftp_port = _free_tcp_port(), free_udp_port("127.0.0.1")
    http_url = f"http://127.0.0.1:{http_port}"
    write_atomic(root / "tftp" / "undionly.kpxe", b"simulated iPXE boot loader\n", 0o644)
    write_atomic(root / "files" / "vmlinuz", b"simulated kernel\n", 0o644)
    write_atomic(root / "files" / "initrd.img", _initrd(), 0o644)

    rack_byte = secrets.randbelow(250) + 2  # 127.1.R.N: two racks rarely share addresses
    kinds = [k for k, n in sorted(classes.items()) for _ in range(n)]
    kinds = ["std"] * (machines - len(kinds)) + kinds
    made = [
        _machine(root, pool, i, rack_byte, kinds[i - 1], http_url, tftp_port)
        for i in range(1, machines + 1)
    ]
    entries = [entry for entry, _ in made]
    doc = {"machines": entries}
    header = "# a simulated rack, written by `crv baremetal simulate-rack`\n"
    write_atomic(
        root / "machines.yaml", (header + yaml.safe_dump(doc, sort_keys=False)).encode(), 0o600
    )

    start_bmcs(root, [spec for _, spec in made])
    options = {
        "machines": str(root / "machines.yaml"),
        "kernel": f"{http_url}/files/vmlinuz",
        "initrd": f"{http_url}/files/initrd.img",
        "cmdline": ["console=ttyS0"],
        "http_listen": f"127.0.0.1:{http_port}",
        "tftp_listen": f"127.0.0.1:{tftp_port}",
        "tftp_root": str(root / "tftp"),
        "files": str(root / "files"),
        "boot_timeout": boot_timeout,
        "attempts": attempts,
        "min_interval": 0.05,
        "power_window": 10.0,
    }
    _register(pools_file, pool, options)
    return Rack(pool, root, entries, http_url)


def _machine(
    root: Path, pool: str, i: int, rack_byte: int, kind: str, http_url: str, tftp_port: int
) -> tuple[dict[str, Any], simbmc.SimBmcSpec]:
    """Machine `i` of the rack: its machines-file entry and its BMC, both written."""
    name = f"{pool}-m{i:02d}"
    bmc_address = f"127.0.0.{10 + (rack_byte * 7 + i) % 240}"
    # 16 characters: ipmi_sim 2.0.33 refuses a 20-byte password that it was configured with
    password = secrets.token_urlsafe(12)
    write_atomic(root / "secrets" / f"{name}.pass", password.encode() + b"\n", 0o600)
    mac = f"52:54:00:{rack_byte:02x}:{i // 256:02x}:{i % 256:02x}"
    entry: dict[str, Any] = {
        "name": name,
        "macs": [mac],
        "address": f"127.1.{rack_byte}.{i}",
        "class": kind,
        "labels": {"rack": pool},
        "bmc": {
            "address": bmc_address,
            "port": free_udp_port(bmc_address),
            "username": USER,
            "password": {"file": f"secrets/{name}.pass"},
            "cipher_suite": 3,
        },
    }
    machine_dir = root / "machines" / name
    machine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    dhcp = {
        "name": name,
        "macs": [mac],
        "address": entry["address"],
        "tftp": f"127.0.0.1:{tftp_port}",
        "boot_file": "undionly.kpxe",
        "ipxe_url": f"{http_url}/ipxe/${{mac:hexhyp}}",
    }
    write_atomic(machine_dir / "machine.json", json.dumps(dhcp, indent=1).encode(), 0o644)
    command = [sys.executable, "-m", "pools.baremetal.simmachine", "--machine-dir"]
    command.append(str(machine_dir))
    write_atomic(machine_dir / "machine-command.json", json.dumps(command).encode(), 0o644)
    spec = simbmc.SimBmcSpec(name, bmc_address, entry["bmc"]["port"], USER, password, machine_dir)
    simbmc.write_config(spec)
    return entry, spec


def start_bmcs(root: Path, specs: list[simbmc.SimBmcSpec]) -> None:
    """Start every BMC, recorded in bmcs.json; if one fails, stop those started."""
    started: list[dict[str, Any]] = []
    try:
        for spec in specs:
            proc = simbmc.start(spec)
            started.append(
                {"machine": spec.machine, "pid": proc.pid, "start": start_ticks(proc.pid)}
            )
    except RuntimeError as exc:
        stop_bmcs(started)
        raise RackError(str(exc)) from None
    finally:
        write_atomic(root / "bmcs.json", json.dumps(started).encode(), 0o600)


def _register(pools_file: Path, pool: str, options: dict[str, Any]) -> None:
    try:
        doc = yaml.safe_load(pools_file.read_text()) or {}
    except FileNotFoundError:
        doc = {}
    doc.setdefault("pools", {})[pool] = {
        "driver": "baremetal",
        "description": DESCRIPTION,
        "options": options,
    }
    pools_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(pools_file, yaml.safe_dump(doc, sort_keys=False).encode(), 0o600)


def stop_bmcs(bmcs: list[dict[str, Any]]) -> int:
    stopped = 0
    for entry in bmcs:
        pid = entry.get("pid")
        if isinstance(pid, int) and start_ticks(pid) == entry.get("start"):
            with suppress(ProcessLookupError):
                os.kill(pid, 15)
            stopped += 1
    for entry in bmcs:
        pid = entry.get("pid")
        if isinstance(pid, int):
            with suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
    return stopped


def stop(home: Home, pool: str) -> int:
    """Stop the rack's BMCs and power off every machine (kill its process tree); the number of
    BMCs stopped. The files stay (the next `create` rewrites them)."""
    root = rack_dir(home, pool)
    try:
        bmcs = json.loads((root / "bmcs.json").read_text())
    except (OSError, ValueError):
        bmcs = []
    stopped = stop_bmcs(bmcs)
    with suppress(FileNotFoundError):
        for machine_dir in sorted((root / "machines").iterdir()):
            simbmc.machine_off(machine_dir)
    (root / "bmcs.json").unlink(missing_ok=True)
    return stopped


def stop_all(home: Home) -> list[str]:
    """Every simulated rack of this home (for `crv down`)."""
    racks = []
    with suppress(FileNotFoundError):
        for entry in sorted((home.root / "racks").iterdir()):
            if (entry / "bmcs.json").exists():
                stop(home, entry.name)
                racks.append(f"simulated rack {entry.name}")
    return racks
