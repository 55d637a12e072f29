"""Routes an agent calls with its node certificate: renewal, work (a long poll), heartbeats, the
recipe bundle, the blackboard's attributes, and reports of recipes and on-node checks."""

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from crv.base.errors import PkiError
from crv.service.models import (
    MAX_VALUE,
    AttributeValue,
    CheckReport,
    KeyPath,
    RenewRequest,
    RolePath,
    StatusReport,
)
from crv.service.state import Node, Svc
from crv.service.store import StoreError

log = logging.getLogger("crv.service")
router = APIRouter()

MAX_WAIT = 30.0  # seconds a long poll may wait
ALIVE_EVERY = 5.0  # seconds between writes of last_seen for a node's heartbeats


@router.post("/v1/renew")
async def renew(request: Request, svc: Svc, caller: Node, body: RenewRequest) -> dict[str, Any]:
    """A new certificate for the caller's node and roles, for a key it made (mutual TLS
    with its current certificate proves who asks; the CSR that it holds the new key)."""
    ident = svc.identity(request.state.tls_peer_cert)
    assert ident is not None  # node_caller checked it
    serial = ident[0]
    try:
        new = await svc.db(
            svc.store.renew, caller.cluster, caller.node, serial, svc.signer(body.csr)
        )
    except PkiError as e:
        log.warning("renewal of %s/%s refused: %s", caller.cluster, caller.node, e)
        raise StoreError(400, str(e)) from None
    log.info("renewed %s/%s: %s supersedes %s", caller.cluster, caller.node, new.serial, serial)
    svc.wake_cluster(caller.cluster)
    return svc.issued(caller.cluster, new.pem)


@router.get("/v1/work")
async def work(
    svc: Svc,
    caller: Node,
    after: Annotated[int, Query(ge=0)] = 0,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0,
) -> dict[str, Any]:
    store = svc.store
    key = (caller.cluster, caller.node)
    first: dict[str, Any] | None = svc.work_answers.get(caller.cluster, caller.node)
    if first is None or store.touch_due(*key):
        version = svc.work_answers.version(caller.cluster)
        first = await svc.db(store.touch_and_work, *key)
        svc.work_answers.put(caller.cluster, caller.node, first, version)
    if first["generation"] > after or wait <= 0:
        return first

    async def changed() -> bool:
        gen = await svc.db(store.generation, *key)
        return gen is None or gen > after

    await svc.node_waiters.wait_until(key, changed, wait)
    return await svc.db(store.work, *key)


@router.post("/v1/alive", status_code=204)
async def alive(svc: Svc, caller: Node) -> None:
    """A heartbeat from an agent busy running a recipe (it does not poll meanwhile): a
    change waiting on the node tells a long recipe from a node that is gone."""
    await svc.db(svc.store.touch, caller.cluster, caller.node, every=ALIVE_EVERY)


@router.get("/v1/recipes")
async def recipes(svc: Svc, caller: Node) -> Response:
    row = await svc.db(svc.store.require_cluster, caller.cluster)
    return Response(
        row.bundle, media_type="application/gzip", headers={"X-Crv-Bundle": row.bundle_digest}
    )


@router.put("/v1/attributes/{role}/{key}", status_code=204)
async def set_attribute(
    svc: Svc, caller: Node, role: RolePath, key: KeyPath, body: AttributeValue
) -> None:
    if role not in caller.roles:
        raise StoreError(403, f"{caller.node} does not host role {role!r}")
    if "\x00" in body.value:
        raise StoreError(400, "value: contains a NUL character")
    if len(body.value.encode()) > MAX_VALUE:
        raise StoreError(413, f"value: more than {MAX_VALUE} bytes")
    await svc.db(svc.store.set_attribute, caller.cluster, caller.node, role, key, body.value)
    svc.attributes_changed(caller.cluster)


@router.get("/v1/attributes/{role}/{key}")
async def get_attribute(svc: Svc, caller: Node, role: RolePath, key: KeyPath) -> dict[str, Any]:
    if role not in await svc.readable_roles(caller):
        raise StoreError(403, f"{caller.node} neither hosts nor depends on role {role!r}")
    values = svc.attribute_answers.get(caller.cluster, (role, key))
    if values is None:
        version = svc.attribute_answers.version(caller.cluster)
        values = await svc.db(svc.store.get_attribute, caller.cluster, role, key)
        svc.attribute_answers.put(caller.cluster, (role, key), values, version)
    return {"role": role, "key": key, "values": [{"node": n, "value": v} for n, v in values]}


@router.post("/v1/status", status_code=204)
async def status_report(svc: Svc, caller: Node, body: StatusReport) -> None:
    if body.role not in caller.roles:
        raise StoreError(403, f"{caller.node} does not host role {body.role!r}")
    await svc.db(
        svc.store.report_status,
        caller.cluster,
        caller.node,
        body.role,
        release=body.release,
        state=body.state,
        exit_code=body.exit_code,
        output=body.output,
    )
    log.info("%s/%s %s: %s", caller.cluster, caller.node, body.role, body.state)
    svc.wake_cluster(caller.cluster)


@router.post("/v1/check", status_code=204)
async def check_report(svc: Svc, caller: Node, body: CheckReport) -> None:
    """The result of a verify the node's agent ran (`verify: {on_node: ...}`)."""
    if body.role not in caller.roles:
        raise StoreError(403, f"{caller.node} does not host role {body.role!r}")
    await svc.db(svc.store.report_check,
        caller.cluster, caller.node, body.role,
        check=body.check, exit_code=body.exit_code, output=body.output,
    )  # fmt: skip
    svc.wake_cluster(caller.cluster)
