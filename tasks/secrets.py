"""Prefect Secret blocks as pool credentials (`{prefect_secret: NAME}` in pools.yaml): the
reader pools.credentials uses, handed over here because pools do not import Prefect."""

from __future__ import annotations

from pools.credentials import read_prefect_secrets_with


def read_secret(name: str) -> object:
    """The value of the Secret block `name`: ValueError when there is none (Prefect's own)."""
    from prefect.blocks.system import Secret  # lazily: most runs never read one

    return Secret.load(name).get()  # type: ignore[union-attr]  # sync in a sync context


read_prefect_secrets_with(read_secret)
