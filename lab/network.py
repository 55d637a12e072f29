"""The lab's network: one network namespace with a bridge, DHCP and a guarded way in.

    host namespace                         lab namespace (crvlab-N)
    ---------------------                  ------------------------------------------------
    crvlabN 10.78.N.1/30  <--veth-->  uplink 10.78.N.2/30
    route 10.77.N.0/24 via 10.78.N.2       crvbr0 10.77.N.1/24 (bridge: the guests' NICs)
                                           dnsmasq: DHCP on crvbr0 (no DNS), router 10.77.N.1
                                           the crv service's lab listener on 10.77.N.1

The host sends traffic into the lab (the flows' verify checks, the CLI reaching a guest) and
gets the answers; a guest reaches only addresses of the namespace (the service listener, DHCP):
the namespace has no default route, and its firewall forwards from the bridge to the uplink
only packets of connections the host opened (conntrack ESTABLISHED/RELATED). Nothing is routed
anywhere else. N (1..250) is the first index no other lab and no host route uses, so several
crv homes (parallel tests) each have a lab of their own.

Everything is done with iproute2, iptables (nf_tables) and dnsmasq, the tools a site would use.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from crv.base.errors import CrvError

BRIDGE = "crvbr0"  # inside the namespace, so the same name in every lab
UPLINK = "uplink"  # the namespace's end of the veth
MAX_INDEX = 250


class LabError(CrvError):
    """The lab cannot be made or used: one line saying what and why."""


@dataclass(frozen=True)
class Net:
    """The addresses of lab number `index`."""

    index: int

    @property
    def netns(self) -> str:
        return f"crvlab-{self.index}"

    @property
    def veth(self) -> str:  # the host's end; at most 15 characters
        return f"crvlab{self.index}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.77.{self.index}.0/24")

    @property
    def gateway(self) -> str:
        """The bridge's address: DHCP, the router the guests are told of, the service."""
        return f"10.77.{self.index}.1"

    @property
    def host_end(self) -> str:
        return f"10.78.{self.index}.1"

    @property
    def lab_end(self) -> str:
        return f"10.78.{self.index}.2"

    def describe(self) -> dict[str, object]:
        return {
            **asdict(self),
            "netns": self.netns,
            "bridge": BRIDGE,
            "veth": self.veth,
            "subnet": str(self.subnet),
            "gateway": self.gateway,
            "host_end": self.host_end,
            "lab_end": self.lab_end,
        }


def run(*argv: str, netns: str | None = None, check: bool = True) -> str:
    """Run a command (inside `netns` if given); its stdout. A failure is a LabError naming the
    command and quoting its last line of stderr."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    done = subprocess.run(full, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise LabError(f"{' '.join(argv)}: {last}")
    return done.stdout


def namespaces() -> set[str]:
    return {line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()}


def free_index() -> Net:
    """The first lab number whose namespace, host interface and addresses nobody uses."""
    taken_ns = namespaces()
    routes = run("ip", "-4", "route", "show") + run("ip", "-4", "-o", "addr", "show")
    links = run("ip", "-o", "link", "show")
    for index in range(1, MAX_INDEX + 1):
        net = Net(index)
        if net.netns in taken_ns or f" {net.veth}@" in links or f" {net.veth}:" in links:
            continue
        if f"10.77.{index}." in routes or f"10.78.{index}." in routes:
            continue
        return net
    raise LabError(f"no free lab number in 1..{MAX_INDEX} (10.77.N.0/24 all in use)")


def create(net: Net, lab_dir: Path) -> None:
    """The namespace, the bridge, the veth and route, the firewall, and dnsmasq. A failure
    half-way removes what was made (`remove`) before the error goes up."""
    ns = net.netns
    lab_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0")
        run("ip", "-n", ns, "addr", "add", f"{net.gateway}/24", "dev", BRIDGE)
        run("ip", "-n", ns, "link", "set", BRIDGE, "up")
        run("ip", "link", "add", net.veth, "type", "veth", "peer", "name", UPLINK, "netns", ns)
        run("ip", "addr", "add", f"{net.host_end}/30", "dev", net.veth)
        run("ip", "link", "set", net.veth, "up")
        run("ip", "-n", ns, "addr", "add", f"{net.lab_end}/30", "dev", UPLINK)
        run("ip", "-n", ns, "link", "set", UPLINK, "up")
        run("ip", "route", "add", str(net.subnet), "via", net.lab_end, "dev", net.veth)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=ns)  # the namespace's own
        _firewall(ns)
        start_dnsmasq(net, lab_dir)
    except BaseException:
        remove(net, lab_dir)
        raise


def _firewall(ns: str) -> None:
    """Forward host -> guests, and guests -> host only as answers; nothing else crosses."""
    rules = [
        ["-P", "FORWARD", "DROP"],
        ["-A", "FORWARD", "-i", UPLINK, "-o", BRIDGE, "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"],
        [
            "-A", "FORWARD", "-i", BRIDGE, "-o", UPLINK,
            "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT",
        ],
    ]  # fmt: skip
    for rule in rules:
        run("iptables", *rule, netns=ns)


def start_dnsmasq(net: Net, lab_dir: Path) -> None:
    """DHCP for the guests on the bridge: no DNS (port 0), leases and log in the lab dir; and
    whatever `dnsmasq.d/*.conf` adds (the rack's PXE boot, from `crv pxe dnsmasq-config`)."""
    conf_dir = lab_dir / "dnsmasq.d"
    conf_dir.mkdir(mode=0o700, exist_ok=True)
    first = net.subnet.network_address + 50
    last = net.subnet.network_address + 250
    run(
        "dnsmasq",
        "--conf-file=/dev/null",  # none of the host's dnsmasq configuration
        f"--interface={BRIDGE}",
        "--bind-interfaces",
        "--except-interface=lo",
        "--port=0",
        f"--dhcp-range={first},{last},255.255.255.0,12h",
        f"--dhcp-option=option:router,{net.gateway}",
        "--dhcp-authoritative",
        f"--dhcp-leasefile={lab_dir / 'dnsmasq.leases'}",
        f"--pid-file={lab_dir / 'dnsmasq.pid'}",
        f"--log-facility={lab_dir / 'dnsmasq.log'}",
        "--log-dhcp",
        f"--conf-dir={conf_dir},*.conf",
        netns=net.netns,
    )


def restart_dnsmasq(net: Net, lab_dir: Path) -> None:
    """Stop the lab's dnsmasq and start it again (its configuration changed; the leases stay
    in their file)."""
    pid_file = lab_dir / "dnsmasq.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # ProcessLookupError (an OSError) once it is gone
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    start_dnsmasq(net, lab_dir)


def remove(net: Net, lab_dir: Path) -> None:
    """Whatever of the lab's network exists: processes in the namespace (dnsmasq, qemu, the
    lab's libvirtd) are killed, then the namespace (its bridge and the veth go with it) and
    the host route. Idempotent."""
    ns = net.netns
    if ns in namespaces():
        kill_namespace_processes(ns)
        run("ip", "netns", "del", ns, check=False)
    run("ip", "link", "del", net.veth, check=False)  # gone with the namespace, normally
    run("ip", "route", "del", str(net.subnet), check=False)
    for name in ("dnsmasq.pid", "dnsmasq.leases"):
        (lab_dir / name).unlink(missing_ok=True)


def kill_namespace_processes(ns: str) -> None:
    """SIGTERM every process of the namespace, SIGKILL what is left after 10 s."""

    def pids() -> list[int]:
        out = run("ip", "netns", "pids", ns, check=False)
        return [int(p) for p in out.split() if p.isdigit()]

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)


def leases(lab_dir: Path) -> dict[str, str]:
    """MAC -> IPv4 address of the guests dnsmasq handed a lease to."""
    try:
        text = (lab_dir / "dnsmasq.leases").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            found[parts[1].lower()] = parts[2]
    return found


def missing_tools() -> list[str]:
    """The Debian packages that provide the lab's commands and are not installed."""
    wanted = {
        "ip": "iproute2",
        "iptables": "iptables",
        "dnsmasq": "dnsmasq-base",
        "libvirtd": "libvirt-daemon-system",
        "virtlogd": "libvirt-daemon-system",
        "qemu-system-x86_64": "qemu-system-x86",
        "qemu-img": "qemu-utils",
    }
    missing = {pkg for cmd, pkg in wanted.items() if shutil.which(cmd) is None}
    if not Path("/usr/lib/ipxe/qemu").is_dir():
        missing.add("ipxe-qemu")
    return sorted(missing)


def save(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
