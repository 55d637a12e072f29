"""Prefect events for node and cluster milestones, so Prefect automations can react to them.

Every event concerns the cluster: its primary resource is

    {"prefect.resource.id": "crv.cluster.<name>", "prefect.resource.name": <name>,
     "crv.appliance": <appliance>, "crv.pool": <pool>}

and a node event adds the node as a related resource (`crv.node.<node>`, role `node`; node
names already carry the cluster name, `plan.node_name`). An automation matches
`crv.cluster.ready` or `crv.node.*` on `crv.cluster.<name>`, or on `crv.pool: <pool>`.

The event names are a contract (automations are written against them): the closed sets
`NODE_EVENTS` and `CLUSTER_EVENTS` below; any other name is a programming error and raises
`ValueError`. Add names, never rename.

Emission never fails a deploy: Prefect's `emit_event` only queues the event for its
`EventsWorker` (an unbounded queue drained by a background thread of the process, which sends
them over one kept-open websocket); anything that goes wrong is logged as a warning (once;
later failures at DEBUG) and the call returns `None`. With the API unreachable the calls still
return at once, but the process waits ~7 s at exit while the worker retries its connection.

Measured here: 1,000 node events cost the calling thread about 0.13 s of CPU
(~0.13 ms each, 0.12-0.14 s measured) and the whole process, sending included, about 0.5 s
(5,000 events: 0.8 s and 3.1 s). The server stores them some seconds later.

Inside a flow or task run Prefect's worker relates the flow run (`prefect.flow-run.<id>`, role
`flow-run`), the flow, the deployment and the tags by itself, from the context of the thread
that emits. A thread started without that context (`run_in_executor` does not copy
contextvars) gets only the flow run, taken from `PREFECT__FLOW_RUN_ID` when a worker started
the run: emit from the flow's coroutines, not from pool threads.

Outside any run and with no `PREFECT_API_URL`, Prefect would start a temporary server (~13 s
here) just to send the event: crv skips the event instead.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.events import Event

__all__ = [
    "CLUSTER_DEPLOYING",
    "CLUSTER_DESTROYED",
    "CLUSTER_EVENTS",
    "CLUSTER_FAILED",
    "CLUSTER_READY",
    "CLUSTER_REPAIRED",
    "CLUSTER_ROLLED_BACK",
    "CLUSTER_SCALED",
    "NODE_DESTROYED",
    "NODE_ENROLLED",
    "NODE_EVENTS",
    "NODE_FAILED",
    "NODE_PROVISIONED",
    "NODE_VERIFIED",
    "cluster_event",
    "cluster_resource",
    "node_event",
    "node_resource",
]

NODE_PROVISIONED = "crv.node.provisioned"
NODE_ENROLLED = "crv.node.enrolled"
NODE_VERIFIED = "crv.node.verified"
NODE_FAILED = "crv.node.failed"
NODE_DESTROYED = "crv.node.destroyed"
NODE_QUARANTINED = "crv.node.quarantined"
NODE_EVENTS = frozenset(
    {NODE_PROVISIONED, NODE_ENROLLED, NODE_VERIFIED, NODE_FAILED, NODE_DESTROYED, NODE_QUARANTINED}
)

CLUSTER_DEPLOYING = "crv.cluster.deploying"
CLUSTER_READY = "crv.cluster.ready"
CLUSTER_FAILED = "crv.cluster.failed"
CLUSTER_SCALED = "crv.cluster.scaled"
CLUSTER_DESTROYED = "crv.cluster.destroyed"
CLUSTER_ROLLED_BACK = "crv.cluster.rolled-back"
CLUSTER_REPAIRED = "crv.cluster.repaired"
CLUSTER_HALTED = "crv.cluster.halted"  # the brake: too many new nodes failed (an alert)
CLUSTER_EVENTS = frozenset(
    {
        CLUSTER_DEPLOYING,
        CLUSTER_READY,
        CLUSTER_FAILED,
        CLUSTER_SCALED,
        CLUSTER_DESTROYED,
        CLUSTER_ROLLED_BACK,
        CLUSTER_REPAIRED,
        CLUSTER_HALTED,
    }
)

# A payload is a few counts, seconds and a failure message: long text is cut, so one huge
# error string cannot push an event over Prefect's size limit (1.5 MB by default).
MAX_TEXT = 2000
_MAX_DEPTH = 4

log = logging.getLogger(__name__)
_warned = threading.Event()


def cluster_resource(cluster: str, appliance: str, pool: str) -> dict[str, str]:
    """The primary resource of every crv event."""
    return {
        "prefect.resource.id": f"crv.cluster.{cluster}",
        "prefect.resource.name": cluster,
        "crv.appliance": appliance,
        "crv.pool": pool,
    }


def node_resource(node: str) -> dict[str, str]:
    """A node as a related resource (role `node`)."""
    return {
        "prefect.resource.id": f"crv.node.{node}",
        "prefect.resource.role": "node",
        "prefect.resource.name": node,
    }


def _name(kind: str, what: str, allowed: frozenset[str]) -> str:
    """`what` is the short name (`verified`) or the whole one (`crv.node.verified`)."""
    name = what if what.startswith(f"crv.{kind}.") else f"crv.{kind}.{what}"
    if name not in allowed:
        known = ", ".join(sorted(n.removeprefix(f"crv.{kind}.") for n in allowed))
        raise ValueError(f"unknown {kind} event {what!r}; crv {kind} events are: {known}")
    return name


def node_event(
    cluster: str, appliance: str, pool: str, node: str, what: str, **payload: Any
) -> Event | None:
    """Emit `crv.node.<what>` about `node` of `cluster`. Returns the queued event, or None
    when it was not sent (no Prefect API, or emitting failed: logged, never raised).
    Raises ValueError only for a name outside `NODE_EVENTS`."""
    name = _name("node", what, NODE_EVENTS)
    return _emit(name, cluster_resource(cluster, appliance, pool), [node_resource(node)], payload)


def cluster_event(
    cluster: str, appliance: str, pool: str, what: str, **payload: Any
) -> Event | None:
    """Emit `crv.cluster.<what>` about `cluster`. Returns the queued event, or None when it
    was not sent (no Prefect API, or emitting failed: logged, never raised).
    Raises ValueError only for a name outside `CLUSTER_EVENTS`."""
    name = _name("cluster", what, CLUSTER_EVENTS)
    return _emit(name, cluster_resource(cluster, appliance, pool), [], payload)


def _small(value: Any, depth: int = 0) -> Any:
    """JSON-safe and bounded: long strings cut, unknown types as their str()."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "...[truncated]"
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {str(k): _small(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [_small(v, depth + 1) for v in value]
    return _small(str(value), _MAX_DEPTH)


def _flow_run_fallback() -> list[dict[str, str]]:
    """The flow run, when this thread has no run context for Prefect's worker to read it from
    but the process runs one flow run (a worker-started run sets PREFECT__FLOW_RUN_ID)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
        return []  # the EventsWorker relates flow run, flow, deployment and tags itself
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not flow_run_id:
        return []
    return [
        {
            "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
            "prefect.resource.role": "flow-run",
        }
    ]


def _can_emit() -> bool:
    """Prefect sends to PREFECT_API_URL, or inside a run to the run's (possibly temporary)
    server. Outside a run with no URL it would start a temporary server just for the event."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import get_current_settings

    return bool(
        get_current_settings().api.url
        or FlowRunContext.get() is not None
        or TaskRunContext.get() is not None
    )


def _emit(
    name: str, resource: dict[str, str], related: list[dict[str, str]], payload: dict[str, Any]
) -> Event | None:
    try:
        from prefect.events import emit_event

        if not _can_emit():
            log.debug(
                "no Prefect API configured: event %s about %s not sent",
                name,
                resource["prefect.resource.id"],
            )
            return None
        return emit_event(
            event=name,
            resource=resource,
            related=related + _flow_run_fallback(),
            payload=_small(payload),
        )
    except Exception as e:  # an event is never worth failing a deploy for
        if _warned.is_set():
            log.debug("could not emit %s: %s", name, e, exc_info=True)
        else:
            _warned.set()
            log.warning(
                "could not emit Prefect event %s (%s); carrying on (further failures at DEBUG)",
                name,
                e,
            )
        return None
