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
import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, ParamSpec, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, Request

from crv.base.errors import PkiError
from crv.service.models import RejoinRequest
from crv.service.pki import CertificateAuthority, is_admin, node_identity
from crv.service.store import Enrolment, Issued, Store, StoreError
from crv.service.wakeups import Bus, Message, Waiters

P = ParamSpec("P")
T = TypeVar("T")

# what a re-joining node signs with its last key, ahead of its new CSR (the CSR binds the
# signature to the one key the new certificate may certify; the prefix to this use)
REJOIN_CONTEXT = b"crv-rejoin-v1\x00"

Identity = tuple[str, str, str, tuple[str, ...]]  # serial, cluster, node, roles


@dataclass(frozen=True)
class NodeCaller:
    cluster: str
    node: str
    roles: tuple[str, ...]


ANSWER_TTL = 1.0  # seconds a hot read's answer is reused at most (also dropped on any change)


class Answers:
    """Recent answers of the hot reads (an agent's poll, a blackboard read), per cluster, for
    at most ANSWER_TTL seconds, and dropped as soon as anything of their cluster changes here or
    in another service process: agents polling a steady cluster cost no store call.

    A read takes the cluster's version before it goes to the store; its answer is kept only if
    no change came in meanwhile (a change committed during the read is never hidden)."""

    def __init__(self, ttl: float = ANSWER_TTL, most: int = 50_000) -> None:
        self.ttl, self.most = ttl, most
        self._kept: dict[str, dict[Any, tuple[float, Any]]] = {}
        self._versions: dict[str, int] = {}
        self._size = 0

    def get(self, cluster: str, key: Any) -> Any:
        entry = self._kept.get(cluster, {}).get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def version(self, cluster: str) -> int:
        return self._versions.get(cluster, 0)

    def put(self, cluster: str, key: Any, value: Any, version: int) -> None:
        if version != self.version(cluster):
            return
        if self._size >= self.most:
            self.drop()
        self._kept.setdefault(cluster, {})[key] = (time.monotonic() + self.ttl, value)
        self._size += 1

    def drop(self, cluster: str | None = None) -> None:
        if cluster is None:
            for name in self._kept:
                self._versions[name] = self.version(name) + 1
            self._kept.clear()
            self._size = 0
            return
        self._versions[cluster] = self.version(cluster) + 1
        self._size -= len(self._kept.pop(cluster, {}))


class ServiceState:
    """One per app (`app.state.crv`), so one per service process.

    The store's calls run on worker threads (`db`), never on the event loop: one thread on
    SQLite (its single writer; the calls stay in the order the loop made them), several on
    PostgreSQL. Changes wake long polls here and, through the bus, in the other processes."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        node_ttl: timedelta,
        rejoin_grace: timedelta,
        *,
        threads: int = 1,
    ) -> None:
        self.store = store
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="crv-store")
        self.bus: Bus | None = None
        self.processes = 1  # service processes in all (health)
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
        # cluster -> its roles' spec (who may read whose attributes), dropped when it changes
        self.cluster_roles: dict[str, dict[str, Any]] = {}
        self.work_answers = Answers()  # (cluster) node -> its /v1/work answer
        self.attribute_answers = Answers()  # (cluster) (role, key) -> the values

    async def db(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`call(*args, **kwargs)` (a store method) on a store thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(call, *args, **kwargs))

    # -- telling this process and the others ----------------------------------------------------

    def _tell(self, message: Message) -> None:
        self.deliver(message)
        if self.bus is not None:
            self.bus.publish(message)

    def deliver(self, message: Message) -> None:
        """Act on a change made here or in another service process."""
        kind, names = message[0], message[1:]
        if kind == "all":
            self.work_answers.drop()
            self.attribute_answers.drop()
        elif kind != "forget" or names:  # anything of these clusters may have changed
            cluster = names[0] if kind != "forget" else None
            for name in [cluster] if cluster is not None else names:
                self.work_answers.drop(name)
                self.attribute_answers.drop(name)
        if kind == "node":
            self.node_waiters.notify((names[0], names[1]))
        elif kind == "nodes":  # every node of the cluster (its bundle or spec changed)
            self.node_waiters.notify_where(lambda key: key[0] == names[0])
            self.cluster_roles.pop(names[0], None)
        elif kind == "cluster":
            self.cluster_waiters.notify(names[0])
        elif kind == "forget":  # certificates or roles changed: who may call is asked again
            self.identities.clear()
            self.current_roles.clear()
            for cluster in names:  # its spec changed or it is gone (its CA with it)
                self.cluster_roles.pop(cluster, None)
                self.cluster_cas.pop(cluster, None)
        elif kind == "all":  # notifications may have been missed: wake and forget everything
            self.node_waiters.notify_all()
            self.cluster_waiters.notify_all()
            self.identities.clear()
            self.current_roles.clear()
            self.cluster_roles.clear()
            self.cluster_cas.clear()

    def wake_node(self, cluster: str, node: str) -> None:
        self._tell(["node", cluster, node])

    def wake_nodes(self, cluster: str) -> None:
        """The cluster's spec changed: every node's poll answers, who reads what is asked again."""
        self._tell(["nodes", cluster])

    def wake_cluster(self, cluster: str) -> None:
        self._tell(["cluster", cluster])

    def attributes_changed(self, cluster: str) -> None:
        """An attribute was set: every process reads the cluster's attributes again."""
        self._tell(["attributes", cluster])

    def forget_identities(self, *clusters: str) -> None:
        """Certificates or a node's roles changed (and the specs of `clusters`): every process
        asks the store again who may call."""
        self._tell(["forget", *clusters])

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

    async def node_caller(self, der: bytes | None) -> NodeCaller:
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
            current, superseded = await self.db(self.store.current_roles, serial, cluster, node)
            for old in superseded:  # a renewed node's first call with its new certificate
                self.current_roles.pop(old, None)
            self.current_roles[serial] = current
        if current is None:
            raise StoreError(403, f"certificate {serial} of {cluster}/{node} is not current")
        # the plan decides today's roles; the certificate can only narrow them
        return NodeCaller(cluster, node, tuple(r for r in cert_roles if r in current))

    async def readable_roles(self, caller: NodeCaller) -> set[str]:
        """The roles a node may read attributes of: its own and those they depend on."""
        spec = self.cluster_roles.get(caller.cluster)
        if spec is None:
            spec = (await self.db(self.store.require_cluster, caller.cluster)).roles
            if len(self.cluster_roles) > 10_000:
                self.cluster_roles.clear()
            self.cluster_roles[caller.cluster] = spec
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

    async def forget(self, cluster: str, delete: Callable[[], list[str]]) -> dict[str, list[str]]:
        revoked = await self.db(delete)
        self.forget_identities()
        self.wake_cluster(cluster)
        return {"revoked": revoked}


# -- FastAPI dependencies ---------------------------------------------------------------------


async def service(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.crv
    return state


Svc = Annotated[ServiceState, Depends(service)]


async def node_caller(request: Request, svc: Svc) -> NodeCaller:
    """The node a request comes from, by its current certificate (401/403 otherwise)."""
    return await svc.node_caller(getattr(request.state, "tls_peer_cert", None))


async def admin(request: Request) -> None:
    der: bytes | None = getattr(request.state, "tls_peer_cert", None)
    if not der:
        raise StoreError(401, "an admin certificate is required")
    if not is_admin(x509.load_der_x509_certificate(der)):
        raise StoreError(403, "admin routes need the admin certificate")


Node = Annotated[NodeCaller, Depends(node_caller)]
Admin = Depends(admin)
