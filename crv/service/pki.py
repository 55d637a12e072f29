"""The cluster-service certificate authority: one CA per service, a short-lived cert per node.

Nodes make their keys themselves and send CSRs (private keys never leave the node). A CSR is
trusted for one thing only, proof that the sender holds the key: every name and extension of
the issued certificate comes from the plan (the arguments), so a node cannot ask its way into
another node's identity, a wildcard or a CA. The identity is written as URI SANs and read back
by `node_identity` when the service authorizes a request.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crv.appliance.spec import CONTROL_RE, NAME_PATTERN, NAME_RULE
from crv.base.errors import PkiError
from crv.base.flock import exclusive

__all__ = ["ADMIN_URI", "CertificateAuthority", "is_admin", "node_identity"]

# The identity of the CLI and the flows on the service's admin routes. It is not a crv://
# URI, so no node certificate can carry it and `node_identity` never mistakes one for the other.
ADMIN_URI = "crv:admin"

# fullmatch, not match: with match, `$` would also accept a trailing newline ("web\n").
NAME_RE = re.compile(NAME_PATTERN)
_HOST_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_IDENTITY_URI_RE = re.compile(r"crv://([^/]*)/(node|role)/([^/]*)")

# Nodes' clocks may be minutes off (F14): a certificate or CRL that starts "now" would be "not
# yet valid" on a node running behind, and the CA and the service's certificate are made by
# `crv up` moments before the first nodes meet them. Every certificate and CRL this CA makes
# starts SKEW_MARGIN before now, which carries the tolerance crv promises (a node clock up to
# CLOCK_TOLERANCE behind or ahead of the service's) with room. Beyond it the agent says which
# clock is off (agent/crv_agent.py, CLOCK_TOLERANCE; docs/pki.md "Clock skew").
CLOCK_TOLERANCE = timedelta(minutes=10)
SKEW_MARGIN = timedelta(minutes=15)
CA_VALIDITY = timedelta(days=3650)
MAX_NODE_TTL = timedelta(days=7)
MIN_NODE_TTL = timedelta(seconds=30)  # the agent renews at two thirds: 20 s at least
DEFAULT_NODE_TTL = timedelta(hours=24)
NODE_TTL_SETTING = "CRV_NODE_CERT_TTL"
MAX_CSR_BYTES = 16 * 1024  # a real CSR is under 2 KiB; bigger ones are padding or attacks
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_ALLOWED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_NODE_EKUS = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
_EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")  # PKCS #9 extensionRequest

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class CertificateAuthority:
    """Holds the CA key in memory so that signing costs one ECDSA signature, no file I/O."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        directory: Path | None = None,
        parent: CertificateAuthority | None = None,
    ) -> None:
        self._key = key
        self._cert = certificate
        self._dir = directory  # the root's: its clusters' CAs live under it
        self._parent = parent  # an intermediate's root
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    @classmethod
    def create_or_load(cls, directory: Path, name: str = "crv") -> CertificateAuthority:
        """Several workers may start at once on a fresh directory: all must end up with the
        same CA, so creation happens under a lock and the certificate is published last (its
        presence means the pair is complete)."""
        _check_name("CA", name)
        directory = Path(directory)
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if not cert_path.exists():
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                with exclusive(directory / ".ca.lock"):
                    if not cert_path.exists():  # another process may have won meanwhile
                        _create_ca(key_path, cert_path, name)
            except OSError as e:
                raise PkiError(f"{directory}: cannot create the CA: {e.strerror or e}") from e
        return cls(*_load_ca(key_path, cert_path), directory)

    # -- one CA per cluster ---------------------------------------------------------------------

    @property
    def per_cluster(self) -> bool:
        """Whether this root can have cluster CAs below it: a root made before them has
        pathlen 0 and signs node certificates itself (recreate the CA directory to change)."""
        bc = self._cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        return bc.path_length is None or bc.path_length >= 1

    def cluster_ca(self, cluster: str, *, create: bool = True) -> CertificateAuthority | None:
        """The cluster's own intermediate CA (made on first use, under a lock, published like
        the root), which signs its node certificates: a daemon of one cluster that pins its
        cluster's CA (MariaDB `REQUIRE ISSUER`, a partial-chain trust anchor) never accepts a
        node of another cluster. None when `create` is false and there is none."""
        _check_name("cluster", cluster)
        if self._dir is None or self._parent is not None:
            raise PkiError("only a root CA loaded from its directory has cluster CAs")
        if not self.per_cluster:
            return self
        directory = self._dir / "clusters" / cluster
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if not cert_path.exists():
            if not create:
                return None
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                with exclusive(self._dir / "clusters" / ".lock"):
                    if not cert_path.exists():
                        self._create_intermediate(key_path, cert_path, cluster)
            except OSError as e:
                raise PkiError(f"{directory}: cannot create the CA: {e.strerror or e}") from e
        key, cert = _load_ca(key_path, cert_path)
        try:
            cert.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature):
            raise PkiError(f"{cert_path}: not issued by the root CA {self._dir}") from None
        return CertificateAuthority(key, cert, parent=self)

    def _create_intermediate(self, key_path: Path, cert_path: Path, cluster: str) -> None:
        key = _new_key(key_path)
        now = datetime.now(timezone.utc)
        # a random tag: a cluster made again under the same name gets a CA no daemon of the
        # old one pins (REQUIRE ISSUER compares the name)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crv"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"{cluster} cluster CA {secrets.token_hex(4)}"
                ),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW_MARGIN)
            .not_valid_after(self._cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        _publish(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def cluster_cas(self) -> dict[str, CertificateAuthority]:
        """Every cluster CA in use, by cluster (for the CRLs)."""
        if self._dir is None or not (self._dir / "clusters").is_dir():
            return {}
        found = {}
        for entry in sorted((self._dir / "clusters").iterdir()):
            if (entry / "ca.crt").is_file() and NAME_RE.fullmatch(entry.name):
                ca = self.cluster_ca(entry.name, create=False)
                if ca is not None:
                    found[entry.name] = ca
        return found

    def retire_cluster_ca(self, cluster: str, *, last_crl: bytes = b"") -> int | None:
        """A deleted cluster's CA signs nothing more: its key is deleted, its certificate kept
        under retired/ for the root's CRL, with the last CRL it signed (`last_crl`, which
        still lists its node certificates). The serial retired, if there was one."""
        _check_name("cluster", cluster)
        if self._dir is None or not self.per_cluster:
            return None
        directory = self._dir / "clusters" / cluster
        try:
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        except (OSError, ValueError):
            return None
        retired = self._dir / "retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        stem = retired / f"{cluster}-{cert.serial_number:x}"
        if last_crl:
            stem.with_suffix(".crl").write_bytes(last_crl)
        (directory / "ca.key").unlink(missing_ok=True)
        os.replace(directory / "ca.crt", stem.with_suffix(".crt"))
        with contextlib.suppress(OSError):
            directory.rmdir()
        return int(cert.serial_number)

    def retired(self) -> list[tuple[int, datetime]]:
        """(serial, when) of the retired cluster CAs, for the root's CRL."""
        if self._dir is None or not (self._dir / "retired").is_dir():
            return []
        out = []
        for entry in sorted((self._dir / "retired").glob("*.crt")):
            with contextlib.suppress(OSError, ValueError):
                cert = x509.load_pem_x509_certificate(entry.read_bytes())
                at = datetime.fromtimestamp(entry.stat().st_mtime, timezone.utc)
                out.append((int(cert.serial_number), at))
        return out

    def final_crls(self) -> list[bytes]:
        """The last CRL of each retired cluster CA (PEM)."""
        if self._dir is None or not (self._dir / "retired").is_dir():
            return []
        return [p.read_bytes() for p in sorted((self._dir / "retired").glob("*.crl"))]

    @property
    def chain_pem(self) -> bytes:
        """This CA's certificate up to the root (what a node sends after its own, and what a
        daemon of the cluster loads to check its peers)."""
        if self._parent is None:
            return self.certificate_pem
        return self.certificate_pem + self._parent.certificate_pem

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def certificate_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint_sha256(self) -> str:
        """What bootstrap data pins, so a node can check the CA bundle it was handed."""
        return self._cert.fingerprint(hashes.SHA256()).hex()

    def sign_node_csr(
        self,
        csr_pem: bytes,
        *,
        cluster: str,
        node: str,
        roles: Sequence[str],
        addresses: Sequence[str] = (),
        ttl: timedelta = timedelta(hours=24),
    ) -> x509.Certificate:
        """Short-lived (at most a week) so that a leaked node key stops working on its own,
        even if revocation is missed."""
        _check_name("cluster", cluster)
        _check_name("node", node)
        role_names = _check_roles(roles)
        ips = _parse_addresses(addresses)
        if not timedelta(0) < ttl <= MAX_NODE_TTL:
            raise PkiError(f"node certificate ttl {ttl} is not between 0 and {MAX_NODE_TTL}")
        csr = _check_csr(csr_pem, node, ips)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
                *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, r) for r in role_names),
                x509.NameAttribute(NameOID.COMMON_NAME, node),
            ]
        )
        sans: list[x509.GeneralName] = [
            x509.DNSName(node),
            *(x509.IPAddress(ip) for ip in ips),
            x509.UniformResourceIdentifier(f"crv://{cluster}/node/{node}"),
            *(x509.UniformResourceIdentifier(f"crv://{cluster}/role/{r}") for r in role_names),
        ]
        builder = self._leaf(subject, csr.public_key(), ttl)
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(_NODE_EKUS), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def issue_server_certificate(
        self,
        hostnames: Sequence[str],
        addresses: Sequence[str] = (),
        ttl: timedelta = timedelta(days=365),
    ) -> tuple[bytes, x509.Certificate]:
        """The service runs beside its CA, so its key is the one key made on this side; it is
        serverAuth only, so the service's own key cannot pose as a node."""
        if isinstance(hostnames, str):
            raise PkiError("hostnames must be a list of names, not one string")
        for host in hostnames:
            _check_hostname(host)
        ips = _parse_addresses(addresses)
        if not hostnames and not ips:
            raise PkiError("a server certificate needs at least one hostname or address")
        if ttl <= timedelta(0):
            raise PkiError(f"server certificate ttl {ttl} is not positive")
        key = ec.generate_private_key(ec.SECP256R1())
        cn = hostnames[0] if hostnames else str(ips[0])
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if len(cn) <= 64 else [])
        sans = [*(x509.DNSName(h) for h in hostnames), *(x509.IPAddress(ip) for ip in ips)]
        # RFC 5280: with an empty subject the SAN extension must be critical.
        return self._with_new_key(key, subject, sans, ExtendedKeyUsageOID.SERVER_AUTH, ttl)

    def issue_admin_certificate(
        self, ttl: timedelta = timedelta(days=365)
    ) -> tuple[bytes, x509.Certificate]:
        """The admin side of the service (the CLI, the flows) authenticates with a client
        certificate like nodes do, kept beside the CA on the service's machine; clientAuth only,
        so it cannot serve TLS as the service."""
        if ttl <= timedelta(0):
            raise PkiError(f"admin certificate ttl {ttl} is not positive")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crv admin")])
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ADMIN_URI)]
        key = ec.generate_private_key(ec.SECP256R1())
        return self._with_new_key(key, subject, sans, ExtendedKeyUsageOID.CLIENT_AUTH, ttl)

    def _with_new_key(
        self,
        key: ec.EllipticCurvePrivateKey,
        subject: x509.Name,
        sans: Sequence[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        ttl: timedelta,
    ) -> tuple[bytes, x509.Certificate]:
        """For the service's own certificates, whose keys are made here (not on a node)."""
        builder = self._leaf(subject, key.public_key(), ttl)
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
        eku = x509.ExtendedKeyUsage([usage])
        cert = builder.add_extension(eku, critical=False).sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, cert

    def build_crl(
        self,
        revoked: Iterable[tuple[int, datetime]],
        *,
        next_update: timedelta = timedelta(days=1),
        crl_number: int,
    ) -> x509.CertificateRevocationList:
        """Teardown revokes node certificates; this list lets the service and any openssl-based
        peer refuse them. last_update is back-dated like certificates (F14)."""
        if next_update <= timedelta(0):
            raise PkiError(f"CRL next_update {next_update} is not positive")
        if crl_number < 0:
            raise PkiError(f"CRL number {crl_number} is negative")
        now = datetime.now(timezone.utc)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(now - SKEW_MARGIN)
            .next_update(now + next_update)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(self._aki, critical=False)
        )
        for serial, revoked_at in revoked:
            if revoked_at.tzinfo is None:
                raise PkiError(f"revocation time of serial {serial:x} has no timezone")
            entry = x509.RevokedCertificateBuilder().serial_number(serial)
            builder = builder.add_revoked_certificate(entry.revocation_date(revoked_at).build())
        return builder.sign(self._key, hashes.SHA256())

    def _leaf(
        self, subject: x509.Name, public_key: CertificatePublicKeyTypes, ttl: timedelta
    ) -> x509.CertificateBuilder:
        """The part every end-entity certificate shares; it never outlives the CA, whose expiry
        would make it useless anyway."""
        now = datetime.now(timezone.utc)
        ca_end = self._cert.not_valid_after_utc
        if now >= ca_end:
            raise PkiError(f"the CA certificate expired at {ca_end:%Y-%m-%d %H:%M} UTC")
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW_MARGIN)
            .not_valid_after(min(now + ttl, ca_end))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )


def node_ttl_from_env(environ: Mapping[str, str] | None = None) -> timedelta:
    """The lifetime of node certificates, a service setting: CRV_NODE_CERT_TTL in seconds
    (default 24 h), between 30 s and 7 days. Agents renew at about two thirds of it."""
    raw = (os.environ if environ is None else environ).get(NODE_TTL_SETTING, "").strip()
    if not raw:
        return DEFAULT_NODE_TTL
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not MIN_NODE_TTL.total_seconds() <= seconds <= MAX_NODE_TTL.total_seconds():
        raise PkiError(
            f"{NODE_TTL_SETTING}={raw!r}: seconds between {MIN_NODE_TTL.total_seconds():.0f} "
            f"and {MAX_NODE_TTL.total_seconds():.0f} (7 days)"
        )
    return timedelta(seconds=seconds)


def node_identity(cert: x509.Certificate) -> tuple[str, str, tuple[str, ...]]:
    """Authorization reads the identity from the URIs this CA wrote, never from CN/O/OU, which
    are free text. It does not check the chain: call it on a certificate TLS has verified."""
    where = f"certificate {cert.serial_number:x}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(f"{where}: no crv identity (no subjectAltName)") from None
    except (ValueError, x509.DuplicateExtension) as e:
        raise PkiError(f"{where}: unreadable extensions: {_one_line(e)}") from None
    clusters: set[str] = set()
    nodes: list[str] = []
    roles: list[str] = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if not uri.startswith("crv://"):
            continue
        m = _IDENTITY_URI_RE.fullmatch(uri)
        if m is None or not (NAME_RE.fullmatch(m[1]) and NAME_RE.fullmatch(m[3])):
            raise PkiError(f"{where}: malformed crv identity {uri!r}")
        clusters.add(m[1])
        (nodes if m[2] == "node" else roles).append(m[3])
    if len(nodes) != 1 or len(clusters) != 1:
        raise PkiError(f"{where}: no crv identity (needs one node URI and one cluster)")
    return clusters.pop(), nodes[0], tuple(roles)


def is_admin(cert: x509.Certificate) -> bool:
    """True for a certificate made by `issue_admin_certificate` (call it on a TLS-verified one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return False
    return san.get_values_for_type(x509.UniformResourceIdentifier) == [ADMIN_URI]


def check_unnamed_csr(csr_pem: bytes) -> None:
    """A CSR from a machine that does not know its node name yet (pairing): every check of a
    node's CSR, and no names at all (the CA writes them)."""
    with contextlib.suppress(ValueError, UnsupportedAlgorithm, x509.DuplicateExtension):
        csr = x509.load_pem_x509_csr(csr_pem[:MAX_CSR_BYTES])
        if len(csr.subject) or len(csr.extensions):
            raise PkiError("CSR for pairing: it names no node (the service does); no subject")
    _check_csr(csr_pem, "a pairing machine", ())


def _check_csr(csr_pem: bytes, node: str, ips: Sequence[_IP]) -> x509.CertificateSigningRequest:
    """Refuses rather than ignores what a hostile CSR asks for, so the attempt shows in logs."""
    what = f"CSR for {node}"
    if len(csr_pem) > MAX_CSR_BYTES:
        raise PkiError(f"{what}: {len(csr_pem)} bytes, more than {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        key = csr.public_key()
        digest = csr.signature_hash_algorithm
        subject = csr.subject
        extensions = csr.extensions
        requests = sum(attribute.oid == _EXTENSION_REQUEST for attribute in csr.attributes)
    except x509.DuplicateExtension as e:
        raise PkiError(f"{what}: duplicate extension {e.oid.dotted_string}") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise PkiError(f"{what}: not a readable PEM certificate request: {_one_line(e)}") from None
    if requests > 1:
        # cryptography and openssl read the first and ignore the rest: nothing checks those
        raise PkiError(f"{what}: {requests} extensionRequest attributes; one at most")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise PkiError(f"{what}: EC key on curve {key.curve.name}; P-256 or P-384 required")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PkiError(f"{what}: RSA key of {key.key_size} bits; at least 2048 required")
    else:
        raise PkiError(f"{what}: key type {type(key).__name__} not allowed; use EC P-256")
    if not isinstance(digest, _ALLOWED_HASHES):
        name = digest.name if digest is not None else "no hash"
        raise PkiError(f"{what}: signed with {name}; SHA-256 or stronger required")
    if not csr.is_signature_valid:
        raise PkiError(f"{what}: bad self-signature (no proof of possession of the key)")
    for attr in subject:
        if isinstance(attr.value, str) and CONTROL_RE.search(attr.value):
            raise PkiError(f"{what}: control character in subject {attr.rfc4514_attribute_name}")
    cns = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns and cns != [node]:
        raise PkiError(f"{what}: subject CN {', '.join(repr(c) for c in cns)} is not {node!r}")
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            for gn in value:
                if isinstance(gn, x509.DNSName) and gn.value == node:
                    continue
                if isinstance(gn, x509.IPAddress) and gn.value in ips:
                    continue
                raise PkiError(
                    f"{what}: SAN {type(gn).__name__} {gn.value!r} not allowed "
                    f"(only DNS {node!r} and the planned addresses)"
                )
        elif isinstance(value, x509.BasicConstraints) and value.ca:
            # (CA:FALSE with a path length does not even parse: cryptography refuses it.)
            raise PkiError(f"{what}: requests basicConstraints CA:TRUE")
        elif isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise PkiError(f"{what}: requests keyCertSign or cRLSign key usage")
        elif isinstance(value, x509.ExtendedKeyUsage):
            extra = [oid.dotted_string for oid in value if oid not in _NODE_EKUS]
            if extra:
                raise PkiError(f"{what}: requests extended key usage {', '.join(extra)}")
    return csr


def _create_ca(key_path: Path, cert_path: Path, name: str) -> None:
    key = _new_key(key_path)
    now = datetime.now(timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} cluster CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW_MARGIN)
        .not_valid_after(now + CA_VALIDITY)
        # pathlen 1: one level of cluster CAs below the root, and nothing below those
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _publish(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _new_key(key_path: Path) -> ec.EllipticCurvePrivateKey:
    """A key already there without a certificate is a crash between the two publications:
    certify that key rather than replace it."""
    if key_path.exists():
        return _load_key(key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _publish(key_path, pem, 0o600)
    return key


def _load_ca(
    key_path: Path, cert_path: Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _load_key(key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert_key = cert.public_key()
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except OSError as e:
        raise PkiError(f"{cert_path}: cannot read: {e.strerror or e}") from None
    except x509.ExtensionNotFound:
        raise PkiError(f"{cert_path}: not a CA certificate (no basicConstraints)") from None
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension) as e:
        raise PkiError(f"{cert_path}: not a readable PEM certificate: {_one_line(e)}") from None
    if _spki(cert_key) != _spki(key.public_key()):
        raise PkiError(f"{key_path}: key does not match the certificate {cert_path}")
    if not constraints.ca:
        raise PkiError(f"{cert_path}: not a CA certificate (basicConstraints CA:FALSE)")
    return key, cert


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Checks the mode of the file actually opened (fstat), not of whatever the name pointed
    to a moment earlier."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise PkiError(f"{path}: cannot read the CA key: {e.strerror or e}") from None
    if mode & 0o077:
        raise PkiError(f"{path}: readable by group or others (mode {mode & 0o777:o}); chmod 600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise PkiError(f"{path}: not an unencrypted PEM private key: {_one_line(e)}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, _ALLOWED_CURVES
    ):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise PkiError(f"{path}: CA key is {kind}; EC P-256 or P-384 required")
    return key


def _publish(path: Path, data: bytes, mode: int) -> None:
    """Readers see the whole file or nothing, a key never exists with a wider mode (created
    0600 by O_EXCL, not chmod-ed later), and an existing file is never overwritten (link)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_name(kind: str, name: str) -> None:
    """Names end up in URIs and certificate subjects: one strict DNS-label shape keeps out
    traversal (`../x`), NULs, newlines and look-alike case variants."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PkiError(f"bad {kind} name {name!r}: {NAME_RULE}")


def _check_roles(roles: Sequence[str]) -> tuple[str, ...]:
    if isinstance(roles, str):  # a str is a Sequence[str]: "web" would become w, e, b
        raise PkiError(f"roles must be a list of names, not the string {roles!r}")
    for role in roles:
        _check_name("role", role)
    if len(set(roles)) != len(roles):
        raise PkiError(f"duplicate role in {list(roles)!r}")
    return tuple(roles)


def _check_hostname(host: str) -> None:
    if (
        not isinstance(host, str)
        or len(host) > 253
        or not all(_HOST_LABEL_RE.fullmatch(label) for label in host.split("."))
    ):
        raise PkiError(f"bad hostname {host!r}: lowercase DNS labels separated by '.'")


def _parse_addresses(addresses: Sequence[str]) -> tuple[_IP, ...]:
    if isinstance(addresses, str):
        raise PkiError(f"addresses must be a list, not the string {addresses!r}")
    ips: dict[_IP, None] = {}
    for address in addresses:
        try:
            ips[ipaddress.ip_address(address)] = None
        except ValueError:
            raise PkiError(f"bad IP address {address!r}") from None
    return tuple(ips)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
