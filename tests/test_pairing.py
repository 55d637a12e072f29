"""Pairing a machine crv did not make (issue 17 item 8): a one-time PIN, the real agent's
`pair` command pinning the CA by fingerprint, single use, wrong PINs locking a pairing out, a
lost answer sent again, and a verify the agent runs on the node and reports.

A real service process and real agent processes (agent/crv_agent.py); the paired machine's
address is 127.0.0.254, where nothing listens: crv never has to dial it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.test_agent_renewal import AGENT, cluster
from tests.test_service_security import Service, started_service

UNREACHABLE = "127.0.0.254"  # nothing listens there


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from started_service(tmp_path_factory)


def fingerprint(svc: Service) -> str:
    pem = svc.home.ca_file.read_bytes()
    return hashlib.sha256(
        x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    ).hexdigest()


def open_pairing(svc: Service, c: str, ttl: float = 600.0) -> dict[str, Any]:
    with svc.admin() as admin:
        r = admin.post(
            f"/v1/admin/clusters/{c}/pairings", json={"group": "web", "roles": ["web"], "ttl": ttl}
        )
    assert r.status_code == 200, r.text
    made: dict[str, Any] = r.json()
    assert made["ca_sha256"] == fingerprint(svc)
    return made


def pairing(svc: Service, ident: str) -> dict[str, Any]:
    with svc.admin() as admin:
        r = admin.get(f"/v1/admin/pairings/{ident}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def status(svc: Service, c: str) -> dict[str, Any]:
    with svc.admin() as admin:
        return dict(admin.get(f"/v1/admin/clusters/{c}").json())


def agent_pair(
    svc: Service, home: Path, pin: str, *extra: str, ca: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(AGENT), "pair", "--home", str(home), svc.url, pin,
         "--ca-sha256", ca or fingerprint(svc), "--address", UNREACHABLE, "--no-run", *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_pin_pairs_one_machine_into_the_group_and_only_once(svc: Service, tmp_path: Path) -> None:
    cluster(svc, "pa", [])
    made = open_pairing(svc, "pa")
    assert pairing(svc, made["id"])["state"] == "open"
    mark = svc.log_mark()
    # as typed by a person: lower case, no dash
    r = agent_pair(svc, tmp_path / "m1", made["pin"].lower().replace("-", ""))
    assert r.returncode == 0, r.stderr
    assert "paired as pa-web-0 of cluster pa" in r.stderr
    node = next(n for n in status(svc, "pa")["nodes"] if n["name"] == "pa-web-0")
    assert (node["pool"], node["state"], node["address"]) == ("manual", "enrolled", UNREACHABLE)
    assert status(svc, "pa")["counts"] == {"web": 1}
    assert pairing(svc, made["id"])["state"] == "paired"
    cert = x509.load_pem_x509_certificate((tmp_path / "m1" / "node.crt").read_bytes())
    assert cert.subject.rfc4514_string().startswith("CN=pa-web-0")
    assert made["pin"] not in svc.log_since(mark)  # only its hash is kept, never logged

    # the same PIN from another machine: refused, and the reason is in the service log
    r = agent_pair(svc, tmp_path / "m2", made["pin"])
    assert r.returncode == 3, r.stderr
    assert "pairing refused" in r.stderr
    assert "PIN already used (by pa/pa-web-0)" in svc.log_since(mark)
    assert [n["name"] for n in status(svc, "pa")["nodes"]] == ["pa-web-0"]

    # the paired machine pairs no more: its agent just carries on
    r = agent_pair(svc, tmp_path / "m1", "WRONG-PIN0")
    assert r.returncode == 0 and "already paired as pa-web-0" in r.stderr


def test_ten_wrong_pins_lock_the_pairing_out(svc: Service, tmp_path: Path) -> None:
    cluster(svc, "pb", [])
    made = open_pairing(svc, "pb")
    mark = svc.log_mark()
    with httpx.Client(base_url=svc.url, verify=svc.context(), timeout=30) as anon:
        for i in range(5):  # refused for what they are before any PIN is looked at
            r = anon.post("/v1/pair", json={"pin": f"0000-000{i}", "csr": "x"})
            assert r.status_code == 400, r.text
    assert pairing(svc, made["id"])["failures"] == 0
    r = agent_pair(svc, tmp_path / "m", "0000-ZZZZ")  # a real agent, a wrong PIN
    assert r.returncode == 3 and "wrong PIN" in r.stderr
    with httpx.Client(base_url=svc.url, verify=svc.context(), timeout=30) as anon:
        started = time.monotonic()
        for i in range(9):
            r = anon.post("/v1/pair", json={"pin": f"1111-111{i}", "csr": _csr()})
            assert r.status_code == 403 and r.json()["detail"] == "pairing refused: wrong PIN"
        assert time.monotonic() - started >= 9 * 1.0  # a wrong PIN is answered slowly
    assert pairing(svc, made["id"])["state"] == "locked"
    r = agent_pair(svc, tmp_path / "right", made["pin"])  # the right PIN, too late
    assert r.returncode == 3
    assert "locked out after 10 wrong PINs" in r.stderr
    assert "locked out" in svc.log_since(mark)
    assert status(svc, "pb")["nodes"] == []


def test_a_lost_answer_is_sent_again_and_another_key_is_refused(svc: Service) -> None:
    cluster(svc, "pc", [])
    made = open_pairing(svc, "pc")
    first_csr, other_csr = _csr(), _csr()
    with httpx.Client(base_url=svc.url, verify=svc.context(), timeout=30) as anon:
        one = anon.post("/v1/pair", json={"pin": made["pin"], "csr": first_csr})
        assert one.status_code == 200, one.text
        again = anon.post("/v1/pair", json={"pin": made["pin"], "csr": first_csr})
        assert again.status_code == 200, again.text
        assert again.json()["certificate"] == one.json()["certificate"]
        assert again.json()["node"] == one.json()["node"] == "pc-web-0"
        other = anon.post("/v1/pair", json={"pin": made["pin"], "csr": other_csr})
        assert other.status_code == 403
    assert len(status(svc, "pc")["nodes"]) == 1


def test_the_agent_trusts_only_the_ca_with_the_printed_fingerprint(
    svc: Service, tmp_path: Path
) -> None:
    cluster(svc, "pd", [])
    made = open_pairing(svc, "pd")
    r = agent_pair(svc, tmp_path / "m", made["pin"], ca="ab" * 32)
    assert r.returncode == 2
    assert "does not match ca_sha256" in r.stderr
    assert pairing(svc, made["id"])["state"] == "open"  # nothing was sent: the PIN still works
    assert not (tmp_path / "m" / "node.crt").exists()


def test_a_csr_that_names_a_node_is_refused_before_the_pin_is_spent(svc: Service) -> None:
    cluster(svc, "pe", [])
    made = open_pairing(svc, "pe")
    with httpx.Client(base_url=svc.url, verify=svc.context(), timeout=30) as anon:
        r = anon.post("/v1/pair", json={"pin": made["pin"], "csr": _csr("pe-web-7")})
        assert r.status_code == 400
        assert "it names no node" in r.json()["detail"]
        r = anon.post("/v1/pair", json={"pin": made["pin"], "csr": _csr(), "address": "nope"})
        assert r.status_code == 400
    assert pairing(svc, made["id"])["state"] == "open"


def test_pairing_a_cluster_that_does_not_exist_is_404(svc: Service) -> None:
    with svc.admin() as admin:
        r = admin.post("/v1/admin/clusters/ghost/pairings", json={"group": "web", "roles": []})
    assert r.status_code == 404


def test_the_paired_agent_runs_its_recipes_and_the_checks_asked_of_it(
    svc: Service, tmp_path: Path
) -> None:
    """A verify on the node: asked through the service, run by the agent (which only calls
    out), reported back, and a failing one reported with its exit code and output."""
    cluster(svc, "pf", [])
    made = open_pairing(svc, "pf")
    home = tmp_path / "m"
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(AGENT), "pair", "--home", str(home), svc.url, made["pin"],
             "--ca-sha256", made["ca_sha256"], "--address", UNREACHABLE],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(lambda: _node_state(svc, "pf", "pf-web-0") == "enrolled", log)
        with svc.admin() as admin:
            release = {"node": "pf-web-0", "role": "web", "op": "release"}
            assert admin.post("/v1/admin/clusters/pf/roles", json={"updates": [release]}).is_success
        _wait_for(lambda: _role(svc, "pf")["state"] == "done", log)
        ok = _check(svc, "pf", 'grep -q recipe ../ran.log && echo "seen on $CRV_NODE"', log)
        assert (ok["exit_code"], ok["output"].strip()) == (0, "seen on pf-web-0")
        bad = _check(svc, "pf", "echo broken; exit 3", log)
        assert (bad["exit_code"], bad["output"].strip()) == (3, "broken")
    finally:
        proc.kill()
        proc.wait(10)


def _node_state(svc: Service, c: str, node: str) -> str | None:
    return next((n["state"] for n in status(svc, c)["nodes"] if n["name"] == node), None)


def _role(svc: Service, c: str) -> dict[str, Any]:
    return dict(status(svc, c)["nodes"][0]["roles"]["web"])


def _check(svc: Service, c: str, command: str, log: Path) -> dict[str, Any]:
    with svc.admin() as admin:
        after = admin.get(f"/v1/admin/clusters/{c}/events", params={"after": 0}).json()["last"]
        ask = {"node": f"{c}-web-0", "role": "web", "op": "check", "message": command}
        r = admin.post(f"/v1/admin/clusters/{c}/roles", json={"updates": [ask]})
        assert r.status_code == 200, r.text
        ident = r.json()["results"][0]["check"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            batch = admin.get(
                f"/v1/admin/clusters/{c}/events", params={"after": after, "wait": 5}
            ).json()
            for ev in batch["events"]:
                if ev["kind"] == "check" and ev["release"] == ident:
                    return dict(ev)
            after = batch["last"]
    pytest.fail(f"check {ident} was not reported:\n{log.read_text()[-2000:]}")


def _wait_for(ready: Any, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out; agent log:\n{log.read_text()[-3000:]}")


def _csr(cn: str | None = None) -> str:
    """A CSR for a fresh P-256 key, without names unless `cn` (what a paired agent sends)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(names))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(Encoding.PEM).decode()
