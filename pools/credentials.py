"""Credential references for pool options: where a secret lives, never the secret itself.

A pool's options name a credential as `{env: VARNAME}` (an environment variable of the process
that runs the flow) or `{prefect_secret: BLOCK_NAME}` (a Prefect Secret block). A literal string
is refused by the model, so a key cannot end up in `pools.yaml`, in a flow's parameters or in
Prefect's database. `resolve` reads the value at the last moment; errors name the pool and the
option, never the value.
"""

from __future__ import annotations

import os
import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pools.base import PoolError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")  # Prefect block document names: slug-like


class SecretRef(BaseModel):
    """Exactly one of `env` (an environment variable) or `prefect_secret` (a Secret block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, pattern=_ENV_NAME.pattern)
    prefect_secret: str | None = Field(default=None, pattern=_BLOCK_NAME.pattern)

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.prefect_secret is None):
            raise ValueError("give exactly one of 'env' or 'prefect_secret'")
        return self

    def describe(self) -> str:
        """Where the value comes from, for error messages (never the value)."""
        if self.env is not None:
            return f"environment variable {self.env}"
        return f"Prefect Secret block {self.prefect_secret!r}"


def check(ref: SecretRef, pool: str, option: str) -> None:
    """Without network calls: an `env` reference must be set and non-empty. A Prefect block is
    only looked up by `resolve` (that needs the Prefect API)."""
    if ref.env is not None and not os.environ.get(ref.env):
        raise PoolError(pool, f"option {option}: environment variable {ref.env} is unset or empty")


def resolve(ref: SecretRef, pool: str, option: str) -> str:
    """The credential's value; a permanent PoolError naming pool and option if it is missing."""
    if ref.env is not None:
        check(ref, pool, option)
        return os.environ[ref.env]
    name = ref.prefect_secret
    assert name is not None  # the model guarantees exactly one
    try:
        from prefect.blocks.system import Secret  # lazily: pools do not need Prefect otherwise

        value = Secret.load(name).get()  # type: ignore[union-attr]  # sync in a sync context
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
