"""The pool contract: five methods, plain data in and out, crv errors that say if a retry helps.

`create_node` asks for a node and returns as soon as the pool has accepted it (a cloud API call,
a spawned process); it does not wait for the node to boot. That waiting belongs to the flow: the
node has booted when its agent enrols. Both `create_node` and `destroy_node` are idempotent on
the node name, so a deploy that is killed and run again converges instead of duplicating.

Optional capabilities are separate small protocols a driver may also have, found with getattr:
`tend` (bare metal: move a node that did not boot to another machine) and `capacity` (`Capacity`
below: how many more nodes the pool can make now, which a group's `pools:` preference list
uses to fill the first pool with room). A driver without `capacity` has no known limit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from crv.base.errors import CrvError

# Every resource a pool makes carries these tags, so a reconciler can find what a killed deploy
# left behind (FAULTS F1, F11) by listing the pool, not by trusting a local record.
TAG_CLUSTER = "crv-cluster"
TAG_NODE = "crv-node"


class PoolError(CrvError):
    """A pool operation failed; `temporary` says whether the same call may succeed later, and
    `delay` how long the pool asked to be left alone first (a cloud's Retry-After), if it did."""

    def __init__(
        self, pool: str, message: str, *, temporary: bool = False, delay: float | None = None
    ) -> None:
        self.pool = pool
        self.temporary = temporary
        self.delay = delay
        super().__init__(f"pool {pool}: {' '.join(message.split())}")


@dataclass(frozen=True)
class NodeSpec:
    """What a pool needs to make one node. `bootstrap` holds the one-time token: it goes to the
    node only (user-data, a 0600 file), never into logs, task results or the pool's tags."""

    name: str
    cluster: str
    group: str
    bootstrap: Mapping[str, str] = field(repr=False)
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    cluster: str
    state: str  # "pending" (accepted, not up), "running", "stopped", "error"
    address: str | None  # as other nodes and crv reach it; None until the pool knows it
    tags: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # pool-specific, for `crv status`


@runtime_checkable
class Pool(Protocol):
    name: str

    def validate(self) -> None:
        """Check the configuration without network calls; raise PoolError (permanent)."""

    def list_nodes(self, cluster: str | None = None) -> list[NodeInfo]:
        """Every node this pool holds that carries crv tags (of one cluster, if given)."""
        ...

    def get_node(self, name: str) -> NodeInfo | None: ...

    def create_node(self, spec: NodeSpec) -> NodeInfo:
        """Idempotent on spec.name: an existing node is returned as it is, not made twice."""
        ...

    def destroy_node(self, name: str) -> None:
        """Idempotent: destroying a node that is not there succeeds."""


@runtime_checkable
class Capacity(Protocol):
    """Optional: a pool that knows how many more nodes it can make."""

    def capacity(self, group: str | None = None) -> int | None:
        """How many more nodes this pool can make now (0: none); None: no known limit. With
        `group`: for that node group (a bare-metal pool counts only the machines of the
        group's class). No waiting; a failure to find out is a PoolError
        (crv.engine.placement counts it as 0)."""
        ...


class _Capped(Protocol):
    max_nodes: int | None

    def list_nodes(self, cluster: str | None = None) -> list[NodeInfo]: ...


class MaxNodes:
    """`capacity()` of a driver that holds at most `max_nodes` nodes at a time (None: no
    limit): every node it holds counts, of any cluster. The driver sets `max_nodes`."""

    def capacity(self: _Capped, group: str | None = None) -> int | None:
        """How many more nodes fit under `max_nodes` (None: no limit), for any group."""
        if self.max_nodes is None:
            return None
        return max(0, self.max_nodes - len(self.list_nodes()))


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Readers see the old file or the new one, never half of it. O_EXCL|O_NOFOLLOW: the temp
    file is ours, with `mode` from its first byte (a secret is never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask says
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
