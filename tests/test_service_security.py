"""The crv service under attack: a real TLS client against the real service process.

One service process per module (`python -m crv.service`, its own CRV_HOME); every test makes
its own cluster through the admin API, so tests do not see each other's nodes. Each refusal is
checked three ways where the contract allows: the status (and body), that the cluster's state
did not change (GET /v1/admin/clusters/{c} and the event sequence), and the service log line.
Attacks come from FAULTS-AND-ATTACKS.md: "Node identity, join tokens and certificates",
"mTLS on the blackboard" and "Blackboard authorization".
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import os
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crv.base.home import Home
from crv.service.pki import CertificateAuthority

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
TOKEN_REFUSED = {"detail": "invalid or expired bootstrap token"}

# -- the service process ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    home: Home
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    tokens: list[str] = field(default_factory=list)  # every token issued, for the log scan
    env: dict[str, str] = field(default_factory=dict)  # settings of the service process

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "crv.service", "--port", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "CRV_HOME": str(self.home.root), **self.env},
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the service exited at start:\n{self.log.read_text()[-3000:]}")
            if self.home.ca_file.exists():
                with (
                    contextlib.suppress(httpx.TransportError, ssl.SSLError, OSError),
                    self.client() as c,
                ):
                    if c.get("/v1/health").status_code == 200:
                        return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"the service did not answer in {START_TIMEOUT} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.home.ca_file))
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    def client(self, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.context(cert, key), timeout=10)

    def admin(self) -> httpx.Client:
        return self.client(self.home.admin_cert, self.home.admin_key)

    def log_mark(self) -> int:
        return self.log.stat().st_size

    def log_since(self, mark: int) -> str:
        with open(self.log, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")


def started_service(tmp_path_factory: pytest.TempPathFactory, **env: str) -> Iterator[Service]:
    """A service process of its own (its own CRV_HOME, the settings `env`), for a fixture:
    `yield from started_service(tmp_path_factory)`."""
    root = tmp_path_factory.mktemp("crv-home")
    service = Service(Home(root), _free_port(), root / "service-process.log", env=dict(env))
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from started_service(tmp_path_factory)


@pytest.fixture
def admin(svc: Service) -> Iterator[httpx.Client]:
    with svc.admin() as client:
        yield client


# -- clusters, nodes, enrolment -----------------------------------------------------------------


def _bundle() -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("a0/roles/web.sh", "a0/roles/lb.sh"):
            data = b"#!/bin/sh\nexit 0\n"
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def default_nodes(c: str) -> list[tuple[str, str]]:
    return [(f"{c}-web-0", "web"), (f"{c}-web-1", "web"), (f"{c}-lb-0", "lb")]


def setup_cluster(
    svc: Service,
    admin: httpx.Client,
    c: str,
    nodes: list[tuple[str, str]] | None = None,
    state: str | None = "provisioned",
    ttl: float = 600.0,
) -> dict[str, str]:
    """Roles web (no dependencies) and lb (depends on web); returns a token per node."""
    spec = {
        "appliance": "demo",
        "source": "/nowhere/demo",
        "pool": "local",
        "parameters": {},
        "roles": {
            "web": {"recipe": "a0/roles/web.sh", "appdir": "a0", "env": {}, "depends_on": []},
            "lb": {
                "recipe": "a0/roles/lb.sh",
                "appdir": "a0",
                "env": {},
                "depends_on": [{"role": "web", "local": False, "min_ready": None}],
            },
        },
        "bundle": _bundle(),
    }
    r = admin.put(f"/v1/admin/clusters/{c}", json=spec)
    assert r.status_code == 200, r.text
    nodes = nodes or default_nodes(c)
    items = [
        {
            "name": n,
            "group": role,
            "roles": [role],
            "pool": "local",
            "address": f"127.0.1.{i + 1}",
            "state": state,
        }
        for i, (n, role) in enumerate(nodes)
    ]
    r = admin.put(f"/v1/admin/clusters/{c}/nodes", json={"nodes": items})
    assert r.status_code == 200, r.text
    return issue_tokens(svc, admin, c, [n for n, _ in nodes], ttl)


def issue_tokens(
    svc: Service, admin: httpx.Client, c: str, names: list[str], ttl: float = 600.0
) -> dict[str, str]:
    r = admin.post(f"/v1/admin/clusters/{c}/tokens", json={"nodes": names, "ttl": ttl})
    assert r.status_code == 200, r.text
    tokens: dict[str, str] = r.json()["tokens"]
    svc.tokens.extend(tokens.values())
    return tokens


def snapshot(admin: httpx.Client, c: str) -> dict[str, Any]:
    """Everything an attacker could have changed: the cluster, its nodes and its events."""
    status = admin.get(f"/v1/admin/clusters/{c}")
    events = admin.get(f"/v1/admin/clusters/{c}/events")
    assert status.status_code == events.status_code == 200, (status.text, events.text)
    return {"status": status.json(), "last_event": events.json()["last"]}


def node_state(admin: httpx.Client, c: str, node: str) -> dict[str, Any]:
    found = [n for n in snapshot(admin, c)["status"]["nodes"] if n["name"] == node]
    assert len(found) == 1, found
    return found[0]


def pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(
    node: str,
    *,
    key: Any = None,
    cn: str | None = None,
    dns: list[str] | None = None,
    ca: bool = False,
) -> tuple[Any, bytes]:
    """A P-256 key and a CSR (CN and SAN DNS = the node's name unless told otherwise)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or node)])
    )
    sans = dns if dns is not None else [node]
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(d) for d in sans]), critical=False
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


@dataclass
class NodeCreds:
    cluster: str
    node: str
    cert: x509.Certificate
    cert_path: Path
    key_path: Path

    @property
    def serial(self) -> str:
        return format(self.cert.serial_number, "x")


def write_creds(svc: Service, c: str, node: str, cert: x509.Certificate, key: Any) -> NodeCreds:
    """The certificate file holds the certificate, then the cluster CA that issued it (as the
    agent's does: TLS peers trust the root and need the CA between)."""
    d = svc.home.root / "clients" / f"{c}-{node}-{cert.serial_number:x}"
    d.mkdir(parents=True)
    chain = b""
    cluster_ca = svc.home.ca_dir / "clusters" / c / "ca.crt"
    if (
        cluster_ca.exists()
        and x509.load_pem_x509_certificate(cluster_ca.read_bytes()).subject == cert.issuer
    ):
        chain = cluster_ca.read_bytes()
    (d / "node.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
    (d / "node.key").write_bytes(pem_key(key))
    return NodeCreds(c, node, cert, d / "node.crt", d / "node.key")


def post_enrol(svc: Service, c: str, node: str, token: str, csr: bytes) -> httpx.Response:
    with svc.client() as client:
        return client.post(
            "/v1/enrol", json={"cluster": c, "node": node, "token": token, "csr": csr.decode()}
        )


def enrol(svc: Service, c: str, node: str, token: str) -> NodeCreds:
    key, csr = make_csr(node)
    r = post_enrol(svc, c, node, token, csr)
    assert r.status_code == 200, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    return write_creds(svc, c, node, cert, key)


def node_client(svc: Service, creds: NodeCreds) -> httpx.Client:
    return svc.client(creds.cert_path, creds.key_path)


def forge_certificate(
    svc: Service,
    c: str,
    node: str,
    roles: tuple[str, ...],
    *,
    not_before: datetime,
    not_after: datetime,
    ekus: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    by_cluster_ca: bool = False,
) -> NodeCreds:
    """A node certificate signed with the service's real root CA key (or its cluster's CA
    key), with the dates we choose (crv.service.pki does not let a caller pick them) and never
    recorded by the service."""
    ca_dir = svc.home.ca_dir / "clusters" / c if by_cluster_ca else svc.home.ca_dir
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName(node),
        x509.UniformResourceIdentifier(f"crv://{c}/node/{node}"),
        *(x509.UniformResourceIdentifier(f"crv://{c}/role/{r}") for r in roles),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return write_creds(svc, c, node, cert, key)


def assert_handshake_refused(svc: Service, cert: Path, key: Path, path: str = "/v1/work") -> None:
    """The handshake fails (with TLS 1.3 the client learns it on its first read): no HTTP
    response at all, and nothing in the log says a route refused it."""
    mark = svc.log_mark()
    with svc.client(cert, key) as client, pytest.raises(httpx.TransportError):
        client.get(path)
    # TLS 1.2 makes the refusal visible in the handshake itself (the server checks the client
    # certificate before its Finished), so the client never gets to send a request
    ctx = svc.context(cert, key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1").close()
    assert "refused" not in svc.log_since(mark)


# -- join tokens --------------------------------------------------------------------------------


def test_wrong_token_is_401_and_the_node_is_not_enrolled(svc: Service, admin: httpx.Client) -> None:
    tokens = setup_cluster(svc, admin, "tok-wrong")
    before = snapshot(admin, "tok-wrong")
    mark = svc.log_mark()
    _, csr = make_csr("tok-wrong-web-0")
    r = post_enrol(svc, "tok-wrong", "tok-wrong-web-0", "A" * 43, csr)
    assert (r.status_code, r.json()) == (401, TOKEN_REFUSED)
    assert snapshot(admin, "tok-wrong") == before
    assert node_state(admin, "tok-wrong", "tok-wrong-web-0")["state"] == "provisioned"
    assert "enrolment for tok-wrong/tok-wrong-web-0: wrong token" in svc.log_since(mark)
    # the real token still works: a wrong guess does not burn it
    enrol(svc, "tok-wrong", "tok-wrong-web-0", tokens["tok-wrong-web-0"])


def test_token_used_twice_is_401(svc: Service, admin: httpx.Client) -> None:
    tokens = setup_cluster(svc, admin, "tok-reuse")
    first = enrol(svc, "tok-reuse", "tok-reuse-web-0", tokens["tok-reuse-web-0"])
    before = snapshot(admin, "tok-reuse")
    mark = svc.log_mark()
    _, csr = make_csr("tok-reuse-web-0")
    r = post_enrol(svc, "tok-reuse", "tok-reuse-web-0", tokens["tok-reuse-web-0"], csr)
    assert (r.status_code, r.json()) == (401, TOKEN_REFUSED)
    assert snapshot(admin, "tok-reuse") == before
    assert "tok-reuse/tok-reuse-web-0: no unused token (reused?)" in svc.log_since(mark)
    # the replay did not revoke the certificate the first use got
    with node_client(svc, first) as node:
        assert node.get("/v1/work").status_code == 200


def test_expired_token_is_401(svc: Service, admin: httpx.Client) -> None:
    tokens = setup_cluster(svc, admin, "tok-old", ttl=0.5)
    time.sleep(1.0)
    before = snapshot(admin, "tok-old")
    mark = svc.log_mark()
    _, csr = make_csr("tok-old-web-0")
    r = post_enrol(svc, "tok-old", "tok-old-web-0", tokens["tok-old-web-0"], csr)
    assert (r.status_code, r.json()) == (401, TOKEN_REFUSED)
    assert snapshot(admin, "tok-old") == before
    assert "enrolment for tok-old/tok-old-web-0: token expired" in svc.log_since(mark)


def test_token_of_another_node_is_401(svc: Service, admin: httpx.Client) -> None:
    tokens = setup_cluster(svc, admin, "tok-swap")
    before = snapshot(admin, "tok-swap")
    mark = svc.log_mark()
    _, csr = make_csr("tok-swap-web-1")
    r = post_enrol(svc, "tok-swap", "tok-swap-web-1", tokens["tok-swap-web-0"], csr)
    assert (r.status_code, r.json()) == (401, TOKEN_REFUSED)
    assert snapshot(admin, "tok-swap") == before
    assert "enrolment for tok-swap/tok-swap-web-1: wrong token" in svc.log_since(mark)
    # neither token was consumed by the attempt
    enrol(svc, "tok-swap", "tok-swap-web-0", tokens["tok-swap-web-0"])
    enrol(svc, "tok-swap", "tok-swap-web-1", tokens["tok-swap-web-1"])


def test_unknown_node_and_cluster_are_401_with_the_same_message(
    svc: Service, admin: httpx.Client
) -> None:
    tokens = setup_cluster(svc, admin, "tok-ghost")
    mark = svc.log_mark()
    for c, node in (("tok-ghost", "tok-ghost-web-9"), ("no-such-cluster", "tok-ghost-web-0")):
        _, csr = make_csr(node)
        r = post_enrol(svc, c, node, tokens["tok-ghost-web-0"], csr)
        assert (r.status_code, r.json()) == (401, TOKEN_REFUSED)
    log = svc.log_since(mark)
    assert "enrolment for unknown node tok-ghost/tok-ghost-web-9" in log
    assert "enrolment for unknown node no-such-cluster/tok-ghost-web-0" in log


def test_enrolment_before_provisioning_is_409_retry_after(
    svc: Service, admin: httpx.Client
) -> None:
    tokens = setup_cluster(svc, admin, "tok-early", state=None)  # planned
    assert node_state(admin, "tok-early", "tok-early-web-0")["state"] == "planned"
    before = snapshot(admin, "tok-early")
    _, csr = make_csr("tok-early-web-0")
    r = post_enrol(svc, "tok-early", "tok-early-web-0", tokens["tok-early-web-0"], csr)
    assert r.status_code == 409, r.text
    assert r.headers["retry-after"] == "1"
    assert snapshot(admin, "tok-early") == before
    # once the flow records the node, the same token enrols it (409 did not consume it)
    r = admin.put(
        "/v1/admin/clusters/tok-early/nodes",
        json={
            "nodes": [
                {
                    "name": "tok-early-web-0",
                    "group": "web",
                    "roles": ["web"],
                    "pool": "local",
                    "address": "127.0.1.1",
                    "state": "provisioned",
                }
            ]
        },
    )
    assert r.status_code == 200, r.text
    enrol(svc, "tok-early", "tok-early-web-0", tokens["tok-early-web-0"])
    assert node_state(admin, "tok-early", "tok-early-web-0")["state"] == "enrolled"


# -- hostile CSRs -------------------------------------------------------------------------------


def _bad_signature(node: str) -> bytes:
    _, pem = make_csr(node)
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s: no proof of possession
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


HOSTILE_CSRS: dict[str, tuple[Any, str]] = {
    # name: (build(node, victim) -> CSR PEM, what the 400 says)
    "cn-of-another-node": (lambda n, v: make_csr(n, cn=v)[1], "subject CN '{v}'"),
    "san-of-another-node": (
        lambda n, v: make_csr(n, dns=[n, v])[1],
        "SAN DNSName '{v}' not allowed",
    ),
    "wildcard-san": (lambda n, v: make_csr(n, dns=["*.web"])[1], "SAN DNSName '*.web'"),
    "ca-true": (lambda n, v: make_csr(n, ca=True)[1], "requests basicConstraints CA:TRUE"),
    "rsa-1024": (
        lambda n, v: make_csr(n, key=rsa.generate_private_key(65537, 1024))[1],
        "RSA key of 1024 bits",
    ),
    "bad-self-signature": (lambda n, v: _bad_signature(n), "bad self-signature"),
}


@pytest.mark.parametrize("attack", list(HOSTILE_CSRS))
def test_hostile_csr_is_400_and_does_not_burn_the_token(
    svc: Service, admin: httpx.Client, attack: str
) -> None:
    c = f"csr-{list(HOSTILE_CSRS).index(attack)}"
    tokens = setup_cluster(svc, admin, c)
    node, victim = f"{c}-web-0", f"{c}-web-1"
    build, why = HOSTILE_CSRS[attack]
    before = snapshot(admin, c)
    mark = svc.log_mark()
    r = post_enrol(svc, c, node, tokens[node], build(node, victim))
    assert r.status_code == 400, r.text
    assert why.format(v=victim) in r.json()["detail"]
    assert snapshot(admin, c) == before
    assert f"enrolment of {c}/{node} refused: CSR for {node}" in svc.log_since(mark)
    # the refusal happened inside the enrolment transaction: the token is still good
    creds = enrol(svc, c, node, tokens[node])
    with node_client(svc, creds) as client:
        assert client.get("/v1/work").status_code == 200


# -- mTLS: who may call which route -------------------------------------------------------------


@pytest.fixture(scope="module")
def nocert_cluster(svc: Service) -> str:
    with svc.admin() as admin:
        setup_cluster(svc, admin, "nocert")
    return "nocert"


NO_CERT_ROUTES = [
    ("GET", "/v1/work", None),
    ("GET", "/v1/recipes", None),
    ("GET", "/v1/attributes/web/port", None),
    ("PUT", "/v1/attributes/web/port", {"value": "80"}),
    ("POST", "/v1/status", {"role": "web", "release": 1, "state": "done"}),
    ("GET", "/v1/admin/clusters", None),
    ("GET", "/v1/admin/clusters/nocert", None),
    ("GET", "/v1/admin/clusters/nocert/events", None),
    (
        "PUT",
        "/v1/admin/clusters/nocert/nodes",
        {
            "nodes": [
                {"name": "nocert-web-0", "group": "web", "roles": ["lb"], "pool": "local"},
            ]
        },
    ),
    ("POST", "/v1/admin/clusters/nocert/tokens", {"nodes": ["nocert-web-0"], "ttl": 60}),
    (
        "POST",
        "/v1/admin/clusters/nocert/roles",
        {"updates": [{"node": "nocert-web-0", "role": "web", "op": "release"}]},
    ),
    ("DELETE", "/v1/admin/clusters/nocert/nodes/nocert-web-0", None),
    ("DELETE", "/v1/admin/clusters/nocert", None),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), NO_CERT_ROUTES, ids=[f"{m} {p}" for m, p, _ in NO_CERT_ROUTES]
)
def test_no_client_certificate_is_401(
    svc: Service,
    admin: httpx.Client,
    nocert_cluster: str,
    method: str,
    path: str,
    body: Any,
) -> None:
    before = snapshot(admin, nocert_cluster)
    mark = svc.log_mark()
    with svc.client() as anonymous:
        r = anonymous.request(method, path, json=body)
    assert r.status_code == 401, r.text
    assert "certificate is required" in r.json()["detail"]
    assert snapshot(admin, nocert_cluster) == before
    assert f"refused {method} {path}: " in svc.log_since(mark)


def test_certificate_from_another_ca_fails_the_handshake(
    svc: Service, admin: httpx.Client, tmp_path: Path
) -> None:
    setup_cluster(svc, admin, "otherca")
    before = snapshot(admin, "otherca")
    rogue = CertificateAuthority.create_or_load(tmp_path / "rogue-ca")
    key, csr = make_csr("otherca-web-0")
    cert = rogue.sign_node_csr(
        csr, cluster="otherca", node="otherca-web-0", roles=["web"], addresses=["127.0.1.1"]
    )
    creds = write_creds(svc, "otherca", "otherca-web-0", cert, key)
    assert_handshake_refused(svc, creds.cert_path, creds.key_path)
    assert_handshake_refused(svc, creds.cert_path, creds.key_path, "/v1/admin/clusters")
    assert snapshot(admin, "otherca") == before


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_certificate_outside_its_validity_fails_the_handshake(
    svc: Service, admin: httpx.Client, when: str
) -> None:
    c = f"dates-{when}"
    setup_cluster(svc, admin, c)
    before = snapshot(admin, c)
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=2) if when == "expired" else now + timedelta(hours=1)
    creds = forge_certificate(
        svc, c, f"{c}-web-0", ("web",), not_before=start, not_after=start + timedelta(days=1)
    )
    assert_handshake_refused(svc, creds.cert_path, creds.key_path)
    assert snapshot(admin, c) == before


def test_certificate_without_client_auth_fails_the_handshake(svc: Service) -> None:
    """The service's own certificate (serverAuth only) cannot be used as a client."""
    server = svc.home.service_dir
    assert_handshake_refused(svc, server / "server.crt", server / "server.key")
    # and a node-shaped certificate from the real CA key, but serverAuth only
    now = datetime.now(timezone.utc)
    creds = forge_certificate(
        svc,
        "eku",
        "eku-web-0",
        ("web",),
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(hours=1),
        ekus=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )
    assert_handshake_refused(svc, creds.cert_path, creds.key_path)


def test_valid_certificate_never_issued_by_the_service_is_403(
    svc: Service, admin: httpx.Client
) -> None:
    """Chain and dates are fine (made with the CA key), but the service has no record of it:
    identity in a certificate is not enough, the certificate table decides."""
    setup_cluster(svc, admin, "unrecorded")
    before = snapshot(admin, "unrecorded")
    now = datetime.now(timezone.utc)
    creds = forge_certificate(
        svc,
        "unrecorded",
        "unrecorded-web-0",
        ("web",),
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(hours=1),
    )
    mark = svc.log_mark()
    with node_client(svc, creds) as node:
        assert node.get("/v1/work").status_code == 403
        assert node.put("/v1/attributes/web/port", json={"value": "1"}).status_code == 403
    assert snapshot(admin, "unrecorded") == before
    assert f"certificate {creds.serial} of unrecorded/unrecorded-web-0 is not current" in (
        svc.log_since(mark)
    )


def test_node_certificate_on_admin_routes_is_403(svc: Service, admin: httpx.Client) -> None:
    tokens = setup_cluster(svc, admin, "nodeadm")
    creds = enrol(svc, "nodeadm", "nodeadm-web-0", tokens["nodeadm-web-0"])
    before = snapshot(admin, "nodeadm")
    mark = svc.log_mark()
    attempts: list[tuple[str, str, Any]] = [
        ("GET", "/v1/admin/clusters", None),
        ("GET", "/v1/admin/clusters/nodeadm", None),
        # mint a token for a neighbour, promote itself to lb, release itself, delete a peer
        ("POST", "/v1/admin/clusters/nodeadm/tokens", {"nodes": ["nodeadm-web-1"]}),
        (
            "PUT",
            "/v1/admin/clusters/nodeadm/nodes",
            {
                "nodes": [
                    {
                        "name": "nodeadm-web-0",
                        "group": "web",
                        "roles": ["web", "lb"],
                        "pool": "local",
                    }
                ]
            },
        ),
        (
            "POST",
            "/v1/admin/clusters/nodeadm/roles",
            {"updates": [{"node": "nodeadm-web-0", "role": "web", "op": "verified"}]},
        ),
        ("DELETE", "/v1/admin/clusters/nodeadm/nodes/nodeadm-web-1", None),
        ("DELETE", "/v1/admin/clusters/nodeadm", None),
    ]
    with node_client(svc, creds) as node:
        for method, path, body in attempts:
            r = node.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert "tokens" not in r.text
    assert snapshot(admin, "nodeadm") == before
    log = svc.log_since(mark)
    for method, path, _ in attempts:
        assert f"refused {method} {path}: admin routes need the admin certificate" in log


def test_admin_certificate_on_node_routes_is_403(svc: Service, admin: httpx.Client) -> None:
    setup_cluster(svc, admin, "admnode")
    before = snapshot(admin, "admnode")
    mark = svc.log_mark()
    for method, path, body in [
        ("GET", "/v1/work", None),
        ("GET", "/v1/recipes", None),
        ("GET", "/v1/attributes/web/port", None),
        ("PUT", "/v1/attributes/web/port", {"value": "80"}),
        ("POST", "/v1/status", {"role": "web", "release": 1, "state": "done"}),
    ]:
        r = admin.request(method, path, json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert f"refused {method} {path}: not a node certificate" in svc.log_since(mark)
    assert snapshot(admin, "admnode") == before


# -- the blackboard -----------------------------------------------------------------------------


@dataclass
class Enrolled:
    cluster: str
    nodes: dict[str, NodeCreds]

    def client(self, svc: Service, node: str) -> httpx.Client:
        return node_client(svc, self.nodes[node])


def enrolled_cluster(
    svc: Service, admin: httpx.Client, c: str, nodes: list[tuple[str, str]] | None = None
) -> Enrolled:
    tokens = setup_cluster(svc, admin, c, nodes)
    return Enrolled(c, {n: enrol(svc, c, n, t) for n, t in tokens.items()})


def attributes_of(admin: httpx.Client, c: str) -> dict[str, dict[str, dict[str, str]]]:
    return {
        n["name"]: {role: s.get("attributes", {}) for role, s in n["roles"].items()}
        for n in snapshot(admin, c)["status"]["nodes"]
    }


def test_node_cannot_write_a_role_it_does_not_host(svc: Service, admin: httpx.Client) -> None:
    cl = enrolled_cluster(svc, admin, "bb-write")
    before = snapshot(admin, "bb-write")
    mark = svc.log_mark()
    with cl.client(svc, "bb-write-web-0") as web:
        r = web.put("/v1/attributes/lb/backends", json={"value": "evil:80"})
    assert r.status_code == 403, r.text
    assert snapshot(admin, "bb-write") == before
    assert (
        "refused PUT /v1/attributes/lb/backends: bb-write-web-0 does not host role 'lb'"
        in svc.log_since(mark)
    )


def test_node_cannot_read_a_role_it_neither_hosts_nor_depends_on(
    svc: Service, admin: httpx.Client
) -> None:
    cl = enrolled_cluster(svc, admin, "bb-read")
    with cl.client(svc, "bb-read-lb-0") as lb:
        assert lb.put("/v1/attributes/lb/secret", json={"value": "s3cret"}).status_code == 204
    mark = svc.log_mark()
    with cl.client(svc, "bb-read-web-0") as web:
        r = web.get("/v1/attributes/lb/secret")
    assert r.status_code == 403, r.text
    assert "s3cret" not in r.text
    assert "bb-read-web-0 neither hosts nor depends on role 'lb'" in svc.log_since(mark)


def test_dependent_role_reads_values_in_natural_node_order(
    svc: Service, admin: httpx.Client
) -> None:
    c = "bb-order"
    webs = [f"{c}-web-{i}" for i in (10, 2, 1, 0)]  # registered out of order on purpose
    cl = enrolled_cluster(svc, admin, c, [*((w, "web") for w in webs), (f"{c}-lb-0", "lb")])
    for w in webs:
        with cl.client(svc, w) as web:
            r = web.put("/v1/attributes/web/address", json={"value": f"{w}:8080"})
            assert r.status_code == 204, r.text
    with cl.client(svc, f"{c}-lb-0") as lb:
        r = lb.get("/v1/attributes/web/address")
    assert r.status_code == 200, r.text
    expected = [f"{c}-web-{i}" for i in (0, 1, 2, 10)]
    assert r.json() == {
        "role": "web",
        "key": "address",
        "values": [{"node": n, "value": f"{n}:8080"} for n in expected],
    }


def test_clusters_do_not_see_each_other(svc: Service, admin: httpx.Client) -> None:
    """Same role and key in two clusters (two appliances): each node sees its own cluster."""
    a = enrolled_cluster(svc, admin, "bb-iso-a")
    b = enrolled_cluster(svc, admin, "bb-iso-b")
    with a.client(svc, "bb-iso-a-web-0") as web:
        assert web.put("/v1/attributes/web/pw", json={"value": "a-secret"}).status_code == 204
    with b.client(svc, "bb-iso-b-lb-0") as lb:
        r = lb.get("/v1/attributes/web/pw")
    assert (r.status_code, r.json()["values"]) == (200, [])


TRAVERSALS = [
    "/v1/attributes/web/../lb/x",
    "/v1/attributes/web/..",
    "/v1/attributes/web/a/b",
    "/v1/attributes/web/..%2Fx",
    "/v1/attributes/web/a%2Fb",
    "/v1/attributes/web/%2E%2E",
    "/v1/attributes/..%2Flb/x",
    "/v1/attributes/web/x%00",
    "/v1/attributes/web/X",
    "/v1/attributes/web/" + "k" * 64,
]


def test_attribute_key_traversal_is_refused(svc: Service, admin: httpx.Client) -> None:
    """Raw paths (http.client normalizes nothing); every one is a 4xx and writes nothing."""
    cl = enrolled_cluster(svc, admin, "bb-trav")
    before = attributes_of(admin, "bb-trav")
    creds = cl.nodes["bb-trav-web-0"]
    ctx = svc.context(creds.cert_path, creds.key_path)
    conn = http.client.HTTPSConnection("127.0.0.1", svc.port, context=ctx, timeout=5)
    try:
        for path in TRAVERSALS:
            for method, body in (("PUT", b'{"value": "x"}'), ("GET", None)):
                headers = {"Content-Type": "application/json"} if body else {}
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                assert 400 <= r.status < 500, (method, path, r.status)
                if r.getheader("connection") == "close":
                    conn.close()
    finally:
        conn.close()
    assert attributes_of(admin, "bb-trav") == before


def test_attribute_value_limits(svc: Service, admin: httpx.Client) -> None:
    cl = enrolled_cluster(svc, admin, "bb-size")
    before = snapshot(admin, "bb-size")
    url = "/v1/attributes/web/blob"
    with cl.client(svc, "bb-size-web-0") as web:
        assert web.put(url, json={"value": "v" * (64 * 1024 + 1)}).status_code in (400, 413)
        assert web.put(url, json={"value": "a\x00b"}).status_code == 400
        big = b'{"value": "' + b"v" * (1 << 20) + b'"}'
        r = web.put(url, content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
    assert snapshot(admin, "bb-size") == before
    with cl.client(svc, "bb-size-web-0") as web:
        assert web.put(url, json={"value": "v" * (64 * 1024)}).status_code == 204  # the limit


def test_chunked_body_over_a_mebibyte_is_413(svc: Service, admin: httpx.Client) -> None:
    cl = enrolled_cluster(svc, admin, "bb-chunk")
    before = snapshot(admin, "bb-chunk")

    def chunks() -> Iterator[bytes]:
        yield b'{"value": "'
        for _ in range(17):
            yield b"v" * 65536
        yield b'"}'

    with cl.client(svc, "bb-chunk-web-0") as web:
        r = web.put(
            "/v1/attributes/web/blob",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
    assert "transfer-encoding" in r.request.headers
    assert snapshot(admin, "bb-chunk") == before
    assert r.status_code == 413, r.text


def test_value_limit_counts_bytes_not_characters(svc: Service, admin: httpx.Client) -> None:
    """64 KiB is a size: 65,536 four-byte characters are 256 KiB of UTF-8."""
    cl = enrolled_cluster(svc, admin, "bb-utf8")
    with cl.client(svc, "bb-utf8-web-0") as web:
        r = web.put("/v1/attributes/web/blob", json={"value": "\U0001f600" * (64 * 1024)})
    assert r.status_code in (400, 413), r.text


def test_the_257th_key_is_413(svc: Service, admin: httpx.Client) -> None:
    cl = enrolled_cluster(svc, admin, "bb-keys")
    with cl.client(svc, "bb-keys-web-0") as web:
        for i in range(256):
            assert web.put(f"/v1/attributes/web/k{i}", json={"value": "x"}).status_code == 204
        before = snapshot(admin, "bb-keys")
        r = web.put("/v1/attributes/web/k256", json={"value": "x"})
        assert r.status_code == 413, r.text
        assert snapshot(admin, "bb-keys") == before
        # an existing key can still be updated at the limit
        assert web.put("/v1/attributes/web/k0", json={"value": "y"}).status_code == 204
    attrs = attributes_of(admin, "bb-keys")["bb-keys-web-0"]["web"]
    assert (len(attrs), attrs["k0"], "k256" in attrs) == (256, "y", False)


# -- status reports -----------------------------------------------------------------------------


def test_status_reports_stale_release_409_and_foreign_role_403(
    svc: Service, admin: httpx.Client
) -> None:
    cl = enrolled_cluster(svc, admin, "st")
    r = admin.post(
        "/v1/admin/clusters/st/roles",
        json={"updates": [{"node": "st-web-0", "role": "web", "op": "release"}]},
    )
    assert r.status_code == 200, r.text
    before = snapshot(admin, "st")
    mark = svc.log_mark()
    with cl.client(svc, "st-web-0") as web:
        for release in (2, 7):
            r = web.post("/v1/status", json={"role": "web", "release": release, "state": "done"})
            assert r.status_code == 409, r.text
        r = web.post("/v1/status", json={"role": "lb", "release": 1, "state": "done"})
        assert r.status_code == 403, r.text
        assert snapshot(admin, "st") == before
        assert "refused POST /v1/status: st-web-0 does not host role 'lb'" in svc.log_since(mark)
        # the current release is accepted
        r = web.post("/v1/status", json={"role": "web", "release": 1, "state": "running"})
        assert r.status_code == 204, r.text
    assert node_state(admin, "st", "st-web-0")["roles"]["web"]["state"] == "running"


# -- revocation ---------------------------------------------------------------------------------


def _local_port(r: httpx.Response) -> int:
    return int(r.extensions["network_stream"].get_extra_info("client_addr")[1])


def test_deleted_node_is_refused_at_once_and_listed_in_the_crl(
    svc: Service, admin: httpx.Client
) -> None:
    cl = enrolled_cluster(svc, admin, "rev")
    victim = cl.nodes["rev-web-0"]
    with cl.client(svc, "rev-web-0") as kept:
        first = kept.get("/v1/work")
        assert first.status_code == 200, first.text
        r = admin.delete("/v1/admin/clusters/rev/nodes/rev-web-0")
        assert (r.status_code, r.json()) == (200, {"revoked": [victim.serial]})
        mark = svc.log_mark()
        # the same kept-alive connection (TLS said yes to it once): the route says no now
        again = kept.get("/v1/work")
        assert _local_port(again) == _local_port(first)
        assert again.status_code == 403, again.text
        assert kept.put("/v1/attributes/web/port", json={"value": "1"}).status_code == 403
    with cl.client(svc, "rev-web-0") as fresh:
        assert fresh.get("/v1/work").status_code == 403
        assert fresh.get("/v1/recipes").status_code == 403
    assert f"certificate {victim.serial} of rev/rev-web-0 is not current" in svc.log_since(mark)
    assert {n["name"] for n in snapshot(admin, "rev")["status"]["nodes"]} == {
        "rev-web-1",
        "rev-lb-0",
    }
    with cl.client(svc, "rev-web-1") as other:  # the neighbour is untouched
        assert other.get("/v1/work").status_code == 200
    with svc.client() as anonymous:
        r = anonymous.get("/v1/crl", params={"cluster": "rev"})
    assert r.status_code == 200
    crl = x509.load_pem_x509_crl(r.content)  # signed by the cluster's own CA
    ca = x509.load_pem_x509_certificate((svc.home.ca_dir / "clusters/rev/ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert victim.cert.issuer == ca.subject
    assert crl.get_revoked_certificate_by_serial_number(victim.cert.serial_number) is not None
    other_serial = cl.nodes["rev-web-1"].cert.serial_number
    assert crl.get_revoked_certificate_by_serial_number(other_serial) is None


def test_reenrolment_revokes_the_previous_certificate(svc: Service, admin: httpx.Client) -> None:
    cl = enrolled_cluster(svc, admin, "reenrol")
    old = cl.nodes["reenrol-web-0"]
    token = issue_tokens(svc, admin, "reenrol", ["reenrol-web-0"])["reenrol-web-0"]
    new = enrol(svc, "reenrol", "reenrol-web-0", token)
    with node_client(svc, old) as stolen, node_client(svc, new) as current:
        assert stolen.get("/v1/work").status_code == 403
        assert current.get("/v1/work").status_code == 200


def test_deleted_cluster_revokes_every_node_even_when_recreated(
    svc: Service, admin: httpx.Client
) -> None:
    """Teardown and a redeploy under the same names: the old certificates stay dead."""
    cl = enrolled_cluster(svc, admin, "redeploy")
    r = admin.delete("/v1/admin/clusters/redeploy")
    assert r.status_code == 200, r.text
    assert sorted(r.json()["revoked"]) == sorted(n.serial for n in cl.nodes.values())
    setup_cluster(svc, admin, "redeploy")  # same cluster, same node names
    for name in cl.nodes:
        with cl.client(svc, name) as old:
            assert old.get("/v1/work").status_code == 403
            assert old.put("/v1/attributes/web/port", json={"value": "1"}).status_code == 403
    assert all(n["state"] == "provisioned" for n in snapshot(admin, "redeploy")["status"]["nodes"])


def test_a_new_token_replaces_the_unused_one(svc: Service, admin: httpx.Client) -> None:
    first = setup_cluster(svc, admin, "tok-new")["tok-new-web-0"]
    second = issue_tokens(svc, admin, "tok-new", ["tok-new-web-0"])["tok-new-web-0"]
    _, csr = make_csr("tok-new-web-0")
    r = post_enrol(svc, "tok-new", "tok-new-web-0", first, csr)
    assert (r.status_code, r.json()) == (401, TOKEN_REFUSED)
    enrol(svc, "tok-new", "tok-new-web-0", second)


def test_a_node_moved_off_a_role_can_no_longer_write_or_feed_it(
    svc: Service, admin: httpx.Client
) -> None:
    cl = enrolled_cluster(svc, admin, "moved")
    with cl.client(svc, "moved-web-0") as web:
        assert web.put("/v1/attributes/web/addr", json={"value": "old:80"}).status_code == 204
    r = admin.put(
        "/v1/admin/clusters/moved/nodes",
        json={"nodes": [{"name": "moved-web-0", "group": "lb", "roles": ["lb"], "pool": "local"}]},
    )
    assert r.status_code == 200, r.text
    with cl.client(svc, "moved-web-0") as moved:
        assert moved.get("/v1/work").json()["roles"][0]["role"] == "lb"
        r = moved.put("/v1/attributes/web/addr", json={"value": "evil:80"})
    with cl.client(svc, "moved-lb-0") as lb:
        values = lb.get("/v1/attributes/web/addr").json()["values"]
    assert (r.status_code, [v["node"] for v in values]) == (403, [])


# -- transport ----------------------------------------------------------------------------------


def test_plaintext_http_on_the_tls_port_gets_no_http_answer(svc: Service) -> None:
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw:
        raw.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        try:
            while chunk := raw.recv(4096):  # the server must close; a timeout fails the test
                received += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/" not in received


def test_tls_1_1_is_refused(svc: Service) -> None:
    def context(maximum: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(svc.home.ca_file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = maximum
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # let this client really offer TLS 1.0/1.1
        return ctx

    with (
        socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError)) as refused,
    ):
        context(ssl.TLSVersion.TLSv1_1).wrap_socket(raw, server_hostname="127.0.0.1")
    # refused by the server, not by this client's own OpenSSL before sending a hello
    assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value)
    # control: the same client configuration with TLS 1.2 allowed gets through
    with (
        socket.create_connection(("127.0.0.1", svc.port), timeout=5) as raw,
        context(ssl.TLSVersion.TLSv1_2).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.2"


# -- restart ------------------------------------------------------------------------------------


def test_state_and_certificates_survive_a_restart(svc: Service, admin: httpx.Client) -> None:
    cl = enrolled_cluster(svc, admin, "persist")
    with cl.client(svc, "persist-web-0") as web:
        assert web.put("/v1/attributes/web/port", json={"value": "8080"}).status_code == 204
    r = admin.post(
        "/v1/admin/clusters/persist/roles",
        json={"updates": [{"node": "persist-web-0", "role": "web", "op": "release"}]},
    )
    assert r.status_code == 200, r.text
    assert admin.delete("/v1/admin/clusters/persist/nodes/persist-web-1").status_code == 200
    unused = issue_tokens(svc, admin, "persist", ["persist-lb-0"])["persist-lb-0"]
    with svc.client() as anonymous:
        fingerprint = anonymous.get("/v1/health").json()["ca_sha256"]
    before = snapshot(admin, "persist")
    admin.close()

    svc.stop()
    svc.start()

    with svc.admin() as admin2, svc.client() as anonymous:
        assert snapshot(admin2, "persist") == before
        assert anonymous.get("/v1/health").json()["ca_sha256"] == fingerprint
    with cl.client(svc, "persist-lb-0") as lb:
        r = lb.get("/v1/attributes/web/port")
        assert r.status_code == 200, r.text
        assert r.json()["values"] == [{"node": "persist-web-0", "value": "8080"}]
    with cl.client(svc, "persist-web-0") as web:
        work = web.get("/v1/work")
        assert work.status_code == 200, work.text
        assert work.json()["roles"][0]["release"] == 1
        r = web.post("/v1/status", json={"role": "web", "release": 1, "state": "running"})
        assert r.status_code == 204, r.text
    with cl.client(svc, "persist-web-1") as revoked:  # revocation survives too
        assert revoked.get("/v1/work").status_code == 403
    enrol(svc, "persist", "persist-lb-0", unused)  # so does an unused token


# -- secrets in logs ----------------------------------------------------------------------------


def test_no_token_ever_reaches_the_service_log(svc: Service, admin: httpx.Client) -> None:
    """Runs last: every token this module issued (used, refused, replayed, expired, replaced)
    against the whole log of the service, restarts included."""
    tokens = setup_cluster(svc, admin, "logscan")
    _, csr = make_csr("logscan-web-1")
    assert (
        post_enrol(svc, "logscan", "logscan-web-1", tokens["logscan-web-0"], csr).status_code == 401
    )
    enrol(svc, "logscan", "logscan-web-0", tokens["logscan-web-0"])
    log = svc.log.read_text()
    assert "enrolment refused" in log and "enrolled logscan/logscan-web-0" in log  # the real log
    leaked = [t for t in svc.tokens if t in log]
    assert (leaked, len(svc.tokens) >= 3) == ([], True)


def test_service_on_the_address_real_machines_dial_serves_its_ca(tmp_path: Path) -> None:
    """CRV_SERVICE_ADDRESS (a rack's provisioning network): the service listens there, its
    certificate names that address, and GET /v1/ca - what a network-booted machine fetches and
    pins by fingerprint - answers the CA itself, without a client certificate."""
    address = "127.0.0.5"
    home = Home(tmp_path / "home")
    with socket.socket() as s:
        s.bind((address, 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CRV_HOME": str(home.root), "CRV_SERVICE_ADDRESS": address}
    log = tmp_path / "service.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crv.service", "--host", address, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )  # fmt: skip
    try:
        deadline, answer = time.monotonic() + START_TIMEOUT, None
        while answer is None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            if home.ca_file.exists():
                ctx = ssl.create_default_context(cafile=str(home.ca_file))  # checks the IP SAN
                with contextlib.suppress(httpx.TransportError, OSError):
                    answer = httpx.get(f"https://{address}:{port}/v1/ca", verify=ctx, timeout=2)
            time.sleep(0.05)
        assert answer is not None and answer.status_code == 200, log.read_text()
        assert answer.content == home.ca_file.read_bytes()
    finally:
        proc.terminate()
        proc.wait(10)


def test_admin_reads_a_metric_attribute_with_its_age(svc: Service, admin: httpx.Client) -> None:
    """The autoscale flow's blackboard metric: every node's value with the seconds since it was
    last set; setting the same value again makes it fresh (a rate that did not change is still
    current). Only the admin certificate may read it this way."""
    c = "bb-metric"
    cl = enrolled_cluster(svc, admin, c, [(f"{c}-lb-0", "lb"), (f"{c}-web-0", "web")])
    with cl.client(svc, f"{c}-lb-0") as lb:
        assert lb.put("/v1/attributes/lb/rps", json={"value": "42"}).status_code == 204
        time.sleep(1.1)
        first = admin.get(f"/v1/admin/clusters/{c}/attributes/lb/rps").json()["values"]
        assert [(v["node"], v["value"]) for v in first] == [(f"{c}-lb-0", "42")]
        assert 1.0 <= first[0]["age"] < 30
        assert lb.put("/v1/attributes/lb/rps", json={"value": "42"}).status_code == 204
        again = admin.get(f"/v1/admin/clusters/{c}/attributes/lb/rps").json()["values"]
        assert again[0]["age"] < first[0]["age"]
        assert lb.get(f"/v1/admin/clusters/{c}/attributes/lb/rps").status_code in (401, 403)
    assert admin.get("/v1/admin/clusters/nope/attributes/lb/rps").status_code == 404


# -- autoscaling ----------------------------------------------------------------------------------


def a_decision(group: str = "web", **change: Any) -> dict[str, Any]:
    return {"group": group, "at": 1000.0, "metric": 12.5, "current": 2, "desired": 3,
            "target": 3, "action": "grow", "reason": "12.5 / 5 per node = 3",
            "last_scale_up": 1000.0, **change}  # fmt: skip


def test_admin_autoscaling_setting_and_decisions(svc: Service, admin: httpx.Client) -> None:
    c = "as-admin"
    setup_cluster(svc, admin, c)
    path = f"/v1/admin/clusters/{c}/autoscaling"
    r = admin.get(path)  # never set: off
    assert r.status_code == 200 and r.json() == {"cluster": c, "enabled": False, "every": None}
    r = admin.put(path, json={"enabled": True, "every": 30})
    assert r.status_code == 200 and r.json() == {"cluster": c, "enabled": True, "every": 30.0}
    assert admin.put(path, json={"enabled": True, "every": 86400}).status_code == 200
    for every in (0, -5, 86400.5, 1e9, "60", None):
        r = admin.put(path, json={"enabled": False, "every": every})
        assert r.status_code == 400, (every, r.text)
    assert admin.put(path, json={"every": 60}).status_code == 400  # enabled is required
    assert admin.get(path).json() == {"cluster": c, "enabled": True, "every": 86400.0}
    listed = admin.get("/v1/admin/autoscaling")
    assert listed.status_code == 200
    assert {"cluster": c, "enabled": True, "every": 86400.0} in listed.json()["clusters"]

    decisions = f"/v1/admin/clusters/{c}/decisions"
    assert admin.get(decisions).json() == {"decisions": []}
    first = admin.post(decisions, json=a_decision())
    assert first.status_code == 200, first.text
    quiet = admin.post(decisions, json=a_decision("lb", action="none", target=2, metric=None))
    seqs = [first.json()["seq"], quiet.json()["seq"]]
    assert seqs[0] < seqs[1]
    got = admin.get(decisions).json()["decisions"]
    assert [d["seq"] for d in got] == seqs[::-1]  # newest first
    assert got[1] == {**a_decision(), "seq": seqs[0], "outcome": None, "flow_run": None,
                      "low_since": None, "last_action": None}  # fmt: skip
    web = admin.get(decisions, params={"group": "web"}).json()["decisions"]
    assert [d["seq"] for d in web] == [seqs[0]]
    one = admin.get(decisions, params={"limit": 1}).json()["decisions"]
    assert [d["seq"] for d in one] == [seqs[1]]
    for limit in (0, 1001, "many"):
        assert admin.get(decisions, params={"limit": limit}).status_code == 400, limit

    r = admin.patch(f"{decisions}/{seqs[0]}", json={"outcome": "grew 2 -> 3"})
    assert r.status_code == 204, r.text
    assert admin.get(decisions, params={"group": "web"}).json()["decisions"][0]["outcome"] == (
        "grew 2 -> 3"
    )
    assert admin.patch(f"{decisions}/{seqs[1] + 1000}", json={"outcome": "x"}).status_code == 404
    # a text over its length is too large (413), as a body over its size in bytes
    assert admin.patch(f"{decisions}/{seqs[0]}", json={"outcome": "x" * 4097}).status_code == 413

    before = admin.get(decisions).json()
    for bad, status in (
        (a_decision(action="explode"), 400),
        (a_decision(reason="x" * 4097), 413),
        (a_decision(outcome="x" * 4097), 413),
        (a_decision(current=-1), 400),
        (a_decision(colour="red"), 400),
        ({k: v for k, v in a_decision().items() if k != "reason"}, 400),
    ):
        r = admin.post(decisions, json=bad)
        assert r.status_code == status, (bad, r.text)
    assert admin.get(decisions).json() == before  # nothing recorded
    assert admin.post(decisions, json=a_decision(reason="x" * 4096)).status_code == 200

    # another cluster's decision is not this one's to change
    setup_cluster(svc, admin, "as-other")
    r = admin.patch(f"/v1/admin/clusters/as-other/decisions/{seqs[0]}", json={"outcome": "x"})
    assert r.status_code == 404
    assert admin.get("/v1/admin/clusters/as-other/decisions").json() == {"decisions": []}
    for method, route, body in [
        ("GET", "/v1/admin/clusters/as-none/autoscaling", None),
        ("PUT", "/v1/admin/clusters/as-none/autoscaling", {"enabled": True, "every": 60}),
        ("GET", "/v1/admin/clusters/as-none/decisions", None),
        ("POST", "/v1/admin/clusters/as-none/decisions", a_decision()),
        ("PATCH", f"/v1/admin/clusters/as-none/decisions/{seqs[0]}", {"outcome": "x"}),
    ]:
        r = admin.request(method, route, json=body)
        assert r.status_code == 404 and "as-none" in r.text, (method, route, r.text)
    assert "as-none" not in {s["cluster"] for s in admin.get("/v1/admin/autoscaling").json()[
        "clusters"]}  # fmt: skip

    # deleting the cluster deletes its setting and decisions
    assert admin.delete(f"/v1/admin/clusters/{c}").status_code == 200
    assert c not in {s["cluster"] for s in admin.get("/v1/admin/autoscaling").json()["clusters"]}
    setup_cluster(svc, admin, c)
    assert admin.get(path).json()["enabled"] is False
    assert admin.get(decisions).json() == {"decisions": []}


def test_node_certificate_on_autoscaling_routes_is_403(svc: Service, admin: httpx.Client) -> None:
    c = "as-node"
    cl = enrolled_cluster(svc, admin, c)
    assert admin.put(f"/v1/admin/clusters/{c}/autoscaling", json={"enabled": True}).status_code == (
        200
    )
    seq = admin.post(f"/v1/admin/clusters/{c}/decisions", json=a_decision()).json()["seq"]
    setting = admin.get(f"/v1/admin/clusters/{c}/autoscaling").json()
    decisions = admin.get(f"/v1/admin/clusters/{c}/decisions").json()
    before = snapshot(admin, c)
    mark = svc.log_mark()
    attempts: list[tuple[str, str, Any]] = [
        ("GET", "/v1/admin/autoscaling", None),
        ("GET", f"/v1/admin/clusters/{c}/autoscaling", None),
        ("PUT", f"/v1/admin/clusters/{c}/autoscaling", {"enabled": False, "every": 5}),
        ("GET", f"/v1/admin/clusters/{c}/decisions", None),
        ("POST", f"/v1/admin/clusters/{c}/decisions", a_decision(reason="forged")),
        ("PATCH", f"/v1/admin/clusters/{c}/decisions/{seq}", {"outcome": "forged"}),
    ]
    with cl.client(svc, f"{c}-lb-0") as node:
        for method, path, body in attempts:
            r = node.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
    assert admin.get(f"/v1/admin/clusters/{c}/autoscaling").json() == setting
    assert admin.get(f"/v1/admin/clusters/{c}/decisions").json() == decisions
    assert snapshot(admin, c) == before
    log = svc.log_since(mark)
    for method, path, _ in attempts:
        assert f"refused {method} {path}: admin routes need the admin certificate" in log
