"""Routes anyone may call: what a machine needs before it has a certificate, and the ways to get
one (a bootstrap token, a pairing PIN, or its last certificate after it ended)."""

import asyncio
import hashlib
import ipaddress
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from crv.appliance.spec import NAME_PATTERN
from crv.base.errors import PkiError
from crv.service.models import EnrolRequest, PairRequest, RejoinRequest
from crv.service.pki import check_unnamed_csr
from crv.service.state import Svc
from crv.service.store import StoreError, WrongPin
from pools import AGENT

log = logging.getLogger("crv.service")
router = APIRouter()

WRONG_PIN_DELAY = 1.0  # seconds before the answer to a wrong PIN: guessing is slow


@router.get("/v1/health")
async def health(svc: Svc) -> dict[str, Any]:
    return {
        "status": "ok",
        "ca_sha256": svc.ca.fingerprint_sha256,
        "node_cert_ttl": svc.node_ttl.total_seconds(),
        "database": svc.store.engine.dialect.name,
        "processes": svc.processes,
    }


@router.get("/v1/agent")
async def agent_program() -> Response:
    """The agent program (one stdlib-only file), for machines that fetch it at first boot
    (cloud user-data, pools/cloudinit.py) and check it against the SHA-256 their pool
    pinned."""
    return Response(AGENT.read_bytes(), media_type="text/x-python")


@router.get("/v1/ca")
async def ca_certificate(svc: Svc) -> Response:
    """Public, as a CA certificate is. A machine whose bootstrap channel is too small for it
    (a kernel command line) fetches it here and trusts it only if its SHA-256 matches the
    fingerprint that channel carried."""
    return Response(svc.ca.certificate_pem, media_type="application/x-pem-file")


@router.get("/v1/crl")
async def crl(
    svc: Svc,
    cluster: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
) -> Response:
    """The CRLs, one per issuer, in one PEM file: the root's (the CAs of deleted
    clusters), then each cluster CA's (its revoked node certificates), then the last CRL
    each deleted cluster's CA signed before its key was deleted. `?cluster=C`: only C's."""
    ca, store = svc.ca, svc.store
    if cluster is not None:
        authority = svc.cluster_ca(cluster, create=False)
        if authority is None:
            raise StoreError(404, f"no CA for cluster {cluster!r}")
        pem = svc.crl_pem(authority, await svc.db(store.revoked, cluster))
        return Response(pem, media_type="application/pkix-crl")
    root = ca.retired() + ([] if ca.per_cluster else await svc.db(store.revoked))
    parts = [svc.crl_pem(ca, root)]
    for name, authority in ca.cluster_cas().items():
        if authority is not ca:
            parts.append(svc.crl_pem(authority, await svc.db(store.revoked, name)))
    parts += ca.final_crls()
    return Response(b"".join(parts), media_type="application/pkix-crl")


@router.post("/v1/enrol")
async def enrol(svc: Svc, body: EnrolRequest, request: Request) -> dict[str, Any]:
    digest = hashlib.sha256(body.csr.encode()).hexdigest()
    # where the machine called from: its address, when its pool did not know one (a guest on a
    # bridge gets its address by DHCP after the pool made it)
    peer = request.client.host if request.client is not None else None
    try:
        pem, revoked = await svc.db(
            svc.store.enrol,
            body.cluster,
            body.node,
            body.token,
            digest,
            svc.signer(body.csr),
            peer=peer,
        )
    except StoreError as e:
        if e.status == 401:
            log.warning("enrolment refused: %s", e)
            raise StoreError(401, "invalid or expired bootstrap token") from None
        raise
    except PkiError as e:
        log.warning("enrolment of %s/%s refused: %s", body.cluster, body.node, e)
        raise StoreError(400, str(e)) from None
    if revoked:
        svc.forget_identities()
    log.info("enrolled %s/%s", body.cluster, body.node)
    svc.wake_cluster(body.cluster)
    return svc.issued(body.cluster, pem)


@router.post("/v1/pair")
async def pair(svc: Svc, body: PairRequest) -> dict[str, Any]:
    """A machine crv did not make joins with a one-time PIN from `crv pair` (docs/pki.md,
    "Pairing"): it becomes the next node of the PIN's group, in the manual pool."""
    if body.address is not None:
        try:
            ipaddress.ip_address(body.address)
        except ValueError:
            raise StoreError(400, f"address: {body.address!r} is not an IP address") from None
    digest = hashlib.sha256(body.csr.encode()).hexdigest()
    try:
        check_unnamed_csr(body.csr.encode())
        cluster, node, pem, revoked = await svc.db(
            svc.store.pair, body.pin, digest, body.address, svc.signer(body.csr)
        )
    except WrongPin:
        await asyncio.sleep(WRONG_PIN_DELAY)
        raise
    except PkiError as e:
        log.warning("pairing refused: %s", e)
        raise StoreError(400, str(e)) from None
    if revoked:
        svc.forget_identities()
    log.info("paired %s/%s%s", cluster, node, f" at {body.address}" if body.address else "")
    svc.wake_cluster(cluster)
    return {**svc.issued(cluster, pem), "cluster": cluster, "node": node}


@router.post("/v1/rejoin")
async def rejoin(svc: Svc, body: RejoinRequest) -> dict[str, Any]:
    """A member whose certificate ended while it was off, suspended or cut off comes back
    without a token: it shows its last certificate (issued by this CA to this node, never
    revoked, ended less than the grace period ago) and proves it holds that certificate's
    key by signing its new CSR with it (docs/pki.md, "Re-joining")."""
    where = f"{body.cluster}/{body.node}"
    try:
        serial = svc.check_rejoin(body)
    except PkiError as e:
        log.warning("re-join of %s refused: %s", where, e)
        raise StoreError(403, f"re-join of {where} refused: {e}") from None
    try:
        new = await svc.db(
            svc.store.rejoin,
            body.cluster,
            body.node,
            serial,
            svc.signer(body.csr),
            grace=svc.rejoin_grace,
        )
    except PkiError as e:  # the new CSR
        log.warning("re-join of %s refused: %s", where, e)
        raise StoreError(400, f"re-join of {where} refused: {e}") from None
    except StoreError as e:  # the node proved who it is, but may no longer come back
        log.warning("%s", e)
        await svc.db(svc.store.refused, body.cluster, body.node, str(e))
        svc.wake_cluster(body.cluster)
        raise
    log.info("re-joined %s with certificate %s", where, new.serial)
    svc.wake_cluster(body.cluster)
    return svc.issued(body.cluster, new.pem)
