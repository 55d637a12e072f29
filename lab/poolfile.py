"""The lab's entries in pools.yaml (`lab`, written by `crv lab up`; `rack`, by `crv lab rack`):
read, set and drop one entry, the rest of the file as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crv.base.home import Home
from lab.network import LabError


def path(home: Home) -> Path:
    from pools.config import config_file

    return config_file(home.root)


def read(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {"pools": {}}
    doc = yaml.safe_load(file.read_text()) or {}
    if not isinstance(doc, dict):
        raise LabError(f"{file}: not a mapping; cannot add the lab's pools")
    doc.setdefault("pools", {})
    return doc


def save(file: Path, doc: dict[str, Any]) -> None:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(
        "# crv pools (pools/config.py); `lab` and `rack` are written by `crv lab up` and "
        "`crv lab rack`\n" + yaml.safe_dump(doc, sort_keys=False)
    )
    tmp.replace(file)


def entry(home: Home, name: str) -> dict[str, Any] | None:
    found = read(path(home))["pools"].get(name)
    return found if isinstance(found, dict) else None


def put(home: Home, name: str, value: dict[str, Any]) -> None:
    file = path(home)
    doc = read(file)
    doc["pools"][name] = value
    save(file, doc)


def drop(home: Home, name: str) -> None:
    file = path(home)
    if not file.is_file():
        return
    doc = read(file)
    if doc["pools"].pop(name, None) is not None:
        save(file, doc)
