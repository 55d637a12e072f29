"""One CA per cluster: node certificates of each cluster are issued by that cluster's own
intermediate CA under the service's root, so a daemon of one cluster that trusts its cluster's
CA never accepts a node of another. Checked with the real service, a real TLS server standing
for a daemon, and the real `openssl`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from crv.service.pki import CertificateAuthority
from tests.test_service_security import (
    NodeCreds,
    Service,
    make_csr,
    post_enrol,
    setup_cluster,
    started_service,
    write_creds,
)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from started_service(tmp_path_factory)


def enrol(svc: Service, c: str, node: str, token: str) -> tuple[NodeCreds, str]:
    """The node's credentials (certificate file = certificate + its cluster's CA, as the agent
    writes it) and the cluster CA bundle the answer carries."""
    key, csr = make_csr(node)
    r = post_enrol(svc, c, node, token, csr)
    assert r.status_code == 200, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    creds = write_creds(svc, c, node, cert, key)
    assert creds.cert_path.read_text() == r.json()["certificate"]
    return creds, r.json()["cluster_ca"]


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def split(bundle: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle.encode())


def daemon(anchor: Path, creds: NodeCreds) -> tuple[int, list[str], threading.Thread]:
    """A TLS server standing for a daemon of a cluster: it serves with its node's certificate
    and trusts only its cluster's CA (a partial-chain trust anchor, as
    `openssl verify -partial_chain` or a daemon pinning its cluster's CA does)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(creds.cert_path, creds.key_path)
    ctx.load_verify_locations(anchor)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    outcomes: list[str] = []

    def serve() -> None:
        with listener:
            for _ in range(2):
                conn, _ = listener.accept()
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
                        cn = peer.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                        outcomes.append(f"accepted {cn[0].value}")
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError) as e:
                    outcomes.append(f"refused: {e}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, outcomes, thread


def connect(port: int, creds: NodeCreds, root: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(root))
    ctx.check_hostname = False
    ctx.load_cert_chain(creds.cert_path, creds.key_path)
    with (
        contextlib.suppress(ssl.SSLError, OSError),
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.recv(2)


def test_each_cluster_has_its_own_ca_and_a_daemon_of_one_refuses_nodes_of_another(
    svc: Service, tmp_path: Path
) -> None:
    a_tokens = setup_cluster(svc, svc.admin(), "ca-a")
    b_tokens = setup_cluster(svc, svc.admin(), "ca-b")
    a, a_bundle = enrol(svc, "ca-a", "ca-a-web-0", a_tokens["ca-a-web-0"])
    b, b_bundle = enrol(svc, "ca-b", "ca-b-web-0", b_tokens["ca-b-web-0"])
    b2, _ = enrol(svc, "ca-b", "ca-b-web-1", b_tokens["ca-b-web-1"])
    root = svc.home.ca_file
    root_cert = x509.load_pem_x509_certificate(root.read_bytes())

    # each cluster's bundle: its own CA, then the root; its nodes are issued by its own CA
    a_ca, a_root = split(a_bundle)
    b_ca, b_root = split(b_bundle)
    assert a_root == b_root == root_cert
    assert a_ca.subject != b_ca.subject and a_ca.issuer == b_ca.issuer == root_cert.subject
    assert a.cert.issuer == a_ca.subject and b.cert.issuer == b_ca.subject
    bc = b_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0  # it cannot make CAs of its own

    # every node certificate chains to the root (the service and openssl agree)
    for creds in (a, b):
        proc = openssl("verify", "-CAfile", str(root), "-untrusted", str(creds.cert_path),
                       str(creds.cert_path))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    # trusting cluster b's CA alone: b's nodes pass, a's do not
    (tmp_path / "b-ca.pem").write_text(b_bundle.split("-----END CERTIFICATE-----")[0]
                                       + "-----END CERTIFICATE-----\n")  # fmt: skip
    anchor = tmp_path / "b-ca.pem"
    ok = openssl("verify", "-partial_chain", "-CAfile", str(anchor), str(b.cert_path))
    assert ok.returncode == 0, ok.stderr
    refused = openssl("verify", "-partial_chain", "-CAfile", str(anchor), str(a.cert_path))
    assert refused.returncode != 0, refused.stdout

    # a daemon of cluster b (a real TLS server) accepts b's other node and refuses a's
    port, outcomes, thread = daemon(anchor, b)
    connect(port, b2, root)
    connect(port, a, root)
    thread.join(20)
    assert outcomes[0] == "accepted ca-b-web-1", outcomes
    assert outcomes[1].startswith("refused"), outcomes


def test_a_deleted_cluster_s_ca_is_retired_and_its_nodes_stay_revoked(
    svc: Service, tmp_path: Path
) -> None:
    admin = svc.admin()
    tokens = setup_cluster(svc, admin, "ca-gone")
    creds, bundle = enrol(svc, "ca-gone", "ca-gone-web-0", tokens["ca-gone-web-0"])
    ca_dir = svc.home.ca_dir / "clusters" / "ca-gone"
    old_ca = split(bundle)[0]
    assert (ca_dir / "ca.key").exists()
    assert admin.delete("/v1/admin/clusters/ca-gone").status_code == 200
    assert not (ca_dir / "ca.key").exists()  # it can sign nothing more

    with httpx.Client(base_url=svc.url, verify=svc.context()) as client:
        pem = client.get("/v1/crl").content
    (tmp_path / "crls.pem").write_bytes(pem)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(svc.home.ca_file.read_bytes() + old_ca.public_bytes(Encoding.PEM))
    # openssl, with every CRL the service publishes: the node's certificate is revoked, and
    # its CA too (the root's CRL)
    proc = openssl("verify", "-crl_check_all", "-CAfile", str(chain), "-CRLfile",
                   str(tmp_path / "crls.pem"), str(creds.cert_path))  # fmt: skip
    assert proc.returncode != 0
    assert "revoked" in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    # made again under the same name: a new CA, which no daemon of the old cluster pins
    tokens = setup_cluster(svc, admin, "ca-gone")
    _, again = enrol(svc, "ca-gone", "ca-gone-web-0", tokens["ca-gone-web-0"])
    new_ca = split(again)[0]
    assert new_ca.subject != old_ca.subject and new_ca.serial_number != old_ca.serial_number


def test_a_root_made_before_cluster_cas_still_signs_nodes_itself(tmp_path: Path) -> None:
    """A CA directory from before cluster CAs (pathlen 0: it may not have CAs below it) keeps
    working: its nodes are signed by the root itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "crv cluster CA")])
    now = datetime.now(timezone.utc)
    old = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    directory = tmp_path / "old"
    directory.mkdir(mode=0o700)
    (directory / "ca.key").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                         NoEncryption()))  # fmt: skip
    (directory / "ca.key").chmod(0o600)
    (directory / "ca.crt").write_bytes(old.public_bytes(Encoding.PEM))
    legacy = CertificateAuthority.create_or_load(directory)
    assert not legacy.per_cluster and legacy.cluster_ca("c1") is legacy

    ca = CertificateAuthority.create_or_load(tmp_path / "new")
    assert ca.per_cluster and ca.cluster_ca("c1") is not ca
    assert ca.cluster_ca("c1", create=False) is not None
    assert ca.cluster_ca("c2", create=False) is None
    assert not (tmp_path / "new" / "clusters" / "c2").exists()
