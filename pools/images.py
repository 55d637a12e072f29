"""Images crv built (lab/images.py), as the pools that boot them read them.

An image is a directory with a manifest, `image.json`, naming its files (the qcow2 disk, the
kernel and initrd it boots with, the PXE ramdisk) with their SHA-256 and size. A pool checks
the files against the manifest before it boots anything from them (`verify`), and refuses a
base disk with a backing file (`backing_file`): a qcow2 chain crv did not make could read any
file of the host (FAULTS F10). Hashing a 1 GB disk takes seconds, so a file that verified is
remembered for the process by (device, inode, size, mtime): changed in place, it is hashed
again.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crv.base.errors import CrvError

MANIFEST = "image.json"
SHA256 = r"^[0-9a-f]{64}$"


class ImageError(CrvError):
    """An image that cannot be used: one line naming the file and what is wrong."""


class ImageFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")  # inside the image dir
    sha256: str = Field(pattern=SHA256)
    size: int = Field(ge=0)
    format: Literal["qcow2", "raw", ""] = ""


class ImageManifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal[1]
    key: str = Field(min_length=1, max_length=128)
    builder: str = ""
    suite: str = ""
    mirror: str = ""
    built_at: str = ""
    packages: list[str] = Field(default_factory=list)
    cmdline: str = Field(default="root=/dev/vda rw console=ttyS0", max_length=2048)
    files: dict[Literal["disk", "kernel", "initrd", "ramdisk"], ImageFile]
    dir: Path = Path(".")  # where the manifest was read from (set by `load`)

    def path(self, role: Literal["disk", "kernel", "initrd", "ramdisk"]) -> Path:
        if role not in self.files:
            raise ImageError(f"{self.dir / MANIFEST}: files.{role}: the image has none")
        return self.dir / self.files[role].path


def load(path: Path) -> ImageManifest:
    """The manifest at `path` (an image.json, or the directory holding one)."""
    if path.is_dir():
        path = path / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ImageError(f"{path}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ImageError(f"{path}: not a JSON object")
    try:
        manifest = ImageManifest.model_validate({**raw, "dir": path.parent})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise ImageError(f"{path}: {where}: {first['msg']}") from None
    if "disk" not in manifest.files:
        raise ImageError(f"{path}: files.disk: missing")
    return manifest


_verified: set[tuple[int, int, int, int, str]] = set()
_verified_lock = threading.Lock()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, sha256: str) -> None:
    """ImageError unless the file at `path` has that SHA-256 (once per process per version)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)
    with _verified_lock:
        if key in _verified:
            return
    try:
        found = sha256_of(path)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from None
    if found != sha256:
        raise ImageError(f"{path}: SHA-256 {found[:16]}... is not the manifest's {sha256[:16]}...")
    with _verified_lock:
        _verified.add(key)


def backing_file(path: Path, fmt: str = "qcow2") -> str | None:
    """The backing file a disk image of format `fmt` names (qemu-img info), None when it has
    none. ImageError for a file qemu-img cannot read as that format (a corrupt qcow2: left to
    guess, qemu-img would take it for a raw disk)."""
    try:
        done = subprocess.run(
            ["qemu-img", "info", "-U", "-f", fmt, "--output=json", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise ImageError("qemu-img is not installed (Debian package qemu-utils)") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["unreadable"])[-1]
        raise ImageError(f"{path}: not a usable disk image: {last}")
    info = json.loads(done.stdout)
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    return str(backing) if backing else None
