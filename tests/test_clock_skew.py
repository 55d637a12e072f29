"""F14: nodes whose clocks are off (docs/pki.md, "Clock skew").

Every certificate crv issues (root CA, cluster CA, node, service, admin) and its CRLs are
back-dated by `SKEW_MARGIN`, so a node whose clock is up to `CLOCK_TOLERANCE` (10 min) behind
or ahead of the service's works, even right after `crv up` made the CA and the service's
certificate. Join tokens are checked on the service's clock only. Beyond the tolerance, the
agent says in one line of its log which clock is off and by how much.

End to end: a real service process, real agents (agent/crv_agent.py) under libfaketime
(Debian `faketime`, LD_PRELOAD) with their own clock, recipes that check certificates with
openssl on that clock. The service is fresh for the module, so its CA and its certificate are
seconds old when the skewed nodes first meet it: the case a smaller margin fails.

libfaketime 0.9.10 (Debian's) cannot run Python 3.11 as is: with the monotonic clock faked,
timed lock waits never end (sem_clockwait is not wrapped); with it left alone
(FAKETIME_DONT_FAKE_MONOTONIC), time.sleep fails with EINVAL (its clock_nanosleep wrapper shifts
an absolute CLOCK_MONOTONIC deadline by the offset: libfaketime issue #426). So the skewed agent
gets a sitecustomize (SLEEP_SHIM) that makes time.sleep wait in select(), as Python up to 3.10
did; nothing else of the agent or its clock is touched.
"""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import os
import re
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crv.service.pki import CLOCK_TOLERANCE, SKEW_MARGIN, CertificateAuthority
from tests.test_agent_renewal import AGENT, Agent, release, role_state, wait_for
from tests.test_agent_unit import agent as agent_module
from tests.test_pki import make_csr, openssl
from tests.test_renewal import FAKETIME_LIB, needs_faketime
from tests.test_service_security import Service, issue_tokens, started_service

# a peer daemon's check of a certificate, on this node's clock: its own against its cluster's
# CA bundle (what mysql-ha's MariaDB or HTCondor do with a peer's), the clock it ran at noted
RECIPE = b"""#!/bin/sh
echo "clock $(date -u +%s)" >> "$CRV_AGENT_HOME/verify.log"
openssl verify -CAfile "$CRV_CLUSTER_CA_FILE" "$CRV_CERT_FILE" >> "$CRV_AGENT_HOME/verify.log" 2>&1
"""
SLEEP_SHIM = """\
import os, select, time

if os.environ.get("FAKETIME"):  # libfaketime issue #426: Python 3.11's sleep, done as 3.10's
    def _sleep(seconds, _select=select.select):
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        _select([], [], [], seconds)

    time.sleep = _sleep
"""


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from started_service(tmp_path_factory)


def _bundle() -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("a0/roles/web.sh")
        info.size, info.mode = len(RECIPE), 0o755
        tar.addfile(info, io.BytesIO(RECIPE))
    return base64.b64encode(buf.getvalue()).decode()


def cluster(svc: Service, c: str, nodes: list[str], token_ttl: float = 600.0) -> dict[str, str]:
    spec = {
        "appliance": "skew",
        "source": "/nowhere/skew",
        "pool": "local",
        "parameters": {},
        "roles": {"web": {"recipe": "a0/roles/web.sh", "appdir": "a0", "env": {},
                          "depends_on": []}},
        "bundle": _bundle(),
    }  # fmt: skip
    with svc.admin() as admin:
        assert admin.put(f"/v1/admin/clusters/{c}", json=spec).status_code == 200
        items = [
            {"name": n, "group": "web", "roles": ["web"], "pool": "local", "state": "provisioned"}
            for n in nodes
        ]
        r = admin.put(f"/v1/admin/clusters/{c}/nodes", json={"nodes": items})
        assert r.status_code == 200, r.text
        return issue_tokens(svc, admin, c, nodes, token_ttl)


class SkewedAgent(Agent):
    """An agent whose clock (and its recipes', which inherit the preload) is `offset` off:
    libfaketime's FAKETIME syntax, "-10m", "+2h"; the monotonic clock is left alone."""

    def __init__(self, *args: object, offset: str | None, deadline: float = 600.0) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.offset, self.deadline = offset, deadline

    def start(self) -> None:
        env = dict(os.environ)
        if self.offset:
            shim = self.home / "faketime-shim"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
            env.update(
                LD_PRELOAD=str(FAKETIME_LIB),
                FAKETIME=self.offset,
                FAKETIME_DONT_FAKE_MONOTONIC="1",
                FAKETIME_NO_CACHE="1",
                PYTHONPATH=str(shim),
            )
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(AGENT), "run", "--home", str(self.home),
                 "--deadline", str(self.deadline)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )  # fmt: skip

    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.home / "node.crt").read_bytes())

    def verify_log(self) -> str:
        try:
            return (self.home / "verify.log").read_text()
        except OSError:
            return ""


def skew_of(offset: str) -> float:
    sign, number, unit = offset[0], float(offset[1:-1]), offset[-1]
    seconds = number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    return seconds if sign == "+" else -seconds


def node_state(svc: Service, c: str, node: str) -> str:
    with svc.admin() as admin:
        found = admin.get(f"/v1/admin/clusters/{c}").json()["nodes"]
    return str(next(n for n in found if n["name"] == node)["state"])


def run_role(svc: Service, c: str, a: SkewedAgent) -> None:
    """Releases the node's role and waits for its recipe (the openssl check) to succeed."""
    assert release(svc, c, a.node) == 1
    done = wait_for("role done", lambda: role_state(svc, c, a.node)[0] in ("done", "failed"), 60, a)
    assert done
    assert role_state(svc, c, a.node) == ("done", 1), a.verify_log()


def openssl_at(offset: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """openssl on a clock `offset` off (libfaketime), as a peer daemon on a skewed node."""
    env = {
        **os.environ,
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=30
    )


# -- unit: every certificate kind is back-dated --------------------------------------------------


def test_every_certificate_crv_issues_is_back_dated_beyond_the_tolerance(tmp_path: Path) -> None:
    """The root CA, a cluster CA, a node certificate, the service's and the admin's, and the
    CRLs start SKEW_MARGIN (15 min) before now; the margin leaves room over the 10 min
    tolerance. openssl accepts the node's chain at now -10 min and now +10 min, and refuses it
    at now -16 min, before the margin."""
    assert timedelta(minutes=10) == CLOCK_TOLERANCE
    assert CLOCK_TOLERANCE + timedelta(minutes=5) <= SKEW_MARGIN  # room over the tolerance
    assert CLOCK_TOLERANCE.total_seconds() == agent_module.CLOCK_TOLERANCE  # one figure, twice
    before = datetime.now(timezone.utc).replace(microsecond=0)
    root = CertificateAuthority.create_or_load(tmp_path / "ca")
    cluster_ca = root.cluster_ca("demo")
    assert cluster_ca is not None
    node = cluster_ca.sign_node_csr(make_csr(tmp_path), cluster="demo", node="web-0", roles=["web"])
    _, server = root.issue_server_certificate(["localhost"], ["127.0.0.1"])
    _, admin = root.issue_admin_certificate()
    after = datetime.now(timezone.utc)
    kinds = {
        "root CA": root.certificate,
        "cluster CA": cluster_ca.certificate,
        "node": node,
        "service": server,
        "admin": admin,
    }
    for kind, cert in kinds.items():
        assert before - SKEW_MARGIN <= cert.not_valid_before_utc <= after - SKEW_MARGIN, kind
    for authority in (root, cluster_ca):
        crl = authority.build_crl([], crl_number=1)
        assert before - SKEW_MARGIN <= crl.last_update_utc <= after - SKEW_MARGIN

    (tmp_path / "node.crt").write_bytes(node.public_bytes(Encoding.PEM))
    (tmp_path / "bundle.crt").write_bytes(cluster_ca.chain_pem)
    now = int(time.time())
    for skew in (-10 * 60, +10 * 60):
        openssl("verify", "-attime", str(now + skew), "-CAfile", "bundle.crt", "node.crt",
                cwd=tmp_path)  # fmt: skip
    early = openssl("verify", "-attime", str(now - 16 * 60), "-CAfile", "bundle.crt", "node.crt",
                    cwd=tmp_path, check=False)  # fmt: skip
    assert early.returncode != 0
    assert "not yet valid" in early.stdout + early.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status": "ok"}'
        self.send_response(200)  # with a Date header
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_expired_service_certificate_on_a_right_clock_is_named_as_such(tmp_path: Path) -> None:
    """When this node's clock agrees with the service's Date, the date failure is the
    certificate's, not the clock's: the agent's line says so. A real TLS server with a
    certificate of a crv CA that ended yesterday; the agent's own Service class."""
    root = CertificateAuthority.create_or_load(tmp_path / "ca")
    ca_key = serialization.load_pem_private_key((tmp_path / "ca" / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=366))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "server.crt").write_bytes(cert.public_bytes(Encoding.PEM))
    (tmp_path / "server.key").write_bytes(
        key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        service = agent_module.Service(url, agent_module.tls_context(tmp_path / "ca" / "ca.crt"))
        with pytest.raises(agent_module.Unreachable) as refused:
            service.request("GET", "/v1/work")
        assert re.fullmatch(
            r"127\.0\.0\.1:\d+: the service's certificate has expired although this node's "
            r"clock agrees with the service's \(service Date: [^)]+ GMT\): renew the "
            r"certificate on the service",
            str(refused.value),
        ), refused.value
    finally:
        server.shutdown()
        server.server_close()


# -- end to end: skewed agents against a fresh service -----------------------------------------


@pytest.mark.faults
@needs_faketime
def test_nodes_ten_minutes_behind_and_ahead_join_and_check_each_other(
    svc: Service, tmp_path: Path
) -> None:
    """Right after the service made its CA and its certificate: a node 10 min behind and one
    10 min ahead enrol, with tokens of 2 minutes (the +10 min node would call its token ended
    on its own clock), their recipes' openssl accepts their certificates on their own clocks,
    each accepts the other's, and each certificate starts SKEW_MARGIN before the service's now.
    Neither logs a clock warning (within the tolerance)."""
    assert time.time() - svc.home.ca_file.stat().st_mtime < 300  # the CA is minutes old at most
    nodes = {"skew-behind": "-10m", "skew-ahead": "+10m"}
    tokens = cluster(svc, "skew", list(nodes), token_ttl=120)
    agents = {
        n: SkewedAgent(svc, tmp_path / n, "skew", n, tokens[n], offset=offset)
        for n, offset in nodes.items()
    }
    started = datetime.now(timezone.utc)
    for a in agents.values():
        a.start()
    try:
        for a in agents.values():
            wait_for("enrolled", a.serial, 60, a)
            assert a.cert().not_valid_before_utc <= started - SKEW_MARGIN + timedelta(seconds=1)
            assert node_state(svc, "skew", a.node) == "enrolled"
        for a in agents.values():
            run_role(svc, "skew", a)
            clock = int(re.findall(r"clock (\d+)", a.verify_log())[-1])
            assert abs(clock - time.time() - skew_of(a.offset or "+0s")) < 30, a.verify_log()
            assert "node.crt: OK" in a.verify_log(), a.verify_log()
        # each node's peer check of the other's certificate, on its own clock
        behind, ahead = agents["skew-behind"], agents["skew-ahead"]
        for checker, other in ((behind, ahead), (ahead, behind)):
            assert checker.offset is not None
            r = openssl_at(checker.offset, "verify", "-CAfile", "cluster-ca.crt",
                           str(other.home / "node.crt"), cwd=checker.home)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
        for a in agents.values():
            assert "clock is" not in a.log.read_text(), a.log.read_text()
    finally:
        for a in agents.values():
            a.stop()


@pytest.mark.faults
@needs_faketime
def test_a_node_two_hours_behind_says_so_in_one_line_and_joins_once_its_clock_is_set(
    svc: Service, tmp_path: Path
) -> None:
    """Beyond the tolerance: the service's certificate is not valid yet on the node's clock.
    The agent logs one line naming the skew, the service's Date and what to do, retries until
    its enrolment deadline (a clock set by NTP a moment later would let it in), then exits 1
    with the same words. The token is not spent: with its clock set the node joins."""
    tokens = cluster(svc, "late", ["late-web-0"])
    a = SkewedAgent(svc, tmp_path / "node", "late", "late-web-0", tokens["late-web-0"],
                    offset="-2h", deadline=5)  # fmt: skip
    begun = time.monotonic()
    a.start()
    try:
        assert a.proc is not None
        code = a.proc.wait(60)
        took = time.monotonic() - begun
        log = a.log.read_text()
        assert code == 1, log
        assert took < 20, f"{took:.0f} s for a 5 s enrolment deadline"
        lines = [line for line in log.splitlines() if "this node's clock is" in line]
        assert len(lines) == 2, log  # once when it first failed, once at the deadline
        first, last = lines
        assert re.search(
            r"crv-agent: 127\.0\.0\.1:\d+: this node's clock is (1:59:5\d|2:00:0\d) behind the "
            r"service's \(service Date: \w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT\): the "
            r"service's certificate is not valid yet by this clock; set this node's clock "
            r"\(NTP\); retrying$",
            first,
        ), first
        assert last.startswith("crv-agent: not enrolled before the deadline: 127.0.0.1:"), last
        assert "Traceback" not in log
        assert node_state(svc, "late", "late-web-0") == "provisioned"  # the token is unspent

        a.offset = None  # the clock set (NTP): the same home, the same token
        a.start()
        wait_for("enrolled with the clock set", a.serial, 60, a)
        assert node_state(svc, "late", "late-web-0") == "enrolled"
    finally:
        a.stop()


@pytest.mark.faults
@needs_faketime
def test_a_node_two_hours_ahead_joins_on_a_short_token_and_warns_in_one_line(
    svc: Service, tmp_path: Path
) -> None:
    """The token (1 min) is checked on the service's clock only: a node 2 h ahead enrols with
    it, and its role runs. It is beyond the tolerance (its peers' certificates may look ended to
    it before they are renewed), so the agent warns once, at enrolment, naming the skew."""
    tokens = cluster(svc, "early", ["early-web-0"], token_ttl=60)
    a = SkewedAgent(svc, tmp_path / "node", "early", "early-web-0", tokens["early-web-0"],
                    offset="+2h")  # fmt: skip
    a.start()
    try:
        wait_for("enrolled", a.serial, 60, a)
        run_role(svc, "early", a)
        lines = [line for line in a.log.read_text().splitlines() if "clock is" in line]
        assert len(lines) == 1, a.log.read_text()
        assert re.search(
            r"crv-agent: this node's clock is (1:59:5\d|2:00:0\d) ahead of the service's "
            r"\(service Date: [^)]+\), more than the 0:10:00 crv tolerates: its peers' "
            r"certificates may look ended before they are renewed; set this node's clock "
            r"\(NTP\)$",
            lines[0],
        ), lines[0]
    finally:
        a.stop()


@pytest.mark.faults
@needs_faketime
def test_a_node_a_year_ahead_finds_the_service_certificate_expired_and_says_why(
    svc: Service, tmp_path: Path
) -> None:
    """The service's certificate (a year) has expired by a clock 400 days ahead: the line says
    that this clock is ahead, by how much, and what to do."""
    tokens = cluster(svc, "far", ["far-web-0"])
    a = SkewedAgent(svc, tmp_path / "node", "far", "far-web-0", tokens["far-web-0"],
                    offset="+400d", deadline=3)  # fmt: skip
    a.start()
    try:
        assert a.proc is not None
        assert a.proc.wait(30) == 1, a.log.read_text()
        last = a.log.read_text().strip().splitlines()[-1]
        assert re.fullmatch(
            r"crv-agent: not enrolled before the deadline: 127\.0\.0\.1:\d+: this node's clock "
            r"is 400 d 0:00:0\d ahead of the service's \(service Date: [^)]+\): the service's "
            r"certificate has expired by this clock; set this node's clock \(NTP\)",
            last,
        ), last
        assert node_state(svc, "far", "far-web-0") == "provisioned"
    finally:
        a.stop()
