"""The bare-metal pool: a node is a leased machine, powered through its BMC and network-booted.

`create_node` leases a free machine of the group's class, writes its iPXE script (the one-time
token goes there and nowhere else) and boots it from the network (power off, next boot PXE,
power on: `Power.pxe_boot`); it returns `pending` at once, like every pool. The node has
booted when its agent enrols; the agent then calls the boot service back, which deletes the
script.

`tend` (an optional method of the pool contract, called by the deploy flow while it waits for a
node to enrol) notices a machine that has not called back within `boot_timeout`: it powers the
machine off, writes it off as failed in the ledger and boots the node on another machine, up to
`attempts` machines. The token is still unspent then (nothing enrolled with it), so the new
machine gets the same bootstrap.

`destroy_node` powers the machine off and returns it to the free set; bare metal is released,
never destroyed. A power command that fails leaves the lease in place (the machine may be on),
so a retry, `crv destroy` or `crv repair` can finish the job: no machine is ever powered on
without a lease or a failure record that says so.
"""

from __future__ import annotations

import collections
import os
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from crv.appliance.spec import Name
from crv.base.errors import SpecError
from pools.baremetal import boot, inventory
from pools.baremetal.inventory import Lease, Leases, Ledger, Machine
from pools.baremetal.ipmi import Bmc, Power
from pools.base import TAG_CLUSTER, TAG_NODE, NodeInfo, NodeSpec, PoolError
from pools.credentials import check, resolve


class GroupMachines(BaseModel):
    """Which machines a node group may get: a hardware class and labels they must carry."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    machine_class: Name | None = Field(default=None, alias="class")
    labels: dict[str, str] = Field(default_factory=dict)


class BaremetalOptions(BaseModel):
    """The options of a bare-metal pool (its entry in pools.yaml); `docs/pools.md` has an example.

    - `machines`: the machines file (relative paths: to the directory of pools.yaml).
    - `kernel`, `initrd`: URLs the iPXE script loads the OS from; `cmdline`: more kernel words.
    - `http_listen`: where the boot service listens (HOST:PORT); `http_url`: how machines reach
      it (default `http://<http_listen>`).
    - `tftp_listen`, `tftp_root`: the TFTP server for the boot loaders (leave out when the
      site's dnsmasq serves them); `boot_file`, `efi_boot_file`: their names.
    - `files`: a directory the boot service serves under `/files/` (kernel and initrd, if crv
      should serve them).
    - `class`, `groups`: the class (and labels) of machine each node group gets.
    - `boot_timeout`: seconds from power-on to the call-back before a machine is written off;
      `attempts`: machines tried per node; `phase_timeouts`: earlier deadlines for the phases
      the boot service sees (`script`, `kernel`, `initrd`: seconds from power-on), so a
      machine whose firmware never asks for its script is written off sooner.
    - `service_address`: the address machines dial the crv service at (its port stays), when
      it is not the one in the service URL (the lab's bridge address); `http_netns`: the
      network namespace the boot service listens in (the lab's).
    - `min_interval`, `power_window`: seconds between commands to one BMC; how long a failing
      BMC command is retried.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    machines: str = Field(min_length=1, max_length=4096)
    kernel: str = Field(min_length=1, max_length=1024)
    initrd: str = Field(min_length=1, max_length=1024)
    cmdline: list[str] = Field(default_factory=list, max_length=64)
    http_listen: str = "0.0.0.0:8067"
    http_url: str | None = None
    tftp_listen: str | None = None
    tftp_root: str | None = None
    boot_file: str = "undionly.kpxe"
    efi_boot_file: str = "ipxe.efi"
    files: str | None = None
    default_class: Name | None = Field(default=None, alias="class")
    groups: dict[str, GroupMachines] = Field(default_factory=dict)
    boot_timeout: float = Field(default=600.0, gt=0, le=24 * 3600)
    attempts: int = Field(default=3, ge=1, le=100)
    min_interval: float = Field(default=0.5, ge=0, le=60)
    power_window: float = Field(default=60.0, gt=0, le=3600)
    phase_timeouts: dict[Literal["script", "kernel", "initrd"], float] = Field(default_factory=dict)
    service_address: str | None = Field(default=None, max_length=253)
    http_netns: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @field_validator("phase_timeouts")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for phase, seconds in value.items():
            if not 0 < seconds <= 24 * 3600:
                raise ValueError(f"{phase}: seconds must be above 0 and at most a day")
        return value

    @field_validator("kernel", "initrd", "http_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://", "tftp://")):
            raise ValueError("must be an http://, https:// or tftp:// URL")
        return value


class BaremetalPool:
    def __init__(self, name: str, state_dir: Path, options: BaremetalOptions) -> None:
        from pools import config

        self.name = name
        self.state_dir = Path(os.path.abspath(state_dir))
        self.options = options
        self.base = config.config_file(self.state_dir.parent.parent).parent
        self.leases = Leases(self.state_dir)
        self.files = boot.BootFiles(self.state_dir)
        self.power = Power(name, min_interval=options.min_interval, window=options.power_window)
        self._machines: tuple[float, dict[str, Machine]] | None = None
        self._counted: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    # -- configuration -------------------------------------------------------------------

    @property
    def service_address(self) -> str | None:
        """Where this pool's machines dial the crv service (crv.engine.stages)."""
        return self.options.service_address

    def _path(self, value: str) -> Path:
        return Path(value) if os.path.isabs(value) else self.base / value

    @property
    def http_url(self) -> str:
        if self.options.http_url:
            return self.options.http_url.rstrip("/")
        host, port = boot.split_listen(self.name, self.options.http_listen)
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"

    def machines(self) -> dict[str, Machine]:
        """The machines file, read again when it changed (an admin adds a machine)."""
        path = self._path(self.options.machines)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            raise PoolError(self.name, f"machines file {path} not found") from None
        with self._lock:
            if self._machines is None or self._machines[0] != mtime:
                try:
                    self._machines = (mtime, inventory.load(path))
                except SpecError as exc:
                    raise PoolError(self.name, str(exc)) from None
            return self._machines[1]

    def validate(self) -> None:
        boot.split_listen(self.name, self.options.http_listen)
        if self.options.tftp_listen:
            boot.split_listen(self.name, self.options.tftp_listen)
            if not self.options.tftp_root:
                raise PoolError(self.name, "option tftp_listen needs tftp_root")
        for option in ("tftp_root", "files"):
            value = getattr(self.options, option)
            if value and not self._path(value).is_dir():
                raise PoolError(self.name, f"option {option}: {self._path(value)} is not a dir")
        for group, wanted in self.options.groups.items():
            if not wanted.machine_class and not wanted.labels:
                raise PoolError(self.name, f"option groups.{group}: give a class or labels")
        self.machines()
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PoolError(self.name, f"state directory {self.state_dir}: {exc}") from None

    def check_credentials(self, machine: Machine) -> None:
        check(machine.bmc.password, self.name, f"machines.{machine.name}.bmc.password")

    def bmc(self, machine: Machine) -> Bmc:
        """The BMC with its password read now (never kept in the pool's state)."""
        option = f"machines.{machine.name}.bmc.password"
        password = resolve(machine.bmc.password, self.name, option)
        b = machine.bmc
        return Bmc(b.address, b.port, b.username, password, b.cipher_suite)

    # -- the contract ----------------------------------------------------------------------

    def list_nodes(self, cluster: str | None = None) -> list[NodeInfo]:
        """Every lease; a node whose machine booted is `running` only if its BMC says the
        power is on (asked in parallel, one BMC each), `stopped` if it is off."""
        ledger = self.leases.read()
        machines = self.machines()
        infos = [
            self._info(lease, machines)
            for lease in ledger.leases.values()
            if cluster is None or lease.cluster == cluster
        ]
        if len(infos) < 2:
            return [self._confirmed(info, machines) for info in infos]
        with ThreadPoolExecutor(min(16, len(infos))) as pool:
            return list(pool.map(lambda info: self._confirmed(info, machines), infos))

    def capacity(self, group: str | None = None) -> int:
        """Optional capability: the machines free now (neither leased nor failed); with
        `group`, only those of the group's class and labels (the ones it could get)."""
        ledger = self.leases.read()
        machines = self.machines()
        if group is not None:
            machine_class, labels = self._wanted(group)
            fits = [n for n, m in machines.items() if m.matches(machine_class, labels)]
        else:
            fits = list(machines)
        return sum(1 for m in fits if ledger.state_of(m) == "free")

    def get_node(self, name: str) -> NodeInfo | None:
        ledger = self.leases.read()
        lease = ledger.leases.get(name)
        if lease is None:
            return None
        machines = self.machines()
        return self._confirmed(self._info(lease, machines), machines)

    def _confirmed(self, info: NodeInfo, machines: dict[str, Machine]) -> NodeInfo:
        """A node that booted, checked against its machine's power state (a machine powered
        off behind crv's back is drift, which `crv repair` mends)."""
        machine = machines.get(str(info.extra.get("machine")))
        if info.state != "running" or machine is None:
            return info
        try:
            power = self.power.state(machine.name, self.bmc(machine))
        except PoolError as exc:
            power = "unknown: " + str(exc).removeprefix(f"pool {self.name}: ")
        state = {"on": "running", "off": "stopped"}.get(power, "error")
        return replace(info, state=state, extra={**info.extra, "power": power})

    def create_node(self, spec: NodeSpec) -> NodeInfo:
        self._boot_service_up()
        machines = self.machines()
        with self._ledger() as ledger:
            lease = ledger.leases.get(spec.name)
            if lease is not None and lease.cluster != spec.cluster:
                raise PoolError(self.name, f"node {spec.name} is leased to cluster {lease.cluster}")
            if lease is None:
                lease = self._allocate(ledger, machines, spec.name, spec.cluster, spec.group, [])
        if lease.state == "allocated":  # a create that failed or was killed before power-on
            lease = self._power_up(lease, spec, machines)
        return self._info(lease, machines)

    def destroy_node(self, name: str) -> None:
        ledger = self.leases.read()
        lease = ledger.leases.get(name)
        if lease is None:
            return
        machines = self.machines()
        machine = machines.get(lease.machine)
        if machine is not None:
            self.power.off(machine.name, self.bmc(machine))  # raises: the lease stays
            self.files.remove(machine.name, machine.macs, machine.address)
        with self._ledger() as ledger:
            ledger.leases.pop(name, None)

    def tend(self, name: str) -> NodeInfo | None:
        """Move a node whose machine did not call back in time to another machine."""
        machines = self.machines()
        ledger = self.leases.read()
        lease = ledger.leases.get(name)
        if lease is None or lease.state != "booting":
            return None if lease is None else self._info(lease, machines)
        if self.files.booted(lease.machine, lease.nonce):
            with self._ledger() as ledger:
                current = ledger.leases.get(name)
                if current is not None and current.machine == lease.machine:
                    current.state = "up"
                    lease = current
            return self._info(lease, machines)
        late = self._late(lease)
        if late is None:
            return self._info(lease, machines)
        script = self._script_of(lease)
        if script is None:
            raise PoolError(self.name, f"node {name}: the boot script of {lease.machine} is gone")
        self._write_off(lease, machines, late)
        tried = [*lease.tried, lease.machine]
        if len(tried) >= self.options.attempts:
            with self._ledger() as ledger:
                ledger.leases.pop(name, None)
            raise PoolError(
                self.name,
                f"node {name}: {len(tried)} machines did not boot ({', '.join(tried)}); "
                f"the last {lease.machine} {late}",
            )
        new = self._reallocate(lease, machines, tried)
        spec = NodeSpec(name=name, cluster=lease.cluster, group=lease.group, bootstrap={})
        new = self._power_up(new, spec, machines, script=script)
        return self._info(new, machines)

    def timings(self, lease: Lease) -> dict[str, float]:
        """What crv saw of the lease's boot: `power_on` (the BMC took the power-on), `script`
        (iPXE fetched its script), `kernel` and `initrd` (sent in full by the boot service;
        absent when they come from elsewhere) and `callback` (the booted OS enrolled and
        called back): UNIX times."""
        if lease.state == "allocated" or not lease.since:
            return {}
        found = {"power_on": lease.since}
        names = {
            "file:" + self.options.kernel.rsplit("/", 1)[-1]: "kernel",
            "file:" + self.options.initrd.rsplit("/", 1)[-1]: "initrd",
        }
        for event, when in self.files.events(lease.machine).items():
            phase = names.get(event, event)
            if phase in ("script", "kernel", "initrd", "callback") and when >= lease.since:
                found[phase] = when
        return found

    def _late(self, lease: Lease) -> str | None:
        """Why the machine of a booting lease is written off now (None: it is not late): a
        phase past its deadline (`phase_timeouts`), or no call-back within `boot_timeout`."""
        now, seen = time.time(), self.timings(lease)
        for phase, seconds in sorted(self.options.phase_timeouts.items(), key=lambda p: p[1]):
            if phase not in seen and now >= lease.since + seconds:
                what = {"script": "its boot script", "kernel": "the kernel"}.get(phase, phase)
                return f"did not fetch {what} within {seconds:g} s of power-on"
        if now < lease.deadline:
            return None
        return f"did not call back within {int(self.options.boot_timeout)} s of power-on"

    # -- allocation and power --------------------------------------------------------------

    @contextmanager
    def _ledger(self) -> Iterator[Ledger]:
        """The ledger for a change, with the IPMI commands sent since the last one counted in
        (`crv baremetal list --json` shows them per machine)."""
        with self.leases.open() as ledger:
            yield ledger
            with self._lock:
                sent = self.power.commands - self._counted
                self._counted.update(sent)
            for machine, count in sent.items():
                ledger.commands[machine] = ledger.commands.get(machine, 0) + count

    def _wanted(self, group: str) -> tuple[str | None, dict[str, str]]:
        chosen = self.options.groups.get(group)
        if chosen is not None:
            return chosen.machine_class or self.options.default_class, dict(chosen.labels)
        return self.options.default_class, {}

    def _allocate(
        self,
        ledger: Ledger,
        machines: dict[str, Machine],
        node: str,
        cluster: str,
        group: str,
        tried: list[str],
    ) -> Lease:
        """A free machine of the group's class (the ledger is locked by the caller). Free
        machines are taken in inventory order, so a small cluster lands on the same machines
        every time (predictable for the admin)."""
        machine_class, labels = self._wanted(group)
        fits = [m for m in machines.values() if m.matches(machine_class, labels)]
        free = [m for m in fits if ledger.state_of(m.name) == "free" and m.name not in tried]
        if not free:
            what = f"class {machine_class}" if machine_class else "any class"
            if labels:
                what += " with " + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            used = sum(1 for m in fits if ledger.state_of(m.name) != "free")
            broken = sum(1 for m in fits if ledger.state_of(m.name) == "failed")
            detail = f"{used} of {len(fits)} in use" + (f", {broken} failed" if broken else "")
            raise PoolError(self.name, f"no free machine of {what}: {detail}")
        lease = Lease(node, cluster, group, free[0].name, "allocated", tried=list(tried))
        lease.nonce = secrets.token_urlsafe(24)
        ledger.leases[node] = lease
        return lease

    def _reallocate(self, lease: Lease, machines: dict[str, Machine], tried: list[str]) -> Lease:
        """The node's lease dropped and another free machine taken; the drop stands (is
        written) even when no machine is free."""
        with self._ledger() as ledger:
            ledger.leases.pop(lease.node, None)
            try:
                return self._allocate(
                    ledger, machines, lease.node, lease.cluster, lease.group, tried
                )
            except PoolError as exc:
                failure = exc
        raise failure

    def _script_of(self, lease: Lease) -> str | None:
        try:
            return (self.files.root / lease.machine / "script.ipxe").read_text()
        except OSError:
            return None

    def _render(self, lease: Lease, machine: Machine, bootstrap: Any) -> str:
        words = [
            f"crv.service={bootstrap['service']}",
            f"crv.ca_sha256={bootstrap['ca_sha256']}",
            f"crv.cluster={bootstrap['cluster']}",
            f"crv.node={bootstrap['node']}",
            f"crv.token={bootstrap['token']}",
            f"crv.callback={self.http_url}/callback/{machine.name}/{lease.nonce}",
        ]
        return boot.render_script(
            self.name,
            machine=machine.name,
            node=lease.node,
            cluster=lease.cluster,
            kernel=self.options.kernel,
            initrd=self.options.initrd,
            cmdline=[*self.options.cmdline, *words],
        )

    def _power_up(
        self,
        lease: Lease,
        spec: NodeSpec,
        machines: dict[str, Machine],
        script: str | None = None,
    ) -> Lease:
        """Script, then a network boot (off, next boot PXE, on). A machine whose BMC fails is
        written off and the next free one is tried (up to `attempts`); a configuration error (a
        credential that is not there, a value that cannot go into a script) is raised as it is."""
        errors: list[str] = []
        while True:
            machine = machines[lease.machine]
            try:
                if script is None:
                    text = self._render(lease, machine, spec.bootstrap)
                else:  # a failover: the same bootstrap, the new machine's call-back
                    text = _retarget(script, lease, machine, self.http_url)
                bmc = self.bmc(machine)
            except PoolError:
                with self._ledger() as ledger:
                    ledger.leases.pop(lease.node, None)
                raise
            self.files.write(machine.name, machine.macs, text, lease.nonce, machine.address)
            try:
                self.power.pxe_boot(machine.name, bmc)
            except PoolError as exc:
                errors.append(str(exc).removeprefix(f"pool {self.name}: "))
                self._write_off(lease, machines, errors[-1])
                tried = [*lease.tried, lease.machine]
                if len(tried) >= self.options.attempts:
                    with self._ledger() as ledger:
                        ledger.leases.pop(lease.node, None)
                    message = f"node {lease.node}: no machine could be powered on"
                    raise PoolError(
                        self.name, f"{message}: {'; '.join(errors)}", temporary=exc.temporary
                    ) from None
                try:
                    lease = self._reallocate(lease, machines, tried)
                except PoolError as none_left:
                    rest = str(none_left).removeprefix(f"pool {self.name}: ")
                    raise PoolError(self.name, f"{'; '.join(errors)}; {rest}") from None
                continue
            with self._ledger() as ledger:
                lease.state = "booting"
                lease.since = time.time()
                lease.deadline = lease.since + self.options.boot_timeout
                ledger.leases[lease.node] = lease
            return lease

    def _write_off(self, lease: Lease, machines: dict[str, Machine], reason: str) -> None:
        """Power the machine off if we can and record it as failed, so nothing takes it until
        an admin has looked (`crv baremetal clear`)."""
        machine = machines.get(lease.machine)
        if machine is not None:
            self.files.remove(machine.name, machine.macs, machine.address)
            try:
                self.power.off(machine.name, self.bmc(machine))
                powered = "off"
            except PoolError as exc:  # it may still be on: the record says so
                powered = "unknown: " + str(exc).removeprefix(f"pool {self.name}: ")
        else:
            powered = "unknown (not in the machines file)"
        with self._ledger() as ledger:
            ledger.failed[lease.machine] = {
                "reason": reason,
                "node": lease.node,
                "cluster": lease.cluster,
                "since": time.time(),
                "power": powered,
            }

    def _boot_service_up(self) -> None:
        try:
            with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        raise PoolError(
            self.name,
            f"the boot service at {self.http_url} is not answering (`crv up` starts it)",
            temporary=True,
        )

    def _info(self, lease: Lease, machines: dict[str, Machine]) -> NodeInfo:
        machine = machines.get(lease.machine)
        state = {"allocated": "pending", "booting": "pending", "up": "running"}[lease.state]
        if lease.state == "booting" and self.files.booted(lease.machine, lease.nonce):
            state = "running"
        extra: dict[str, Any] = {"machine": lease.machine, "lease": lease.state}
        if machine is not None:
            extra["class"] = machine.machine_class
            extra["bmc"] = f"{machine.bmc.address}:{machine.bmc.port}"
        if lease.tried:
            extra["failed_machines"] = list(lease.tried)
        timings = self.timings(lease)
        if timings:
            extra["timings"] = timings
        tags = {TAG_CLUSTER: lease.cluster, TAG_NODE: lease.node}
        address = machine.address if machine is not None else None
        return NodeInfo(lease.node, lease.cluster, state, address, tags, extra)

    # -- for `crv baremetal` and the boot service -----------------------------------------

    def serve_boot(self, ready: threading.Event | None = None) -> None:
        o = self.options
        boot.serve(
            self.name,
            self.state_dir,
            http_listen=o.http_listen,
            tftp_listen=o.tftp_listen,
            tftp_root=self._path(o.tftp_root) if o.tftp_root else None,
            artefacts=self._path(o.files) if o.files else None,
            ready=ready,
            http_netns=o.http_netns,
        )

    def clear(self, machine_name: str) -> None:
        """An admin has fixed a failed machine: power it off and make it free again."""
        machine = self.machines().get(machine_name)
        if machine is None:
            raise PoolError(self.name, f"no machine {machine_name!r} in the machines file")
        ledger = self.leases.read()
        if machine_name not in ledger.failed:
            raise PoolError(self.name, f"machine {machine_name} is {ledger.state_of(machine_name)}")
        self.power.off(machine.name, self.bmc(machine))
        with self._ledger() as ledger:
            ledger.failed.pop(machine_name, None)


def _retarget(script: str, lease: Lease, machine: Machine, http_url: str) -> str:
    """The script of a node whose first machine failed, for the next machine: the same
    bootstrap, this machine's call-back URL and comment."""
    lines = []
    for line in script.splitlines():
        if line.startswith("kernel "):
            words = [
                f"crv.callback={http_url}/callback/{machine.name}/{lease.nonce}"
                if w.startswith("crv.callback=")
                else w
                for w in line.split(" ")
            ]
            line = " ".join(words)
        elif line.startswith("# crv: machine "):
            line = (
                f"# crv: machine {machine.name} boots node {lease.node} of cluster {lease.cluster}."
            )
        lines.append(line)
    return "\n".join(lines) + "\n"
