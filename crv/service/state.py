"""What the service's routes share: the store, the CA, the long-poll waiters and the caches of
who a certificate names, and the FastAPI dependencies that tell a node from the admin.

Authorization is by TLS client certificate only (docs/service-api.md): the handshake has already
checked the chain, so a route reads the identity this CA wrote into the URI SANs and then asks
the store whether that certificate is still current (revocation takes effect on the next
request).
"""

import asyncio
import base64
import binascii
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, Request

from crv.base.errors import PkiError
from crv.service.models import RejoinRequest
from crv.service.pki import CertificateAuthority, is_admin, node_identity
from crv.service.store import Enrolment, Issued, Store, StoreError

# what a re-joining node signs with its last key, ahead of its new CSR (the CSR binds the
# signature to the one key the new certificate may certify; the prefix to this use)
REJOIN_CONTEXT = b"crv-rejoin-v1\x00"

Identity = tuple[str, str, str, tuple[str, ...]]  # serial, cluster, node, roles


@dataclass(frozen=True)
class NodeCaller:
    cluster: str
    node: str
    roles: tuple[str, ...]


class Waiters:
    """Wake long polls by key (a node, a cluster) when something they may care about changed:
    an agent hears about a release within milliseconds, and an idle one costs nothing."""

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


class ServiceState:
    """One per app (`app.state.crv`)."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        node_ttl: timedelta,
        rejoin_grace: timedelta,
    ) -> None:
        self.store = store
        self.ca = ca
        self.node_ttl = node_ttl
        self.rejoin_grace = rejoin_grace
        self.node_waiters = Waiters()
        self.cluster_waiters = Waiters()
        self.identities: OrderedDict[bytes, Identity | None] = OrderedDict()
        # serial -> the node's current roles, or None when the certificate is not current:
        # every node request asks, so it is kept in memory and dropped whenever certificates or
        # a node's roles change (enrolment, nodes, tokens, deletion)
        self.current_roles: dict[str, tuple[str, ...] | None] = {}
        self.ends: dict[str, float] = {}  # serial -> when the certificate ends (Unix time)
        self.cluster_cas: dict[str, CertificateAuthority] = {}

    def forget_identities(self) -> None:
        self.identities.clear()
        self.current_roles.clear()

    # -- who calls ------------------------------------------------------------------------------

    def identity(self, der: bytes) -> Identity | None:
        """(serial, cluster, node, roles) of a node certificate, None for anything else;
        cached by the certificate's bytes (agents reuse one connection and one certificate)."""
        if der in self.identities:
            self.identities.move_to_end(der)
            return self.identities[der]
        cert = x509.load_der_x509_certificate(der)
        serial = format(cert.serial_number, "x")
        try:
            cluster, node, roles = node_identity(cert)
            ident: Identity | None = (serial, cluster, node, roles)
            self.ends[serial] = cert.not_valid_after_utc.timestamp()
        except PkiError:
            ident = None
        self.identities[der] = ident
        if len(self.identities) > 20_000:
            self.identities.popitem(last=False)
        if len(self.ends) > 40_000:  # renewals add serials: start afresh (both refill on use)
            self.identities.clear()
            self.ends.clear()
        return ident

    def node_caller(self, der: bytes | None) -> NodeCaller:
        if not der:
            raise StoreError(401, "a node certificate is required")
        ident = self.identity(der)
        if ident is None:
            raise StoreError(403, "not a node certificate")
        serial, cluster, node, cert_roles = ident
        if time.time() > self.ends.get(serial, 0.0):
            # TLS checks the dates at the handshake only: a connection opened before the end
            # would go on; 401 'expired' tells the agent to re-join
            raise StoreError(401, f"certificate {serial} of {cluster}/{node} has expired")
        if serial in self.current_roles:
            current = self.current_roles[serial]
        else:
            if len(self.current_roles) > 20_000:
                self.current_roles.clear()
            current, superseded = self.store.current_roles(serial, cluster, node)
            for old in superseded:  # a renewed node's first call with its new certificate
                self.current_roles.pop(old, None)
            self.current_roles[serial] = current
        if current is None:
            raise StoreError(403, f"certificate {serial} of {cluster}/{node} is not current")
        # the plan decides today's roles; the certificate can only narrow them
        return NodeCaller(cluster, node, tuple(r for r in cert_roles if r in current))

    def readable_roles(self, caller: NodeCaller) -> set[str]:
        """The roles a node may read attributes of: its own and those they depend on."""
        spec = self.store.require_cluster(caller.cluster).roles
        readable = set(caller.roles)
        for role in caller.roles:
            readable.update(d["role"] for d in spec.get(role, {}).get("depends_on", ()))
        return readable

    # -- certificates ---------------------------------------------------------------------------

    def cluster_ca(self, cluster: str, *, create: bool = True) -> CertificateAuthority | None:
        """The CA that signs the cluster's node certificates (its own intermediate)."""
        found = self.cluster_cas.get(cluster)
        if found is None:
            found = self.ca.cluster_ca(cluster, create=create)
            if found is not None:
                self.cluster_cas[cluster] = found
        return found

    @staticmethod
    def crl_pem(
        authority: CertificateAuthority,
        revoked: list[tuple[int, datetime]],
        next_update: timedelta = timedelta(days=1),
    ) -> bytes:
        crl = authority.build_crl(revoked, crl_number=len(revoked), next_update=next_update)
        return crl.public_bytes(serialization.Encoding.PEM)

    def signer(self, csr: str) -> Callable[[Enrolment], Issued]:
        def sign(e: Enrolment) -> Issued:
            authority = self.cluster_ca(e.cluster)
            assert authority is not None
            cert = authority.sign_node_csr(
                csr.encode(),
                cluster=e.cluster,
                node=e.node,
                roles=e.roles,
                addresses=[e.address] if e.address else [],
                ttl=self.node_ttl,
            )
            # the node sends its CA with its certificate: peers and the service trust the root
            chain = b"" if authority is self.ca else authority.certificate_pem
            pem = (cert.public_bytes(serialization.Encoding.PEM) + chain).decode()
            return Issued(format(cert.serial_number, "x"), cert.not_valid_after_utc, pem)

        return sign

    def issued(self, cluster: str, pem: str) -> dict[str, Any]:
        """The answer to enrol, renew and re-join: the certificate followed by its cluster's
        CA, the root, and the cluster's CA bundle (for its daemons: CRV_CLUSTER_CA_FILE).
        `expires_in` (seconds) lets the agent time its renewal on its own clock, whatever the
        difference between the two clocks."""
        end = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc
        left = (end - datetime.now(timezone.utc)).total_seconds()
        authority = self.cluster_ca(cluster)
        assert authority is not None
        return {
            "certificate": pem,
            "ca": self.ca.certificate_pem.decode(),
            "cluster_ca": authority.chain_pem.decode(),
            "expires_in": left,
        }

    def check_rejoin(self, body: RejoinRequest) -> str:
        """The serial of the certificate the node showed, once the CA's signature on it, its
        identity and the node's signature with its key are checked."""
        authority = self.cluster_ca(body.cluster, create=False)
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

    # -- waking long polls ----------------------------------------------------------------------

    def wake_cluster_nodes(self, cluster: str) -> None:
        for node in self.store.node_names(cluster):
            self.node_waiters.notify((cluster, node))

    def forget(self, cluster: str, delete: Callable[[], list[str]]) -> dict[str, list[str]]:
        revoked = delete()
        self.forget_identities()
        self.cluster_waiters.notify(cluster)
        return {"revoked": revoked}


# -- FastAPI dependencies ---------------------------------------------------------------------


def service(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.crv
    return state


Svc = Annotated[ServiceState, Depends(service)]


async def node_caller(request: Request, svc: Svc) -> NodeCaller:
    """The node a request comes from, by its current certificate (401/403 otherwise)."""
    return svc.node_caller(getattr(request.state, "tls_peer_cert", None))


async def admin(request: Request) -> None:
    der: bytes | None = getattr(request.state, "tls_peer_cert", None)
    if not der:
        raise StoreError(401, "an admin certificate is required")
    if not is_admin(x509.load_der_x509_certificate(der)):
        raise StoreError(403, "admin routes need the admin certificate")


Node = Annotated[NodeCaller, Depends(node_caller)]
Admin = Depends(admin)
