"""Credential references for pool options: where a secret lives, never the secret itself.

A pool's options name a credential as `{env: VARNAME}` (an environment variable of the process
that runs the flow), `{file: /path}` (a file readable by its owner only, as systemd and container
credentials are kept; a relative path is relative to the file that names it) or
`{prefect_secret: BLOCK_NAME}` (a Prefect Secret block). A literal string
is refused by the model, so a key cannot end up in `pools.yaml`, in a flow's parameters or in
Prefect's database. `resolve` reads the value at the last moment; errors name the pool and the
option, never the value.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pools.base import PoolError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")  # Prefect block document names: slug-like


class SecretRef(BaseModel):
    """Exactly one of `env` (an environment variable), `file` (an owner-only file) or
    `prefect_secret` (a Secret block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, pattern=_ENV_NAME.pattern)
    file: str | None = Field(default=None, min_length=1, max_length=4096)
    prefect_secret: str | None = Field(default=None, pattern=_BLOCK_NAME.pattern)

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if [self.env, self.file, self.prefect_secret].count(None) != 2:
            raise ValueError("give exactly one of 'env', 'file' or 'prefect_secret'")
        return self

    def relative_to(self, directory: Path) -> SecretRef:
        """A `file` reference made absolute against the directory of the file naming it."""
        if self.file is None or os.path.isabs(self.file):
            return self
        return self.model_copy(update={"file": str(directory / self.file)})

    def describe(self) -> str:
        """Where the value comes from, for error messages (never the value)."""
        if self.env is not None:
            return f"environment variable {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        return f"Prefect Secret block {self.prefect_secret!r}"


def check(ref: SecretRef, pool: str, option: str) -> None:
    """Without network calls: an `env` reference must be set and non-empty, a `file` one must
    be a file only its owner can read. A Prefect block is only looked up by `resolve` (that
    needs the Prefect API)."""
    if ref.env is not None and not os.environ.get(ref.env):
        raise PoolError(pool, f"option {option}: environment variable {ref.env} is unset or empty")
    if ref.file is not None:
        _read_file(ref.file, pool, option)


def _read_file(path: str, pool: str, option: str) -> str:
    """The file's first line. Refused when others may read or change it: a credential file
    anyone can read is a leaked credential."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise PoolError(pool, f"option {option}: file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PoolError(pool, f"option {option}: file {path} is not a regular file")
        if info.st_mode & 0o077:
            mode = oct(info.st_mode & 0o777)
            message = f"file {path} is readable or writable by others (mode {mode}); chmod 600 it"
            raise PoolError(pool, f"option {option}: {message}")
        data = f.read(4096)
    value = data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
    if not value:
        raise PoolError(pool, f"option {option}: file {path} is empty")
    return value


# Reads a Prefect Secret block's value by name. Pools know nothing of Prefect: the layer that
# does (tasks/secrets.py, imported with every flow and by the CLI) hands its reader over.
SecretReader = Callable[[str], object]
_prefect_secret_reader: SecretReader | None = None


def read_prefect_secrets_with(reader: SecretReader) -> None:
    global _prefect_secret_reader
    _prefect_secret_reader = reader


def resolve(ref: SecretRef, pool: str, option: str) -> str:
    """The credential's value; a permanent PoolError naming pool and option if it is missing."""
    if ref.env is not None:
        check(ref, pool, option)
        return os.environ[ref.env]
    if ref.file is not None:
        return _read_file(ref.file, pool, option)
    name = ref.prefect_secret
    assert name is not None  # the model guarantees exactly one
    if _prefect_secret_reader is None:
        raise PoolError(
            pool, f"option {option}: Prefect Secret block {name!r} is read only in crv's flows"
        )
    try:
        value = _prefect_secret_reader(name)
    except ValueError as exc:  # Prefect: "Unable to find block document named ..."
        raise PoolError(pool, f"option {option}: Prefect Secret block {name!r} not found") from exc
    except Exception as exc:  # the API is down, ... : worth a retry
        raise PoolError(
            pool,
            f"option {option}: Prefect Secret block {name!r} unreadable ({type(exc).__name__})",
            temporary=True,
        ) from exc
    if not isinstance(value, str) or not value:
        raise PoolError(pool, f"option {option}: Prefect Secret block {name!r} is empty")
    return value
