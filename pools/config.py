"""Which pools exist: the built-in ones and those a `pools.yaml` names.

`pools.yaml` lives in the crv home (`$CRV_HOME/pools.yaml`) unless `CRV_POOLS_FILE` names
another file. It maps pool names to a driver and that driver's options:

    pools:
      vm:
        driver: libvirt
        options: {uri: "qemu:///session", base_image: /var/lib/crv/debian-12.qcow2}
      ec2:
        driver: libcloud
        options:
          provider: ec2
          region: eu-west-1
          key: {env: AWS_ACCESS_KEY_ID}          # credentials only by reference
          secret: {env: AWS_SECRET_ACCESS_KEY}
          image: ami-0123456789abcdef0
          size: t3.small

`local` and `sim` are always there and need no entry; an entry may name more pools of their
drivers, for example `small: {driver: local, options: {max_nodes: 1}}`. `max_nodes` (local,
sim, libvirt, libcloud) caps the nodes a pool holds at a time: its `capacity()`, which a node
group's `pools:` preference list uses. Loading checks everything it can without
a network call (each driver's options model, then the driver's own `validate()`); a mistake is
one line naming the file, the pool and the option.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crv.appliance.spec import Name, validation_error
from crv.appliance.yamldoc import load_yaml_file
from crv.base.errors import SpecError

BUILTIN = ("local", "sim")
# driver name -> (module, pool class or factory (name, state_dir, options), options model);
# imported only when a pool uses it
DRIVERS: Mapping[str, tuple[str, str, str]] = {
    "local": ("pools.local", "configured", "LocalOptions"),
    "sim": ("pools.sim", "configured", "SimOptions"),
    "libvirt": ("pools.libvirt", "LibvirtPool", "LibvirtOptions"),
    "libcloud": ("pools.cloud", "CloudPool", "CloudOptions"),
    "baremetal": ("pools.baremetal.pool", "BaremetalPool", "BaremetalOptions"),
}


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    driver: str
    description: str = ""
    options: dict[str, Any] = Field(default_factory=dict)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: dict[Name, _Entry] = Field(default_factory=dict, max_length=256)


@dataclass(frozen=True)
class PoolConfig:
    name: str
    driver: str
    description: str
    options: Any  # the driver's options model, validated
    source: str  # the file it came from, or "built-in"


def config_file(home_root: Path) -> Path:
    override = os.environ.get("CRV_POOLS_FILE")
    return Path(override) if override else home_root / "pools.yaml"


def load(path: Path) -> dict[str, PoolConfig]:
    """Every pool: the built-in ones, then those of `path` (a missing file names none)."""
    found = {
        name: PoolConfig(name, name, f"built-in {name} pool", None, "built-in") for name in BUILTIN
    }
    if not path.is_file():
        return found
    source = str(path)
    raw = load_yaml_file(path, shown_as=source)
    if raw is None:
        return found
    try:
        doc = _File.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(source, exc) from None
    for name, entry in doc.pools.items():
        at = f"pools.{name}"
        if name in BUILTIN:
            raise SpecError(source, at, f"{name!r} is a built-in pool; choose another name")
        if entry.driver not in DRIVERS:
            known = ", ".join(sorted(DRIVERS))
            raise SpecError(source, f"{at}.driver", f"unknown driver {entry.driver!r} ({known})")
        module, _, model = DRIVERS[entry.driver]
        options_model = getattr(importlib.import_module(module), model)
        try:
            options = options_model.model_validate(entry.options)
        except ValidationError as exc:
            err = validation_error(source, exc)
            raise SpecError(source, f"{at}.options.{err.field}", err.message) from None
        found[name] = PoolConfig(name, entry.driver, entry.description, options, source)
    return found
