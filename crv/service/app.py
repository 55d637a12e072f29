"""The crv service: enrolment, the blackboard, recipe delivery, agent reports, the admin side.

Authorization is by TLS client certificate only (docs/service-api.md): the handshake has already
checked the chain, so a route reads the identity this CA wrote into the URI SANs and then asks
the store whether that certificate is still current (revocation takes effect on the next
request). Long polls wait on in-process notifications, not on timers, so an agent hears about a
release within milliseconds and an idle one costs nothing.
"""

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crv.appliance.spec import ATTRIBUTE_PATTERN, NAME_PATTERN
from crv.base.errors import PkiError
from crv.service.pki import CertificateAuthority, check_unnamed_csr, is_admin, node_identity
from crv.service.store import (
    PAIR_TTL,
    REJOIN_GRACE,
    Enrolment,
    Issued,
    Store,
    StoreError,
    WrongPin,
)
from pools import AGENT

log = logging.getLogger("crv.service")

MAX_BODY = 1 << 20
MAX_ADMIN_BODY = 16 << 20
MAX_VALUE = 64 * 1024
MAX_WAIT = 30.0
NODE_CERT_TTL = timedelta(hours=24)
ALIVE_EVERY = 5.0  # seconds between writes of last_seen for a node's heartbeats
WRONG_PIN_DELAY = 1.0  # seconds before the answer to a wrong PIN: guessing is slow
# what a re-joining node signs with its last key, ahead of its new CSR (the CSR binds the
# signature to the one key the new certificate may certify; the prefix to this use)
REJOIN_CONTEXT = b"crv-rejoin-v1\x00"

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
RolePath = Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=63)]
KeyPath = Annotated[str, PathParam(pattern=ATTRIBUTE_PATTERN, max_length=63)]
ClusterPath = Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=63)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EnrolRequest(_Body):
    cluster: Name
    node: Name
    token: Annotated[str, Field(min_length=16, max_length=128)]
    csr: Annotated[str, Field(max_length=16 * 1024)]


class RenewRequest(_Body):
    csr: Annotated[str, Field(max_length=16 * 1024)]


class RejoinRequest(_Body):
    cluster: Name
    node: Name
    certificate: Annotated[str, Field(max_length=16 * 1024)]  # its last one, ended
    csr: Annotated[str, Field(max_length=16 * 1024)]  # for a new key made on the node
    signature: Annotated[str, Field(max_length=512)]  # base64 DER ECDSA by the last key


class PairingRequest(_Body):
    group: Name
    roles: list[Name]
    ttl: Annotated[float, Field(ge=30, le=86400)] = PAIR_TTL.total_seconds()


class PairRequest(_Body):
    pin: Annotated[str, Field(min_length=4, max_length=32)]
    csr: Annotated[str, Field(max_length=16 * 1024)]  # for a key made on the machine, no names
    address: Annotated[str, Field(max_length=64)] | None = None  # as other nodes reach it


class CheckReport(_Body):
    role: Name
    check: Annotated[int, Field(ge=1)]
    exit_code: int
    output: Annotated[str, Field(max_length=64 * 1024)] = ""


class AttributeValue(_Body):
    value: Annotated[str, Field(max_length=MAX_VALUE)]


class StatusReport(_Body):
    role: Name
    release: Annotated[int, Field(ge=1)]
    state: Literal["running", "done", "failed"]
    exit_code: int | None = None
    output: Annotated[str, Field(max_length=64 * 1024)] = ""


class DependsOn(_Body):
    role: Name
    local: bool = False
    min_ready: int | None = None


class RoleSpec(_Body):
    recipe: Annotated[str, Field(max_length=1024)]
    drain: Annotated[str, Field(max_length=1024)] | None = None
    # after the node's certificate is renewed: "rerun" the recipe, or run this recipe
    renew: Annotated[str, Field(max_length=1024)] | None = None
    appdir: Annotated[str, Field(max_length=64)]
    env: dict[str, str] = {}
    depends_on: list[DependsOn] = []
    # attributes that are measurements: left out of what a dependent is said to read
    metrics: list[Annotated[str, Field(pattern=ATTRIBUTE_PATTERN, max_length=63)]] = []


class ClusterSpec(_Body):
    appliance: Name
    source: Annotated[str, Field(max_length=4096)]
    pool: Name
    parameters: dict[str, Any] = {}
    counts: dict[Name, Annotated[int, Field(ge=0, le=100_000)]] = {}
    pools: dict[Name, Name] = {}  # group -> pool, where it is not `pool`
    roles: dict[str, RoleSpec]
    bundle: str


class NodeItem(_Body):
    name: Name
    group: Name
    roles: list[Name]
    pool: Name
    address: Annotated[str, Field(max_length=64)] | None = None
    state: Literal["planned", "provisioning", "provisioned", "failed", "leaving"] | None = None


class NodesRequest(_Body):
    nodes: list[NodeItem]


class TokensRequest(_Body):
    nodes: list[Name]
    ttl: Annotated[float, Field(gt=0, le=7 * 86400)] = 3600.0


class RoleUpdate(_Body):
    node: Name
    role: Name
    op: Literal["release", "refresh", "verified", "verify_failed", "drain", "check"]
    message: Annotated[str, Field(max_length=64 * 1024)] | None = None


class RolesRequest(_Body):
    updates: list[RoleUpdate]


class AutoscalingSetting(_Body):
    enabled: bool
    every: Annotated[float, Field(gt=0, le=86400)] = 60.0


Text = Annotated[str, Field(max_length=4096)]


class DecisionRecord(_Body):
    group: Name
    at: float
    metric: float | None = None
    current: Annotated[int, Field(ge=0)]
    desired: Annotated[int, Field(ge=0)]
    target: Annotated[int, Field(ge=0)]
    action: Literal["grow", "shrink", "none"]
    reason: Text
    outcome: Text | None = None
    flow_run: Annotated[str, Field(max_length=64)] | None = None
    last_scale_up: float | None = None
    low_since: float | None = None


class Outcome(_Body):
    outcome: Text


@dataclass(frozen=True)
class NodeCaller:
    cluster: str
    node: str
    roles: tuple[str, ...]


class Waiters:
    """Wake long polls by key (a node, a cluster) when something they may care about changed."""

    def __init__(self) -> None:
        self._waiting: dict[Any, set[asyncio.Future[None]]] = defaultdict(set)

    def notify(self, key: Any) -> None:
        for fut in self._waiting.pop(key, ()):
            if not fut.done():
                fut.set_result(None)

    async def wait_until(self, key: Any, ready: Callable[[], bool], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            left = deadline - loop.time()
            if left <= 0:
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiting[key].add(fut)
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                return
            finally:
                self._waiting.get(key, set()).discard(fut)


class BodyLimit:
    """Refuse oversized bodies before they are read whole (413), chunked ones included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_ADMIN_BODY if scope["path"].startswith("/v1/admin/") else MAX_BODY
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await _too_large(send, limit)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # raised inside FastAPI's body reading: an HTTPException is passed through
                raise HTTPException(413, f"request body over {limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail": "request body over {limit} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    store: Store,
    ca: CertificateAuthority,
    *,
    node_ttl: timedelta = NODE_CERT_TTL,
    rejoin_grace: timedelta = REJOIN_GRACE,
) -> FastAPI:
    node_waiters, cluster_waiters = Waiters(), Waiters()
    identities: OrderedDict[bytes, tuple[str, str, str, tuple[str, ...]] | None] = OrderedDict()
    # serial -> the node's current roles, or None when the certificate is not current: every
    # node request asks, so it is kept in memory and dropped whenever certificates or a node's
    # roles change (enrolment, nodes, tokens, deletion)
    current_roles: dict[str, tuple[str, ...] | None] = {}

    ends: dict[str, float] = {}  # serial -> when the certificate ends (Unix time)

    def forget_identities() -> None:
        identities.clear()
        current_roles.clear()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        store.engine.dispose()

    app = FastAPI(title="crv service", version="1", lifespan=lifespan, docs_url=None)
    app.add_middleware(BodyLimit)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        if exc.status in (401, 403):
            log.warning("refused %s %s: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": "1"} if exc.status == 409 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """400, except a body field over its length (characters, items): 413, as for a body
        or a value over its size in bytes, so that one limit gets one answer however it is
        counted."""
        errors = exc.errors()
        too_long = [
            e
            for e in errors
            if e.get("type") in ("string_too_long", "too_long") and e.get("loc", ("",))[0] == "body"
        ]
        first = too_long[0] if too_long else errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            {"detail": f"{where}: {first.get('msg', 'invalid request')}"},
            status_code=413 if too_long else 400,
        )

    def peer(request: Request) -> x509.Certificate | None:
        der: bytes | None = getattr(request.state, "tls_peer_cert", None)
        return x509.load_der_x509_certificate(der) if der else None

    def _identity(der: bytes) -> tuple[str, str, str, tuple[str, ...]] | None:
        """(serial, cluster, node, roles) of a node certificate, None for anything else;
        cached by the certificate's bytes (agents reuse one connection and one certificate)."""
        if der in identities:
            identities.move_to_end(der)
            return identities[der]
        cert = x509.load_der_x509_certificate(der)
        serial = format(cert.serial_number, "x")
        try:
            cluster, node, roles = node_identity(cert)
            ident: tuple[str, str, str, tuple[str, ...]] | None = (serial, cluster, node, roles)
            ends[serial] = cert.not_valid_after_utc.timestamp()
        except PkiError:
            ident = None
        identities[der] = ident
        if len(identities) > 20_000:
            identities.popitem(last=False)
        if len(ends) > 40_000:  # renewals add serials: start afresh (both refill on use)
            identities.clear()
            ends.clear()
        return ident

    async def node_caller(request: Request) -> NodeCaller:
        der: bytes | None = getattr(request.state, "tls_peer_cert", None)
        if not der:
            raise StoreError(401, "a node certificate is required")
        ident = _identity(der)
        if ident is None:
            raise StoreError(403, "not a node certificate")
        serial, cluster, node, cert_roles = ident
        if time.time() > ends.get(serial, 0.0):
            # TLS checks the dates at the handshake only: a connection opened before the end
            # would go on; 401 'expired' tells the agent to re-join
            raise StoreError(401, f"certificate {serial} of {cluster}/{node} has expired")
        if serial in current_roles:
            current = current_roles[serial]
        else:
            if len(current_roles) > 20_000:
                current_roles.clear()
            current, superseded = store.current_roles(serial, cluster, node)
            for old in superseded:  # a renewed node's first call with its new certificate
                current_roles.pop(old, None)
            current_roles[serial] = current
        if current is None:
            raise StoreError(403, f"certificate {serial} of {cluster}/{node} is not current")
        # the plan decides today's roles; the certificate can only narrow them
        return NodeCaller(cluster, node, tuple(r for r in cert_roles if r in current))

    async def admin(request: Request) -> None:
        cert = peer(request)
        if cert is None:
            raise StoreError(401, "an admin certificate is required")
        if not is_admin(cert):
            raise StoreError(403, "admin routes need the admin certificate")

    Node = Annotated[NodeCaller, Depends(node_caller)]
    Admin = Depends(admin)

    # -- public -----------------------------------------------------------------------------

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "ca_sha256": ca.fingerprint_sha256,
            "node_cert_ttl": node_ttl.total_seconds(),
        }

    @app.get("/v1/agent")
    async def agent_program() -> Response:
        """The agent program (one stdlib-only file), for machines that fetch it at first boot
        (cloud user-data, pools/cloudinit.py) and check it against the SHA-256 their pool
        pinned."""
        return Response(AGENT.read_bytes(), media_type="text/x-python")

    @app.get("/v1/ca")
    async def ca_certificate() -> Response:
        """Public, as a CA certificate is. A machine whose bootstrap channel is too small for it
        (a kernel command line) fetches it here and trusts it only if its SHA-256 matches the
        fingerprint that channel carried."""
        return Response(ca.certificate_pem, media_type="application/x-pem-file")

    cluster_cas: dict[str, CertificateAuthority] = {}

    def cluster_ca(cluster: str, *, create: bool = True) -> CertificateAuthority | None:
        """The CA that signs the cluster's node certificates (its own intermediate)."""
        found = cluster_cas.get(cluster)
        if found is None:
            found = ca.cluster_ca(cluster, create=create)
            if found is not None:
                cluster_cas[cluster] = found
        return found

    def crl_pem(
        authority: CertificateAuthority,
        revoked: list[tuple[int, datetime]],
        next_update: timedelta = timedelta(days=1),
    ) -> bytes:
        crl = authority.build_crl(revoked, crl_number=len(revoked), next_update=next_update)
        return crl.public_bytes(serialization.Encoding.PEM)

    @app.get("/v1/crl")
    async def crl(
        cluster: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    ) -> Response:
        """The CRLs, one per issuer, in one PEM file: the root's (the CAs of deleted
        clusters), then each cluster CA's (its revoked node certificates), then the last CRL
        each deleted cluster's CA signed before its key was deleted. `?cluster=C`: only C's."""
        if cluster is not None:
            authority = cluster_ca(cluster, create=False)
            if authority is None:
                raise StoreError(404, f"no CA for cluster {cluster!r}")
            pem = crl_pem(authority, store.revoked(cluster))
            return Response(pem, media_type="application/pkix-crl")
        root = ca.retired() + ([] if ca.per_cluster else store.revoked())
        parts = [crl_pem(ca, root)]
        for name, authority in ca.cluster_cas().items():
            if authority is not ca:
                parts.append(crl_pem(authority, store.revoked(name)))
        parts += ca.final_crls()
        return Response(b"".join(parts), media_type="application/pkix-crl")

    def signer(csr: str) -> Callable[[Enrolment], Issued]:
        def sign(e: Enrolment) -> Issued:
            authority = cluster_ca(e.cluster)
            assert authority is not None
            cert = authority.sign_node_csr(
                csr.encode(),
                cluster=e.cluster,
                node=e.node,
                roles=e.roles,
                addresses=[e.address] if e.address else [],
                ttl=node_ttl,
            )
            # the node sends its CA with its certificate: peers and the service trust the root
            chain = b"" if authority is ca else authority.certificate_pem
            pem = (cert.public_bytes(serialization.Encoding.PEM) + chain).decode()
            return Issued(format(cert.serial_number, "x"), cert.not_valid_after_utc, pem)

        return sign

    def issued(cluster: str, pem: str) -> dict[str, Any]:
        """The answer to enrol, renew and re-join: the certificate followed by its cluster's
        CA, the root, and the cluster's CA bundle (for its daemons: CRV_CLUSTER_CA_FILE).
        `expires_in` (seconds) lets the agent time its renewal on its own clock, whatever the
        difference between the two clocks."""
        end = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc
        left = (end - datetime.now(timezone.utc)).total_seconds()
        authority = cluster_ca(cluster)
        assert authority is not None
        return {
            "certificate": pem,
            "ca": ca.certificate_pem.decode(),
            "cluster_ca": authority.chain_pem.decode(),
            "expires_in": left,
        }

    @app.post("/v1/enrol")
    async def enrol(body: EnrolRequest) -> dict[str, Any]:
        digest = hashlib.sha256(body.csr.encode()).hexdigest()
        try:
            pem, revoked = store.enrol(
                body.cluster, body.node, body.token, digest, signer(body.csr)
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
            forget_identities()
        log.info("enrolled %s/%s", body.cluster, body.node)
        cluster_waiters.notify(body.cluster)
        return issued(body.cluster, pem)

    @app.post("/v1/pair")
    async def pair(body: PairRequest) -> dict[str, Any]:
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
            cluster, node, pem, revoked = store.pair(
                body.pin, digest, body.address, signer(body.csr)
            )
        except WrongPin:
            await asyncio.sleep(WRONG_PIN_DELAY)
            raise
        except PkiError as e:
            log.warning("pairing refused: %s", e)
            raise StoreError(400, str(e)) from None
        if revoked:
            forget_identities()
        log.info("paired %s/%s%s", cluster, node, f" at {body.address}" if body.address else "")
        cluster_waiters.notify(cluster)
        return {**issued(cluster, pem), "cluster": cluster, "node": node}

    @app.post("/v1/renew")
    async def renew(request: Request, caller: Node, body: RenewRequest) -> dict[str, Any]:
        """A new certificate for the caller's node and roles, for a key it made (mutual TLS
        with its current certificate proves who asks; the CSR that it holds the new key)."""
        ident = _identity(request.state.tls_peer_cert)
        assert ident is not None  # node_caller checked it
        serial = ident[0]
        try:
            new = store.renew(caller.cluster, caller.node, serial, signer(body.csr))
        except PkiError as e:
            log.warning("renewal of %s/%s refused: %s", caller.cluster, caller.node, e)
            raise StoreError(400, str(e)) from None
        log.info("renewed %s/%s: %s supersedes %s", caller.cluster, caller.node, new.serial, serial)
        cluster_waiters.notify(caller.cluster)
        return issued(caller.cluster, new.pem)

    @app.post("/v1/rejoin")
    async def rejoin(body: RejoinRequest) -> dict[str, Any]:
        """A member whose certificate ended while it was off, suspended or cut off comes back
        without a token: it shows its last certificate (issued by this CA to this node, never
        revoked, ended less than the grace period ago) and proves it holds that certificate's
        key by signing its new CSR with it (docs/pki.md, "Re-joining")."""
        where = f"{body.cluster}/{body.node}"
        try:
            serial = _check_rejoin(body)
        except PkiError as e:
            log.warning("re-join of %s refused: %s", where, e)
            raise StoreError(403, f"re-join of {where} refused: {e}") from None
        try:
            new = store.rejoin(
                body.cluster, body.node, serial, signer(body.csr), grace=rejoin_grace
            )
        except PkiError as e:  # the new CSR
            log.warning("re-join of %s refused: %s", where, e)
            raise StoreError(400, f"re-join of {where} refused: {e}") from None
        except StoreError as e:  # the node proved who it is, but may no longer come back
            log.warning("%s", e)
            store.refused(body.cluster, body.node, str(e))
            cluster_waiters.notify(body.cluster)
            raise
        log.info("re-joined %s with certificate %s", where, new.serial)
        cluster_waiters.notify(body.cluster)
        return issued(body.cluster, new.pem)

    def _check_rejoin(body: RejoinRequest) -> str:
        """The serial of the certificate the node showed, once the CA's signature on it, its
        identity and the node's signature with its key are checked."""
        authority = cluster_ca(body.cluster, create=False)
        if authority is None:
            raise PkiError(f"cluster {body.cluster} has no CA (deleted?)")
        try:  # the first certificate of the file: the node's own
            cert = x509.load_pem_x509_certificate(body.certificate.encode())
            cert.verify_directly_issued_by(authority.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise PkiError("the certificate shown was not issued by its cluster's CA") from None
        serial = format(cert.serial_number, "x")
        if node_identity(cert)[:2] != (body.cluster, body.node):
            raise PkiError(f"certificate {serial} is not {body.cluster}/{body.node}'s")
        key = cert.public_key()
        try:
            signature = base64.b64decode(body.signature, validate=True)
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise InvalidSignature
            message = REJOIN_CONTEXT + body.csr.encode()
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (binascii.Error, ValueError, InvalidSignature):
            raise PkiError(f"no proof of possession of certificate {serial}'s key") from None
        return serial

    # -- nodes ------------------------------------------------------------------------------

    @app.get("/v1/work")
    async def work(
        caller: Node,
        after: Annotated[int, Query(ge=0)] = 0,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0,
    ) -> dict[str, Any]:
        key = (caller.cluster, caller.node)
        store.touch(*key)
        first = store.work(*key)
        if first["generation"] > after or wait <= 0:
            return first

        def changed() -> bool:
            gen = store.generation(*key)
            return gen is None or gen > after

        await node_waiters.wait_until(key, changed, wait)
        return store.work(*key)

    @app.post("/v1/alive", status_code=204)
    async def alive(caller: Node) -> None:
        """A heartbeat from an agent busy running a recipe (it does not poll meanwhile): a
        change waiting on the node tells a long recipe from a node that is gone."""
        store.touch(caller.cluster, caller.node, every=ALIVE_EVERY)

    @app.get("/v1/recipes")
    async def recipes(caller: Node) -> Response:
        row = store.require_cluster(caller.cluster)
        return Response(
            row.bundle, media_type="application/gzip", headers={"X-Crv-Bundle": row.bundle_digest}
        )

    def _readable_roles(caller: NodeCaller) -> set[str]:
        spec = store.require_cluster(caller.cluster).roles
        readable = set(caller.roles)
        for role in caller.roles:
            readable.update(d["role"] for d in spec.get(role, {}).get("depends_on", ()))
        return readable

    @app.put("/v1/attributes/{role}/{key}", status_code=204)
    async def set_attribute(
        caller: Node,
        role: RolePath,
        key: KeyPath,
        body: AttributeValue,
    ) -> None:
        if role not in caller.roles:
            raise StoreError(403, f"{caller.node} does not host role {role!r}")
        if "\x00" in body.value:
            raise StoreError(400, "value: contains a NUL character")
        if len(body.value.encode()) > MAX_VALUE:
            raise StoreError(413, f"value: more than {MAX_VALUE} bytes")
        store.set_attribute(caller.cluster, caller.node, role, key, body.value)

    @app.get("/v1/attributes/{role}/{key}")
    async def get_attribute(
        caller: Node,
        role: RolePath,
        key: KeyPath,
    ) -> dict[str, Any]:
        if role not in _readable_roles(caller):
            raise StoreError(403, f"{caller.node} neither hosts nor depends on role {role!r}")
        values = store.get_attribute(caller.cluster, role, key)
        return {"role": role, "key": key, "values": [{"node": n, "value": v} for n, v in values]}

    @app.post("/v1/status", status_code=204)
    async def status_report(caller: Node, body: StatusReport) -> None:
        if body.role not in caller.roles:
            raise StoreError(403, f"{caller.node} does not host role {body.role!r}")
        store.report_status(
            caller.cluster,
            caller.node,
            body.role,
            release=body.release,
            state=body.state,
            exit_code=body.exit_code,
            output=body.output,
        )
        log.info("%s/%s %s: %s", caller.cluster, caller.node, body.role, body.state)
        cluster_waiters.notify(caller.cluster)

    @app.post("/v1/check", status_code=204)
    async def check_report(caller: Node, body: CheckReport) -> None:
        """The result of a verify the node's agent ran (`verify: {on_node: ...}`)."""
        if body.role not in caller.roles:
            raise StoreError(403, f"{caller.node} does not host role {body.role!r}")
        store.report_check(
            caller.cluster, caller.node, body.role,
            check=body.check, exit_code=body.exit_code, output=body.output,
        )  # fmt: skip
        cluster_waiters.notify(caller.cluster)

    # -- admin ------------------------------------------------------------------------------

    @app.get("/v1/admin/clusters", dependencies=[Admin])
    async def list_clusters() -> dict[str, Any]:
        return {"clusters": store.list_clusters()}

    @app.put("/v1/admin/clusters/{cluster}", dependencies=[Admin])
    async def put_cluster(cluster: ClusterPath, body: ClusterSpec) -> dict[str, str]:
        try:
            bundle = base64.b64decode(body.bundle, validate=True)
        except (binascii.Error, ValueError):
            raise StoreError(400, "bundle: not base64") from None
        for role, spec in body.roles.items():
            for dep in spec.depends_on:
                if dep.role not in body.roles:
                    raise StoreError(400, f"roles.{role}.depends_on: unknown role {dep.role!r}")
        digest, changed = store.put_cluster(
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
            await _wake_cluster_nodes(cluster)
        return {"name": cluster, "bundle": digest}

    async def _wake_cluster_nodes(cluster: str) -> None:
        for node in store.node_names(cluster):
            node_waiters.notify((cluster, node))

    @app.get("/v1/admin/clusters/{cluster}", dependencies=[Admin])
    async def cluster_status(cluster: str) -> dict[str, Any]:
        return store.status(cluster)

    @app.put("/v1/admin/clusters/{cluster}/nodes", dependencies=[Admin])
    async def put_nodes(cluster: str, body: NodesRequest) -> dict[str, int]:
        store.require_cluster(cluster)
        changed = store.put_nodes(cluster, [n.model_dump() for n in body.nodes])
        current_roles.clear()
        for node in changed:
            node_waiters.notify((cluster, node))
        cluster_waiters.notify(cluster)
        return {"nodes": len(body.nodes)}

    @app.post("/v1/admin/clusters/{cluster}/tokens", dependencies=[Admin])
    async def tokens(cluster: str, body: TokensRequest) -> dict[str, dict[str, str]]:
        store.require_cluster(cluster)
        current_roles.clear()
        return {"tokens": store.issue_tokens(cluster, body.nodes, timedelta(seconds=body.ttl))}

    @app.post("/v1/admin/clusters/{cluster}/roles", dependencies=[Admin])
    async def roles(cluster: str, body: RolesRequest) -> dict[str, Any]:
        results, woken = store.update_roles(cluster, [u.model_dump() for u in body.updates])
        for node in woken:
            node_waiters.notify((cluster, node))
        cluster_waiters.notify(cluster)
        return {"results": results}

    @app.post("/v1/admin/clusters/{cluster}/pairings", dependencies=[Admin])
    async def create_pairing(cluster: ClusterPath, body: PairingRequest) -> dict[str, Any]:
        """A one-time PIN for a machine to join `group` (`crv pair`), with the fingerprint of
        the CA the machine's agent pins."""
        made = store.create_pairing(cluster, body.group, body.roles, timedelta(seconds=body.ttl))
        log.info("pairing %s opened for %s group %s", made["id"], cluster, body.group)
        return {**made, "ca_sha256": ca.fingerprint_sha256}

    @app.get("/v1/admin/pairings/{ident}", dependencies=[Admin])
    async def pairing(ident: Annotated[str, PathParam(pattern="^[0-9a-f]{16}$")]) -> dict[str, Any]:
        return store.pairing(ident)

    @app.get("/v1/admin/clusters/{cluster}/liveness", dependencies=[Admin])
    async def liveness(cluster: ClusterPath) -> dict[str, Any]:
        """When each node's agent last called and when its certificate ends: a change waiting
        on a node that went quiet fails fast, saying why (crv.engine.stages.Mirror)."""
        store.require_cluster(cluster)
        return {"nodes": store.liveness(cluster)}

    @app.get("/v1/admin/clusters/{cluster}/attributes/{role}/{key}", dependencies=[Admin])
    async def attribute_readings(cluster: str, role: RolePath, key: KeyPath) -> dict[str, Any]:
        """Every node's value of a role's attribute with its age: the autoscale flow's
        blackboard metric."""
        store.require_cluster(cluster)
        readings = store.attribute_readings(cluster, role, key)
        return {
            "role": role,
            "key": key,
            "values": [{"node": n, "value": v, "age": age} for n, v, age in readings],
        }

    @app.get("/v1/admin/autoscaling", dependencies=[Admin])
    async def autoscaling_all() -> dict[str, Any]:
        """Every cluster's autoscaling setting: the serve process makes the `autoscale/<cluster>`
        deployments match it."""
        return {"clusters": store.autoscaling()}

    @app.get("/v1/admin/clusters/{cluster}/autoscaling", dependencies=[Admin])
    async def autoscaling(cluster: str) -> dict[str, Any]:
        store.require_cluster(cluster)
        found = store.autoscaling(cluster)
        return found[0] if found else {"cluster": cluster, "enabled": False, "every": None}

    @app.put("/v1/admin/clusters/{cluster}/autoscaling", dependencies=[Admin])
    async def put_autoscaling(cluster: str, body: AutoscalingSetting) -> dict[str, Any]:
        return store.put_autoscaling(cluster, body.enabled, body.every)

    @app.post("/v1/admin/clusters/{cluster}/decisions", dependencies=[Admin])
    async def add_decision(cluster: str, body: DecisionRecord) -> dict[str, int]:
        return {"seq": store.add_decision(cluster, body.model_dump())}

    @app.patch(
        "/v1/admin/clusters/{cluster}/decisions/{seq}", status_code=204, dependencies=[Admin]
    )
    async def set_outcome(cluster: str, seq: int, body: Outcome) -> None:
        store.set_outcome(cluster, seq, body.outcome)

    @app.get("/v1/admin/clusters/{cluster}/decisions", dependencies=[Admin])
    async def list_decisions(
        cluster: str,
        group: Annotated[str | None, Query(max_length=63)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> dict[str, Any]:
        """The newest decisions first."""
        store.require_cluster(cluster)
        return {"decisions": store.decisions(cluster, group, limit)}

    @app.get("/v1/admin/clusters/{cluster}/events", dependencies=[Admin])
    async def cluster_events(
        cluster: str,
        after: Annotated[int, Query(ge=0)] = 0,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0,
    ) -> dict[str, Any]:
        await cluster_waiters.wait_until(cluster, lambda: store.last_event(cluster) > after, wait)
        found = store.events_after(cluster, after)
        return {"last": found[-1]["seq"] if found else after, "events": found}

    async def _forget(cluster: str, delete: Callable[[], list[str]]) -> dict[str, list[str]]:
        revoked = delete()
        forget_identities()
        cluster_waiters.notify(cluster)
        return {"revoked": revoked}

    @app.delete("/v1/admin/clusters/{cluster}/nodes/{node}", dependencies=[Admin])
    async def delete_node(cluster: str, node: str) -> dict[str, list[str]]:
        result = await _forget(cluster, lambda: store.delete_node(cluster, node))
        node_waiters.notify((cluster, node))
        return result

    @app.delete("/v1/admin/clusters/{cluster}", dependencies=[Admin])
    async def delete_cluster(cluster: str) -> dict[str, list[str]]:
        nodes = store.node_names(cluster)
        result = await _forget(cluster, lambda: store.delete_cluster(cluster))
        # its CA signs a last CRL (every node certificate revoked), then loses its key
        authority = cluster_cas.pop(cluster, None) or cluster_ca(cluster, create=False)
        if authority is not None and authority is not ca:
            last = crl_pem(authority, store.revoked(cluster), next_update=timedelta(days=3650))
            ca.retire_cluster_ca(cluster, last_crl=last)
        for node in nodes:
            node_waiters.notify((cluster, node))
        return result

    return app


__all__ = ["create_app"]
