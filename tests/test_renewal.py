"""Trust over time at the service: renewal, re-joining after expiry, a lost enrolment answer.

A real service process over real TLS (the helpers of test_service_security). Time is moved
with libfaketime (Debian `faketime`) on the service process only, as a node that was off for
two days, or for a month, meets it: the service restarts with `FAKETIME=+2d` on the same
CRV_HOME. Every refusal is checked for its status and for the reason in the service log.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests import conftest
from tests.test_service_security import (
    NodeCreds,
    Service,
    assert_handshake_refused,
    enrol,
    forge_certificate,
    make_csr,
    node_client,
    post_enrol,
    setup_cluster,
    started_service,
    write_creds,
)

REJOIN_CONTEXT = b"crv-rejoin-v1\x00"
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
needs_faketime = pytest.mark.skipif(
    not FAKETIME_LIB.exists() and os.environ.get("CI") != "true",
    reason="libfaketime (Debian package faketime) is not installed",
)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from started_service(tmp_path_factory)


@pytest.fixture
def admin(svc: Service) -> Iterator[httpx.Client]:
    with svc.admin() as client:
        yield client


def renew(svc: Service, creds: NodeCreds, csr: bytes) -> httpx.Response:
    with node_client(svc, creds) as client:
        return client.post("/v1/renew", json={"csr": csr.decode()})


def work_status(svc: Service, creds: NodeCreds) -> int:
    with node_client(svc, creds) as client:
        return client.get("/v1/work").status_code


def uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(san.get_values_for_type(x509.UniformResourceIdentifier))


def crl_serials(svc: Service) -> set[int]:
    with svc.client() as client:
        return conftest.crl_serials(client.get("/v1/crl").content)


# -- renewal -----------------------------------------------------------------------------------


def test_renewal_gives_the_same_identity_and_supersedes_the_old_one_once_used(
    svc: Service, admin: httpx.Client
) -> None:
    tokens = setup_cluster(svc, admin, "ren-ok")
    old = enrol(svc, "ren-ok", "ren-ok-web-0", tokens["ren-ok-web-0"])
    key, csr = make_csr("ren-ok-web-0")
    r = renew(svc, old, csr)
    assert r.status_code == 200, r.text
    new_cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    assert (
        uris(new_cert)
        == uris(old.cert)
        == [
            "crv://ren-ok/node/ren-ok-web-0",
            "crv://ren-ok/role/web",
        ]
    )
    assert new_cert.serial_number != old.cert.serial_number
    assert 23 * 3600 < r.json()["expires_in"] <= 24 * 3600
    new = write_creds(svc, "ren-ok", "ren-ok-web-0", new_cert, key)

    # the old one works until the new one is used (an agent killed before it saved the
    # answer is not locked out), then it is superseded: refused and in the CRL
    assert work_status(svc, old) == 200
    assert work_status(svc, new) == 200
    assert work_status(svc, old) == 403
    assert old.cert.serial_number in crl_serials(svc)
    assert new_cert.serial_number not in crl_serials(svc)


def test_renewal_with_a_csr_naming_another_node_is_refused_and_logged(
    svc: Service, admin: httpx.Client
) -> None:
    tokens = setup_cluster(svc, admin, "ren-other")
    creds = enrol(svc, "ren-other", "ren-other-web-0", tokens["ren-other-web-0"])
    mark = svc.log_mark()
    _, csr = make_csr("ren-other-web-1")
    r = renew(svc, creds, csr)
    assert r.status_code == 400, r.text
    assert "renewal of ren-other/ren-other-web-0 refused" in svc.log_since(mark)
    assert "'ren-other-web-1' is not 'ren-other-web-0'" in svc.log_since(mark)
    assert work_status(svc, creds) == 200  # the current certificate is untouched


def test_renewal_with_a_revoked_certificate_is_refused_and_logged(
    svc: Service, admin: httpx.Client
) -> None:
    tokens = setup_cluster(svc, admin, "ren-rev")
    creds = enrol(svc, "ren-rev", "ren-rev-web-0", tokens["ren-rev-web-0"])
    # a new enrolment (the node remade) revokes the earlier certificate
    again = setup_cluster(svc, admin, "ren-rev")
    enrol(svc, "ren-rev", "ren-rev-web-0", again["ren-rev-web-0"])
    mark = svc.log_mark()
    r = renew(svc, creds, make_csr("ren-rev-web-0")[1])
    assert r.status_code == 403, r.text
    assert f"refused POST /v1/renew: certificate {creds.serial}" in svc.log_since(mark)


def test_renewal_with_an_expired_certificate_fails_the_handshake(
    svc: Service, admin: httpx.Client
) -> None:
    setup_cluster(svc, admin, "ren-exp")
    now = time.time()
    from datetime import datetime, timezone

    creds = forge_certificate(
        svc,
        "ren-exp",
        "ren-exp-web-0",
        ("web",),
        not_before=datetime.fromtimestamp(now - 7200, timezone.utc),
        not_after=datetime.fromtimestamp(now - 3600, timezone.utc),
    )
    assert_handshake_refused(svc, creds.cert_path, creds.key_path, "/v1/renew")


# -- a lost enrolment answer -------------------------------------------------------------------


def test_the_same_enrolment_again_gets_the_same_certificate(
    svc: Service, admin: httpx.Client
) -> None:
    """The answer to a successful enrolment was lost: the agent sends the same token and CSR
    again and gets the very same certificate; a different CSR with the spent token does not."""
    tokens = setup_cluster(svc, admin, "lost")
    key, csr = make_csr("lost-web-0")
    first = post_enrol(svc, "lost", "lost-web-0", tokens["lost-web-0"], csr)
    again = post_enrol(svc, "lost", "lost-web-0", tokens["lost-web-0"], csr)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json()["certificate"] == first.json()["certificate"]
    cert = x509.load_pem_x509_certificate(again.json()["certificate"].encode())
    assert work_status(svc, write_creds(svc, "lost", "lost-web-0", cert, key)) == 200

    other = post_enrol(svc, "lost", "lost-web-0", tokens["lost-web-0"], make_csr("lost-web-0")[1])
    assert other.status_code == 401, other.text
    wrong_token = post_enrol(svc, "lost", "lost-web-0", "B" * 43, csr)
    assert wrong_token.status_code == 401, wrong_token.text


# -- re-joining --------------------------------------------------------------------------------


def rejoin_body(creds: NodeCreds, key: Any, csr: bytes, signer: Any = None) -> dict[str, str]:
    signature = (signer or key).sign(REJOIN_CONTEXT + csr, ec.ECDSA(hashes.SHA256()))
    return {
        "cluster": creds.cluster,
        "node": creds.node,
        "certificate": creds.cert.public_bytes(serialization.Encoding.PEM).decode(),
        "csr": csr.decode(),
        "signature": base64.b64encode(signature).decode(),
    }


def post_rejoin(svc: Service, body: dict[str, str]) -> httpx.Response:
    with svc.client() as client:
        return client.post("/v1/rejoin", json=body)


def old_key(creds: NodeCreds) -> Any:
    return serialization.load_pem_private_key(creds.key_path.read_bytes(), None)


@pytest.fixture(scope="module")
def later(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service of its own, restarted with the clock moved by the tests."""
    yield from started_service(tmp_path_factory)


def at_time(svc: Service, offset: str | None) -> None:
    svc.stop()
    svc.env = {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": offset} if offset else {}
    svc.start()


@needs_faketime
def test_a_node_back_after_its_certificate_ended_rejoins_with_its_last_key(
    later: Service,
) -> None:
    with later.admin() as admin:
        tokens = setup_cluster(later, admin, "back")
    creds = enrol(later, "back", "back-web-0", tokens["back-web-0"])
    other = enrol(later, "back", "back-web-1", tokens["back-web-1"])
    dates = {"not_before": creds.cert.not_valid_before_utc,
             "not_after": creds.cert.not_valid_after_utc}  # fmt: skip
    forged = forge_certificate(later, "back", "back-web-0", ("web",), by_cluster_ca=True, **dates)
    by_root = forge_certificate(later, "back", "back-web-0", ("web",), **dates)
    try:
        at_time(later, "+2d")  # the certificates (24 h) ended a day ago
        assert_handshake_refused(later, creds.cert_path, creds.key_path)
        key, csr = make_csr("back-web-0")
        mark = later.log_mark()

        # refused: no proof of possession, another node's certificate, one never recorded
        stranger = ec.generate_private_key(ec.SECP256R1())
        r = post_rejoin(later, rejoin_body(creds, old_key(creds), csr, signer=stranger))
        assert r.status_code == 403, r.text
        body = rejoin_body(other, old_key(other), csr)
        r = post_rejoin(later, {**body, "node": "back-web-0"})
        assert r.status_code == 403, r.text
        r = post_rejoin(later, rejoin_body(forged, old_key(forged), csr))
        assert r.status_code == 403, r.text
        r = post_rejoin(later, rejoin_body(by_root, old_key(by_root), csr))
        assert r.status_code == 403, r.text
        log = later.log_since(mark)
        assert "the certificate shown was not issued by its cluster's CA" in log
        assert "re-join of back/back-web-0 refused: no proof of possession" in log
        assert "is not back/back-web-0's" in log
        assert f"certificate {forged.serial} is not its" in log

        r = post_rejoin(later, rejoin_body(creds, old_key(creds), csr))
        assert r.status_code == 200, r.text
        cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
        assert uris(cert) == uris(creds.cert)
        new = write_creds(later, "back", "back-web-0", cert, key)
        assert work_status(later, new) == 200
        # the certificate it re-joined with is superseded: it cannot re-join a second time
        again = post_rejoin(later, rejoin_body(creds, old_key(creds), make_csr("back-web-0")[1]))
        assert again.status_code == 403, again.text
        assert f"certificate {creds.serial} is revoked" in later.log_since(mark)
    finally:
        at_time(later, None)


@needs_faketime
def test_a_node_back_after_the_grace_period_is_refused_and_reported(later: Service) -> None:
    with later.admin() as admin:
        tokens = setup_cluster(later, admin, "gone")
    creds = enrol(later, "gone", "gone-web-0", tokens["gone-web-0"])
    try:
        at_time(later, "+32d")
        mark = later.log_mark()
        r = post_rejoin(later, rejoin_body(creds, old_key(creds), make_csr("gone-web-0")[1]))
        assert r.status_code == 403, r.text
        log = later.log_since(mark)
        assert f"re-join of gone/gone-web-0 refused: certificate {creds.serial} ended at" in log
        assert "more than 30 days ago" in log
        with later.admin() as admin:
            events = admin.get("/v1/admin/clusters/gone/events").json()["events"]
        kinds = [e["kind"] for e in events if e["node"] == "gone-web-0"]
        assert "rejoin_refused" in kinds and "rejoined" not in kinds  # reported to the flows
    finally:
        at_time(later, None)


@needs_faketime
def test_a_removed_node_cannot_rejoin(later: Service) -> None:
    with later.admin() as admin:
        tokens = setup_cluster(later, admin, "removed")
        creds = enrol(later, "removed", "removed-web-0", tokens["removed-web-0"])
        assert admin.delete("/v1/admin/clusters/removed/nodes/removed-web-0").status_code == 200
    try:
        at_time(later, "+2d")
        mark = later.log_mark()
        r = post_rejoin(later, rejoin_body(creds, old_key(creds), make_csr("removed-web-0")[1]))
        assert r.status_code == 403, r.text
        expected = "re-join of removed/removed-web-0 refused: not a member (unknown)"
        assert expected in later.log_since(mark)
    finally:
        at_time(later, None)
