"""Routes crv's own clients call with the admin certificate (the CLI, the flows, the serve
process): clusters, their nodes, tokens and role changes, pairings, autoscaling and its
decisions, the event stream, and deletion."""

import base64
import binascii
import logging
import time
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from crv.service.models import (
    AutoscalingSetting,
    ClusterPath,
    ClusterSpec,
    ClusterStatus,
    DecisionRecord,
    GuardSetting,
    GuardState,
    KeyPath,
    NodesRequest,
    Outcome,
    PairingRequest,
    QuarantineRequest,
    RolePath,
    RolesRequest,
    TokensRequest,
)
from crv.service.routes.node import MAX_WAIT
from crv.service.state import Admin, Svc
from crv.service.store import StoreError
from crv.service.usage import day_start, node_hours

log = logging.getLogger("crv.service")
router = APIRouter(prefix="/v1/admin", dependencies=[Admin])


@router.get("/clusters")
async def list_clusters(svc: Svc) -> dict[str, Any]:
    return {"clusters": await svc.db(svc.store.list_clusters)}


@router.put("/clusters/{cluster}")
async def put_cluster(svc: Svc, cluster: ClusterPath, body: ClusterSpec) -> dict[str, str]:
    try:
        bundle = base64.b64decode(body.bundle, validate=True)
    except (binascii.Error, ValueError):
        raise StoreError(400, "bundle: not base64") from None
    for role, spec in body.roles.items():
        for dep in spec.depends_on:
            if dep.role not in body.roles:
                raise StoreError(400, f"roles.{role}.depends_on: unknown role {dep.role!r}")
    digest, changed = await svc.db(
        svc.store.put_cluster,
        cluster,
        appliance=body.appliance,
        source=body.source,
        pool=body.pool,
        parameters=body.parameters,
        counts=body.counts,
        pools=body.pools,
        roles={r: s.model_dump() for r, s in body.roles.items()},
        bundle=bundle,
    )
    if changed:
        svc.wake_nodes(cluster)
    return {"name": cluster, "bundle": digest}


@router.get("/clusters/{cluster}")
async def cluster_status(svc: Svc, cluster: str) -> ClusterStatus:
    return await svc.db(svc.store.status, cluster)


@router.put("/clusters/{cluster}/nodes")
async def put_nodes(svc: Svc, cluster: str, body: NodesRequest) -> dict[str, int]:
    await svc.db(svc.store.require_cluster, cluster)
    changed = await svc.db(svc.store.put_nodes, cluster, [n.model_dump() for n in body.nodes])
    svc.forget_identities()
    for node in changed:
        svc.wake_node(cluster, node)
    svc.wake_cluster(cluster)
    return {"nodes": len(body.nodes)}


@router.post("/clusters/{cluster}/tokens")
async def tokens(svc: Svc, cluster: str, body: TokensRequest) -> dict[str, dict[str, str]]:
    await svc.db(svc.store.require_cluster, cluster)
    svc.forget_identities()
    ttl = timedelta(seconds=body.ttl)
    return {"tokens": await svc.db(svc.store.issue_tokens, cluster, body.nodes, ttl)}


@router.post("/clusters/{cluster}/roles")
async def roles(svc: Svc, cluster: str, body: RolesRequest) -> dict[str, Any]:
    results, woken = await svc.db(
        svc.store.update_roles, cluster, [u.model_dump() for u in body.updates]
    )
    for node in woken:
        svc.wake_node(cluster, node)
    svc.wake_cluster(cluster)
    return {"results": results}


@router.post("/clusters/{cluster}/pairings")
async def create_pairing(svc: Svc, cluster: ClusterPath, body: PairingRequest) -> dict[str, Any]:
    """A one-time PIN for a machine to join `group` (`crv pair`), with the fingerprint of
    the CA the machine's agent pins."""
    ttl = timedelta(seconds=body.ttl)
    made = await svc.db(svc.store.create_pairing, cluster, body.group, body.roles, ttl)
    log.info("pairing %s opened for %s group %s", made["id"], cluster, body.group)
    return {**made, "ca_sha256": svc.ca.fingerprint_sha256}


@router.get("/pairings/{ident}")
async def pairing(
    svc: Svc, ident: Annotated[str, PathParam(pattern="^[0-9a-f]{16}$")]
) -> dict[str, Any]:
    return await svc.db(svc.store.pairing, ident)


@router.get("/clusters/{cluster}/liveness")
async def liveness(svc: Svc, cluster: ClusterPath) -> dict[str, Any]:
    """When each node's agent last called and when its certificate ends: a change waiting
    on a node that went quiet fails fast, saying why (crv.engine.stages.Mirror)."""
    await svc.db(svc.store.require_cluster, cluster)
    return {"nodes": await svc.db(svc.store.liveness, cluster)}


@router.get("/clusters/{cluster}/attributes/{role}/{key}")
async def attribute_readings(
    svc: Svc, cluster: str, role: RolePath, key: KeyPath
) -> dict[str, Any]:
    """Every node's value of a role's attribute with its age: the autoscale flow's
    blackboard metric."""
    await svc.db(svc.store.require_cluster, cluster)
    readings = await svc.db(svc.store.attribute_readings, cluster, role, key)
    return {
        "role": role,
        "key": key,
        "values": [{"node": n, "value": v, "age": age} for n, v, age in readings],
    }


@router.get("/autoscaling")
async def autoscaling_all(svc: Svc) -> dict[str, Any]:
    """Every cluster's autoscaling setting: the serve process makes the `autoscale/<cluster>`
    deployments match it."""
    return {"clusters": await svc.db(svc.store.autoscaling)}


@router.get("/clusters/{cluster}/autoscaling")
async def autoscaling(svc: Svc, cluster: str) -> dict[str, Any]:
    await svc.db(svc.store.require_cluster, cluster)
    found = await svc.db(svc.store.autoscaling, cluster)
    return found[0] if found else {"cluster": cluster, "enabled": False, "every": None}


@router.put("/clusters/{cluster}/autoscaling")
async def put_autoscaling(svc: Svc, cluster: str, body: AutoscalingSetting) -> dict[str, Any]:
    return await svc.db(svc.store.put_autoscaling, cluster, body.enabled, body.every)


@router.get("/clusters/{cluster}/autoscaling/guards")
async def guards(svc: Svc, cluster: str) -> dict[str, Any]:
    """The cluster's guards and their state (crv.engine.guards); every key null when unset."""
    await svc.db(svc.store.require_cluster, cluster)
    return await svc.db(svc.store.guards, cluster)


@router.patch("/clusters/{cluster}/autoscaling/guards")
async def put_guards(svc: Svc, cluster: str, body: GuardSetting) -> dict[str, Any]:
    """Change the guards sent (crv.engine.guards); every guard and its state after."""
    changes = body.model_dump(exclude_unset=True)
    return await svc.db(svc.store.put_guards, cluster, changes)


@router.put("/clusters/{cluster}/autoscaling/state", status_code=204)
async def put_guard_state(svc: Svc, cluster: str, body: GuardState) -> None:
    """What the autoscale flow keeps between runs for the guards."""
    notices = {k: v.model_dump() for k, v in body.notices.items()}
    await svc.db(svc.store.put_guard_state, cluster, body.work_seen, notices)


@router.get("/clusters/{cluster}/usage")
async def usage(
    svc: Svc,
    cluster: ClusterPath,
    since: Annotated[float | None, Query(ge=0)] = None,
    until: Annotated[float | None, Query(ge=0)] = None,
) -> dict[str, Any]:
    """The usage ledger of a cluster (it outlives the cluster) within [since, until] (default:
    the current UTC day until now): its node-hours and the rows that overlap."""
    until = time.time() if until is None else until
    since = day_start(until) if since is None else since
    if since > until:
        raise StoreError(400, "since: after until")
    rows = await svc.db(svc.store.usage, cluster, since, until)
    hours = node_hours(rows, since, until)
    return {"cluster": cluster, "since": since, "until": until, "node_hours": hours, "nodes": rows}


@router.post("/clusters/{cluster}/decisions")
async def add_decision(svc: Svc, cluster: str, body: DecisionRecord) -> dict[str, int]:
    return {"seq": await svc.db(svc.store.add_decision, cluster, body.model_dump())}


@router.patch("/clusters/{cluster}/decisions/{seq}", status_code=204)
async def set_outcome(svc: Svc, cluster: str, seq: int, body: Outcome) -> None:
    await svc.db(svc.store.set_outcome, cluster, seq, body.outcome)


@router.get("/clusters/{cluster}/decisions")
async def list_decisions(
    svc: Svc,
    cluster: str,
    group: Annotated[str | None, Query(max_length=63)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """The newest decisions first."""
    await svc.db(svc.store.require_cluster, cluster)
    return {"decisions": await svc.db(svc.store.decisions, cluster, group, limit)}


@router.get("/clusters/{cluster}/events")
async def cluster_events(
    svc: Svc,
    cluster: str,
    after: Annotated[int, Query(ge=0)] = 0,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0,
) -> dict[str, Any]:
    store = svc.store

    async def ready() -> bool:
        return await svc.db(store.last_event, cluster) > after

    await svc.cluster_waiters.wait_until(cluster, ready, wait)
    found = await svc.db(store.events_after, cluster, after)
    return {"last": found[-1]["seq"] if found else after, "events": found}


@router.post("/clusters/{cluster}/nodes/{node}/quarantine")
async def quarantine_node(
    svc: Svc, cluster: str, node: str, body: QuarantineRequest
) -> dict[str, list[str]]:
    """Shut a node out (FAULTS F5): token spent, certificates revoked, attributes purged."""
    result = await svc.forget(cluster, lambda: svc.store.quarantine(cluster, node, body.reason))
    svc.wake_node(cluster, node)
    return result


@router.delete("/clusters/{cluster}/nodes/{node}")
async def delete_node(svc: Svc, cluster: str, node: str) -> dict[str, list[str]]:
    result = await svc.forget(cluster, lambda: svc.store.delete_node(cluster, node))
    svc.wake_node(cluster, node)
    return result


@router.delete("/clusters/{cluster}")
async def delete_cluster(svc: Svc, cluster: str) -> dict[str, list[str]]:
    nodes = await svc.db(svc.store.node_names, cluster)
    result = await svc.forget(cluster, lambda: svc.store.delete_cluster(cluster))
    # its CA signs a last CRL (every node certificate revoked), then loses its key
    authority = svc.cluster_cas.pop(cluster, None) or svc.cluster_ca(cluster, create=False)
    svc.forget_identities(cluster)  # the other processes drop its CA too
    if authority is not None and authority is not svc.ca:
        revoked = await svc.db(svc.store.revoked, cluster)
        last = svc.crl_pem(authority, revoked, next_update=timedelta(days=3650))
        svc.ca.retire_cluster_ca(cluster, last_crl=last)
    for node in nodes:
        svc.wake_node(cluster, node)
    return result
