"""The machines a bare-metal pool may use, and which of them are leased, free or failed.

The machines file is the admin's description of the rack (`docs/pools.md`, "Bare metal"):

    bmc_defaults: {username: crv, port: 623, cipher_suite: 17}   # merged into every machine
    machines:
      - name: r1-01
        macs: ["52:54:00:00:01:01"]          # every NIC that may PXE-boot
        address: 10.0.0.101                  # what DHCP gives it (a reservation by MAC)
        class: std                           # hardware class; node groups ask for one
        labels: {rack: r1}
        bmc: {address: 10.1.0.101, password: {file: bmc/r1-01.pass}}

Credentials are references only (pools/credentials.py): a literal password is refused, so it
never lands in this file, in a flow's parameters or in Prefect's database. Two machines never
share a MAC, a BMC or a password reference (the same file, environment variable or Secret
block, given per machine or once in `bmc_defaults`): each BMC has its own credential (US-CERT
TA13-207A). The values are not read here, so their length is not judged here. A BMC user name
is never empty (the NULL user logs in anonymously) nor holds a control character.

What changes at run time lives in the pool's state directory, `leases.json`, rewritten
atomically under a flock: the lease of each node (keyed by node name, so a create that is run
again finds its machine instead of taking a second one) and the machines written off as failed
(a BMC that refused us, a machine that never booted). A machine is free when it is neither.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crv.appliance.spec import Name, validation_error
from crv.appliance.yamldoc import load_yaml_file
from crv.base.errors import SpecError
from crv.base.flock import exclusive
from pools.base import write_atomic
from pools.credentials import SecretRef

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_LABEL = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class BmcConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(min_length=1, max_length=253)
    port: int = Field(default=623, ge=1, le=65535)
    username: str = Field(max_length=16)  # IPMI 2.0 user names: 16 bytes
    password: SecretRef
    cipher_suite: int = 17

    @field_validator("address")
    @classmethod
    def _host(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.:-]+", value):
            raise ValueError("must be an IP address or a host name")
        return value

    @field_validator("username")
    @classmethod
    def _user(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty: an empty (NULL) user name logs in anonymously")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError("must not hold a control character (a NUL ends an IPMI user name)")
        return value

    @field_validator("cipher_suite")
    @classmethod
    def _suite(cls, value: int) -> int:
        if value == 0:
            raise ValueError("cipher suite 0 has no authentication; use 17 (or 3)")
        if value not in (17, 3):
            raise ValueError("must be 17 (HMAC-SHA256, AES-128) or 3 (HMAC-SHA1, AES-128)")
        return value


class Machine(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Name
    macs: list[str] = Field(min_length=1, max_length=16)
    address: str | None = None
    machine_class: Name = Field(default="default", alias="class")
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    bmc: BmcConfig

    @field_validator("macs")
    @classmethod
    def _macs(cls, value: list[str]) -> list[str]:
        macs = [m.strip().lower().replace("-", ":") for m in value]
        for mac in macs:
            if not _MAC.fullmatch(mac):
                raise ValueError(f"{mac!r} is not a MAC address like 52:54:00:12:34:56")
        return macs

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)  # ValueError names the value
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not re.fullmatch(_LABEL, key) or not re.fullmatch(_LABEL, item):
                raise ValueError(f"label {key}={item}: letters, digits, '_', '.', '-' only")
        return value

    def matches(self, machine_class: str | None, labels: dict[str, str]) -> bool:
        if machine_class is not None and self.machine_class != machine_class:
            return False
        return all(self.labels.get(k) == v for k, v in labels.items())


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bmc_defaults: dict[str, Any] = Field(default_factory=dict)
    machines: list[dict[str, Any]] = Field(default_factory=list, max_length=10000)


def load(path: Path) -> dict[str, Machine]:
    """The machines of `path`, by name; a mistake is a SpecError naming the file and field."""
    source = str(path)
    if not path.is_file():
        raise SpecError(source, "machines", "no such file")
    raw = load_yaml_file(path, shown_as=source)
    try:
        doc = _File.model_validate(raw or {})
    except ValidationError as exc:
        raise validation_error(source, exc) from None
    found: dict[str, Machine] = {}
    owners: dict[str, str] = {}  # MAC or BMC -> machine: two machines never share either
    passwords: dict[SecretRef, str] = {}  # nor a BMC password (US-CERT TA13-207A)
    for i, entry in enumerate(doc.machines):
        at = f"machines[{i}]"
        merged = dict(entry)
        bmc = entry.get("bmc")
        merged["bmc"] = {**doc.bmc_defaults, **(bmc if isinstance(bmc, dict) else {})}
        try:
            machine = Machine.model_validate(merged)
        except ValidationError as exc:
            err = validation_error(source, exc)
            raise SpecError(source, f"{at}.{err.field}", err.message) from None
        if machine.name in found:
            raise SpecError(source, f"{at}.name", f"{machine.name!r} is listed twice")
        for key in [*machine.macs, f"bmc {machine.bmc.address}:{machine.bmc.port}"]:
            if key in owners:
                raise SpecError(source, at, f"{key} is also machine {owners[key]!r}'s")
            owners[key] = machine.name
        password = machine.bmc.password.relative_to(path.parent)
        same = _same_secret(password)
        if same in passwords:
            own = isinstance(bmc, dict) and "password" in bmc
            inherited = "" if own else " (from bmc_defaults)"
            raise SpecError(
                source,
                f"{at}.bmc.password",
                f"{password.describe()}{inherited} is also machine {passwords[same]!r}'s: "
                "give each BMC its own password",
            )
        passwords[same] = machine.name
        bmc_config = machine.bmc.model_copy(update={"password": password})
        found[machine.name] = machine.model_copy(update={"bmc": bmc_config})
    return found


def _same_secret(ref: SecretRef) -> SecretRef:
    """What two references that name one secret have in common: a file by its real path."""
    if ref.file is None:
        return ref
    return ref.model_copy(update={"file": os.path.realpath(ref.file)})


# -- leases ------------------------------------------------------------------------------------


@dataclass
class Lease:
    node: str
    cluster: str
    group: str
    machine: str
    state: str  # "allocated" (chosen, not yet powered), "booting", "up"
    nonce: str = field(repr=False, default="")
    since: float = 0.0  # when the machine was powered for this lease
    deadline: float = 0.0  # booting: power it off and try another after this
    tried: list[str] = field(default_factory=list)  # machines that failed this node before

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Ledger:
    """`leases.json`: node -> lease, machine -> why it failed, machine -> IPMI commands."""

    leases: dict[str, Lease] = field(default_factory=dict)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)  # IPMI commands sent, per machine

    def holder(self, machine: str) -> Lease | None:
        return next((le for le in self.leases.values() if le.machine == machine), None)

    def state_of(self, machine: str) -> str:
        if machine in self.failed:
            return "failed"
        return "leased" if self.holder(machine) is not None else "free"


class Leases:
    """The ledger on disk. `open()` holds the pool-wide flock for a read-modify-write; every
    process (the flow, the boot service, `crv baremetal`) goes through it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "leases.json"
        self._lock = state_dir / ".leases.lock"

    def read(self) -> Ledger:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return Ledger()
        leases = {name: Lease(**value) for name, value in raw.get("leases", {}).items()}
        return Ledger(leases, dict(raw.get("failed", {})), dict(raw.get("commands", {})))

    @contextmanager
    def open(self) -> Iterator[Ledger]:
        """The ledger, written back when the block ends without an exception."""
        with exclusive(self._lock):
            ledger = self.read()
            yield ledger
            doc = {
                "leases": {n: le.to_json() for n, le in sorted(ledger.leases.items())},
                "failed": dict(sorted(ledger.failed.items())),
                "commands": dict(sorted(ledger.commands.items())),
            }
            write_atomic(self.path, json.dumps(doc, indent=1).encode() + b"\n", 0o600)
