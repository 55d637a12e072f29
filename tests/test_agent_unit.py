"""The node agent's parts that need no service: key, CSR, bundle, recipes and CLI errors.

Keys and CSRs are judged by what the peers use: the crv CA (`cryptography`), the real
`openssl` command and Python's own `ssl` module. The agent runs on guests with any python3
from 3.8 on, so its source is also checked against 3.8 (and run by 3.8 when one is here).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import py_compile
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from crv.service.pki import CertificateAuthority

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent" / "crv_agent.py"
NODE = "c-web-0"


def _load_agent():  # type: ignore[no-untyped-def]
    """By path: the agent is a standalone file, not part of the installed crv package."""
    spec = importlib.util.spec_from_file_location("crv_agent", AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crv_agent"] = module
    spec.loader.exec_module(module)
    return module


agent = _load_agent()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create_or_load(tmp_path_factory.mktemp("ca"))


def openssl_verifies(csr_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "req", "-in", str(csr_path), "-verify", "-noout"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def issue(ca: CertificateAuthority, csr: bytes) -> x509.Certificate:
    return ca.sign_node_csr(csr, cluster="c", node=NODE, roles=["web"])


def spki(key: object) -> bytes:
    from cryptography.hazmat.primitives.serialization import PublicFormat

    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


# --- key and CSR ----------------------------------------------------------------------------


def test_csrs_from_many_keys_are_accepted_by_the_ca_and_by_openssl(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Random keys and nonces: about half of the r, s and coordinates have the top bit set
    (DER adds a zero byte) and some start with zero bytes (DER drops them)."""
    for i in range(50):
        key = agent.generate_key()
        csr = agent.make_csr(NODE, key)
        cert = issue(ca, csr)
        assert cert.public_key().public_numbers().x == key[1][0]  # type: ignore[union-attr]
        path = tmp_path / f"{i}.csr"
        path.write_bytes(csr)
        proc = openssl_verifies(path)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("d", "k"),
    [
        (1, 379),  # d = 1: a private key of 31 zero bytes and a one; k: r < 2**248
        (379, 43),  # public x < 2**248 (leading zero byte, kept by the fixed width)
        (43, 2),  # public y < 2**248
    ],
)
def test_edge_keys_and_nonces(
    d: int, k: int, ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = (d, agent._multiply(d))
    monkeypatch.setattr(agent.secrets, "randbelow", lambda _n: k - 1)  # nonce k
    csr = agent.make_csr(NODE, key)
    assert x509.load_pem_x509_csr(csr).is_signature_valid
    issue(ca, csr)
    (tmp_path / "r.csr").write_bytes(csr)
    assert openssl_verifies(tmp_path / "r.csr").returncode == 0
    loaded = load_pem_private_key(agent.key_pem(key), password=None)
    assert loaded.private_numbers().private_value == d  # type: ignore[union-attr]


def test_csr_names_the_node_and_nothing_else(ca: CertificateAuthority) -> None:
    csr = x509.load_pem_x509_csr(agent.make_csr(NODE, agent.generate_key()))
    assert csr.subject.rfc4514_string() == f"CN={NODE}"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NODE]
    assert len(csr.extensions) == 1


def test_csr_refuses_a_bad_node_name() -> None:
    with pytest.raises(agent.ConfigError, match="bad node name"):
        agent.make_csr("../evil", agent.generate_key())


def test_key_loads_with_ssl_and_cryptography_and_matches_the_certificate(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    key = agent.generate_key()
    csr = agent.make_csr(NODE, key)
    cert_path, key_path = tmp_path / "node.crt", tmp_path / "node.key"
    cert_path.write_bytes(issue(ca, csr).public_bytes(Encoding.PEM))
    agent.write_file(key_path, agent.key_pem(key), 0o600)

    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert_path), str(key_path))
    assert agent.identity_ok(cert_path, key_path)
    private = load_pem_private_key(key_path.read_bytes(), password=None)
    assert private.private_numbers().private_value == key[0]  # type: ignore[union-attr]
    assert spki(private.public_key()) == spki(x509.load_pem_x509_csr(csr).public_key())
    other = tmp_path / "other.key"
    agent.write_file(other, agent.key_pem(agent.generate_key()), 0o600)
    assert not agent.identity_ok(cert_path, other)


def test_key_file_is_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"old")  # replaced whole, by rename
    old_umask = os.umask(0)
    try:
        agent.write_file(path, agent.key_pem(agent.generate_key()), 0o600)
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----\n")
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temporary left


def test_der_integers_are_minimal() -> None:
    assert agent._der_int(0) == b"\x02\x01\x00"
    assert agent._der_int(0x7F) == b"\x02\x01\x7f"
    assert agent._der_int(0x80) == b"\x02\x02\x00\x80"
    assert agent._der_int(0x0100) == b"\x02\x02\x01\x00"
    assert agent._der(0x04, b"x" * 200)[:3] == b"\x04\x81\xc8"


# --- CA pinning ---------------------------------------------------------------------------


def test_ca_is_trusted_only_with_the_pinned_fingerprint(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    pem = ca.certificate_pem.decode()
    boot = {"ca": pem, "ca_sha256": ca.fingerprint_sha256}
    agent.install_ca(tmp_path, boot)
    assert x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()) == ca.certificate
    other = CertificateAuthority.create_or_load(tmp_path / "other")
    with pytest.raises(agent.ConfigError, match="does not match ca_sha256"):
        agent.install_ca(tmp_path, {**boot, "ca": other.certificate_pem.decode()})


# --- recipe bundles -----------------------------------------------------------------------


def make_tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def entry(name: str, data: bytes = b"", mode: int = 0o644, kind: bytes = tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "a0/roles/web.sh"
    return info, data


def test_bundle_unpacks_files_and_dirs_and_keeps_the_exec_bit(tmp_path: Path) -> None:
    data = make_tar(
        entry("a0", kind=tarfile.DIRTYPE, mode=0o700),
        entry("a0/roles/web.sh", b"#!/bin/sh\necho hi\n", mode=0o750),
        entry("./a0/roles/lib/common.sh", b"x=1\n", mode=0o666),
        entry("a1/", kind=tarfile.DIRTYPE),
    )
    dest = tmp_path / "appliance"
    agent.extract_bundle(data, dest)
    script = dest / "a0" / "roles" / "web.sh"
    assert script.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert script.stat().st_mode & 0o777 == 0o755
    assert (dest / "a0/roles/lib/common.sh").stat().st_mode & 0o777 == 0o644
    assert (dest / "a1").is_dir()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([entry("../x", b"x")], "unsafe name"),
        ([entry("a0/../../x", b"x")], "unsafe name"),
        ([entry("/etc/cron.d/x", b"x")], "unsafe name"),
        ([entry("a0/link", kind=tarfile.SYMTYPE)], "not a regular file"),
        ([entry("a0/hard", kind=tarfile.LNKTYPE)], "not a regular file"),
        ([entry("a0/dev", kind=tarfile.CHRTYPE)], "not a regular file"),
        ([entry("a0/fifo", kind=tarfile.FIFOTYPE)], "not a regular file"),
        ([entry("a0/x", b"1"), entry("a0/x", b"2")], "File exists"),
        ([entry("a0/big", b"x" * 600), entry("a0/big2", b"x" * 600)], "more than 1000 bytes"),
    ],
)
def test_bundle_refuses_what_is_not_plain_files(
    members: list[tuple[tarfile.TarInfo, bytes]], message: str, tmp_path: Path
) -> None:
    with pytest.raises(agent.BundleError, match=message):
        agent.extract_bundle(make_tar(*members), tmp_path / "appliance", max_bytes=1000)
    assert not (tmp_path / "x").exists()


def test_bundle_refuses_garbage_and_too_many_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(agent.BundleError, match="unreadable"):
        agent.extract_bundle(b"not a gzip tar", tmp_path / "a")
    monkeypatch.setattr(agent, "MAX_BUNDLE_MEMBERS", 2)
    data = make_tar(*(entry(f"f{i}", b"") for i in range(3)))
    with pytest.raises(agent.BundleError, match="more than 2 entries"):
        agent.extract_bundle(data, tmp_path / "b")


# --- work and recipes -----------------------------------------------------------------------


def work_answer(**role: object) -> dict[str, object]:
    item = {"role": "web", "release": 1, "recipe": "a0/roles/web.sh", "appdir": "a0"}
    item.update(role)
    return {
        "generation": 3,
        "group": "web",
        "address": "127.0.1.2",
        "stop": False,
        "bundle": "ab" * 32,
        "roles": [item],
    }


@pytest.mark.parametrize(
    "role",
    [
        {"role": "../etc"},
        {"release": "1"},
        {"release": True},
        {"env": {"A=B": "x"}},
        {"env": {"A": "x\0y"}},
        {"recipe": None},
    ],
)
def test_work_answers_are_checked_before_use(role: dict[str, object]) -> None:
    with pytest.raises(agent.AgentError, match="malformed /v1/work"):
        agent.parse_work(work_answer(**role))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "appliance" / "a0" / "roles").mkdir(parents=True)
    return home


def recipe(home: Path, text: str, executable: bool = True) -> None:
    path = home / "appliance" / "a0" / "roles" / "web.sh"
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755 if executable else 0o644)


BOOT = {"cluster": "c", "node": NODE}


def run(home: Path, timeout: float = 10.0, **role: object) -> tuple[int | None, str]:
    work = agent.parse_work(work_answer(env={"CRV_PARAM_PORT": "8080", "CRV_NODE": "x"}, **role))
    return agent.run_recipe(home, BOOT, work, work.roles[0], timeout)  # type: ignore[no-any-return]


def test_recipe_environment_and_output(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRV_HOME", "/admin/keys")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("HARMLESS", "yes")
    agent.install_shim(home)
    recipe(
        home,
        'pwd; crv-agent --version; env | sort | grep -E "^(CRV_|AWS|HARMLESS)"; echo oops >&2; exit 3\n',
    )
    code, output = run(home)
    assert code == 3
    lines = output.splitlines()
    assert lines[:2] == [str(home / "work"), f"crv-agent {agent.VERSION}"]
    assert f"CRV_APPLIANCE_DIR={home / 'appliance' / 'a0'}" in lines
    assert f"CRV_AGENT_HOME={home}" in lines
    assert f"CRV_NODE={NODE}" in lines  # the role's env cannot change the node's identity
    assert "CRV_PARAM_PORT=8080" in lines
    assert "CRV_ADDRESS=127.0.1.2" in lines
    assert "HARMLESS=yes" in lines and "oops" in lines
    assert not [line for line in lines if line.startswith(("CRV_HOME=", "AWS_SECRET"))]
    log = (home / "logs" / "web.log").read_text()
    assert log.startswith("=== ") and "role web release 1 ===" in log


def test_an_agent_installed_as_crv_agent_is_left_alone(tmp_path: Path) -> None:
    """The local pool copies the agent to home/bin/crv-agent: that directory goes on PATH
    and no shim may replace the program itself."""
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    installed = home / "bin" / "crv-agent"
    shutil.copy(AGENT, installed)
    script = f"""
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
loader = SourceFileLoader("a", {str(installed)!r})
a = module_from_spec(spec_from_loader("a", loader))
loader.exec_module(a)
a.install_shim(Path({str(home)!r}))
print(a.agent_bin(Path({str(home)!r})))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert proc.stdout == f"{home / 'bin'}\n"
    assert installed.read_bytes() == AGENT.read_bytes()


def test_recipe_without_exec_bit_runs_with_sh_and_log_appends(home: Path) -> None:
    recipe(home, "echo first\n", executable=False)
    assert run(home) == (0, "first\n")
    recipe(home, "echo second\n", executable=False)
    assert run(home, release=2) == (0, "second\n")
    assert (home / "logs" / "web.log").read_text().count("===") == 4
    assert (home / "logs" / "web.log").stat().st_mode & 0o777 == 0o600


def test_output_is_the_last_4_kib(home: Path) -> None:
    recipe(home, "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done\n")
    code, output = run(home)
    assert code == 0 and len(output) == 4096 and output.endswith("line1999\n")


def alive(pid: int) -> bool:
    """A killed orphan may stay a zombie where PID 1 does not reap: that counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_background_daemons_survive_success(home: Path) -> None:
    recipe(home, "nohup sleep 30 >/dev/null 2>&1 &\necho $! > daemon.pid\n")
    assert run(home)[0] == 0
    pid = int((home / "work" / "daemon.pid").read_text())
    try:
        assert alive(pid)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_timeout_kills_the_recipe_and_its_children(home: Path) -> None:
    recipe(home, "sleep 30 &\necho $! > child.pid\nsleep 30\n")
    started = time.monotonic()
    code, output = run(home, timeout=0.5)
    assert code is None and "timed out after 0.5 s" in output
    assert time.monotonic() - started < 5
    pid = int((home / "work" / "child.pid").read_text())
    time.sleep(0.1)
    assert not alive(pid)


def test_missing_recipe_is_a_failed_run(home: Path) -> None:
    code, output = run(home, recipe="a0/roles/nope.sh")
    assert code == 127 and "not in the recipe bundle" in output
    code, output = run(home, recipe="../../etc/passwd")
    assert code == 127 and "leaves the appliance directory" in output


# --- command line -----------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRV_")}
    return subprocess.run(
        [sys.executable, str(AGENT), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "args", [("get", "web", "url"), ("list", "web", "url"), ("set", "url", "x")]
)
def test_cli_without_home_says_so_in_one_line(args: tuple[str, ...]) -> None:
    proc = cli(*args, env={"CRV_ROLE": "web"})
    assert proc.returncode == 2
    assert proc.stderr == "crv-agent: no agent home: pass --home DIR or set CRV_AGENT_HOME\n"
    assert proc.stdout == ""


def test_cli_set_outside_a_recipe_and_bad_names(tmp_path: Path) -> None:
    proc = cli("set", "url", "x", "--home", str(tmp_path))
    assert (proc.returncode, proc.stderr) == (
        2,
        "crv-agent: CRV_ROLE is not set: `crv-agent set` runs inside a recipe\n",
    )
    proc = cli("get", "web", "../x", "--home", str(tmp_path))
    assert (proc.returncode, proc.stderr) == (
        2,
        "crv-agent: bad attribute key '../x': lowercase letters, digits and _\n",
    )
    proc = cli("--version")
    assert (proc.returncode, proc.stdout) == (0, f"crv-agent {agent.VERSION}\n")


def write_home(home: Path, ca: CertificateAuthority, port: int) -> None:
    home.mkdir()
    boot = {
        "service": f"https://127.0.0.1:{port}",
        "ca": ca.certificate_pem.decode(),
        "ca_sha256": ca.fingerprint_sha256,
        "cluster": "c",
        "node": NODE,
    }
    (home / "bootstrap.json").write_text(__import__("json").dumps(boot))


def test_cli_before_enrolment_and_with_the_service_down(
    ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "home"
    write_home(home, ca, port)
    assert agent.main(["get", "web", "url", "--home", str(home)]) == 2
    assert "not enrolled yet" in capsys.readouterr().err

    key = agent.generate_key()
    (home / "node.crt").write_bytes(issue(ca, agent.make_csr(NODE, key)).public_bytes(Encoding.PEM))
    agent.write_file(home / "node.key", agent.key_pem(key), 0o600)
    (home / "ca.crt").write_bytes(ca.certificate_pem)
    monkeypatch.setattr(agent, "CLI_DEADLINE", 0.3)
    assert agent.main(["list", "web", "url", "--home", str(home)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("crv-agent: 127.0.0.1:") and "refused" in err[-1]


def test_run_refuses_a_ca_that_does_not_match_its_pin(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    write_home(home, ca, 9)
    boot = (home / "bootstrap.json").read_text().replace(ca.fingerprint_sha256, "00" * 32)
    (home / "bootstrap.json").write_text(boot)
    proc = cli("run", "--home", str(home))
    assert proc.returncode == 2
    assert proc.stderr.endswith("the CA does not match ca_sha256; not trusting it\n")
    assert "Traceback" not in proc.stderr


# --- runs on any python3 from 3.8 ---------------------------------------------------------


def test_source_is_python_3_8(tmp_path: Path) -> None:
    py_compile.compile(str(AGENT), cfile=str(tmp_path / "a.pyc"), doraise=True)
    ast.parse(AGENT.read_text(), feature_version=(3, 8))
    assert os.access(AGENT, os.X_OK)
    assert AGENT.read_text().startswith("#!/usr/bin/env python3\n")


def python38() -> str | None:
    """A pyenv install first: pyenv's shim on PATH fails unless 3.8 is selected."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = sorted(pyenv.glob("versions/3.8*/bin/python3.8"))
    return str(candidates[-1]) if candidates else shutil.which("python3.8")


def test_runs_on_python_3_8(tmp_path: Path) -> None:
    """What ast cannot see (a 3.9+ function, `X | Y` evaluated at run time) shows here."""
    python = python38()
    if python is None:
        pytest.skip("no python3.8 here")
    script = f"""
import importlib.util, io, sys, tarfile
from pathlib import Path
spec = importlib.util.spec_from_file_location("a", {str(AGENT)!r})
a = importlib.util.module_from_spec(spec); spec.loader.exec_module(a)
key = a.generate_key()
Path("r.csr").write_bytes(a.make_csr("c-web-0", key))
a.write_file(Path("node.key"), a.key_pem(key), 0o600)
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as t:
    t.addfile(tarfile.TarInfo("a0"))
a.extract_bundle(buf.getvalue(), Path("app"))
a.parse_work({{"generation": 1, "roles": []}})
sys.exit(a.main(["get", "web", "url"]))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRV_")}
    proc = subprocess.run(
        [python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "crv-agent: no agent home: pass --home DIR or set CRV_AGENT_HOME\n"
    assert openssl_verifies(tmp_path / "r.csr").returncode == 0
    load_pem_private_key((tmp_path / "node.key").read_bytes(), password=None)


def test_a_node_call_that_cannot_connect_once_its_certificate_ended_re_joins() -> None:
    """A service refusing an ended client certificate may reset the connection instead of
    sending the TLS alert: once the certificate has ended by the node's clock, such an error
    ends the retries (the caller re-joins) instead of retrying for ever."""

    class Down:
        calls = 0

        def request(self, *args: object, **kwargs: object) -> object:
            Down.calls += 1
            raise agent.Unreachable("https://127.0.0.1:1: [Errno 104] Connection reset by peer")

    with pytest.raises(agent.CertificateEnded, match="the certificate has ended"):
        agent.call(Down(), "GET", "/v1/work", ended=lambda: True)
    assert Down.calls == 1
    with pytest.raises(agent.Unreachable):  # not ended: retried until the deadline
        agent.call(Down(), "GET", "/v1/work", ended=lambda: False, deadline=time.monotonic() + 0.6)
    assert Down.calls > 2
