"""The states a node, a role on a node, and a pool's machine pass through, in one place.

They are string enums (`StrEnum` once Python 3.10 is dropped): a state compares equal to its
word (`NodeState.LEAVING == "leaving"`), is stored and sent as that word, and so the store's
columns, the service's JSON and the agent (which imports nothing of crv) keep the plain words.
"""

from __future__ import annotations

from enum import Enum


class _Words(str, Enum):
    """A state that is, prints and formats as its plain word."""

    __str__ = str.__str__
    __format__ = str.__format__  # type: ignore[assignment]


class NodeState(_Words):
    """A node as the service records it: planned, then made by its pool, then joined."""

    PLANNED = "planned"  # in the plan, not asked of a pool yet
    PROVISIONING = "provisioning"  # asked of its pool
    PROVISIONED = "provisioned"  # its pool made it; its agent has not enrolled yet
    ENROLLED = "enrolled"  # its agent holds a certificate and runs its roles
    LEAVING = "leaving"  # a shrink picked it: it still runs, but no longer feeds anyone
    # it failed certify or its first contextualize for good: its token and certificates are
    # revoked, what it published is purged, the service refuses it; the next change remakes it
    QUARANTINED = "quarantined"


# a node recorded `provisioning` again from these states has lost its machine: it is remade
REMADE_FROM = (
    NodeState.PROVISIONED, NodeState.ENROLLED, NodeState.LEAVING, NodeState.QUARANTINED
)  # fmt: skip


class RoleState(_Words):
    """A role on a node: pending -> released -> running -> done | failed; done -> verified |
    verify_failed. Before a shrink removes the node: draining -> drained | drain_failed."""

    PENDING = "pending"
    RELEASED = "released"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    VERIFIED = "verified"
    VERIFY_FAILED = "verify_failed"
    DRAINING = "draining"
    DRAINED = "drained"
    DRAIN_FAILED = "drain_failed"


DRAIN_STATES = (RoleState.DRAINING, RoleState.DRAINED, RoleState.DRAIN_FAILED)


class MachineState(_Words):
    """A node's machine as its pool reports it (`NodeInfo.state`)."""

    PENDING = "pending"  # accepted, not up yet
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"
