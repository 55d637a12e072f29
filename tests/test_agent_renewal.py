"""The real agent keeps its node trusted: renewal again and again, renew hooks, re-joining after
a freeze past the certificate's end, and a kill in the middle of a renewal.

Real agent processes (agent/crv_agent.py) against a real service whose node certificates last
30 s (CRV_NODE_CERT_TTL), so renewals come every ~20 s.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import crl_serials
from tests.test_agent_unit import agent
from tests.test_service_security import Service, issue_tokens, started_service

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent" / "crv_agent.py"
TTL = 30

WEB = b'#!/bin/sh\necho "ran ${CRV_ACTION:-recipe}" >> ../ran.log\n'
RENEW = b'#!/bin/sh\necho "renew $CRV_ACTION $(cat "$CRV_CERT_FILE" | cksum)" >> ../ran.log\n'


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from started_service(tmp_path_factory, CRV_NODE_CERT_TTL=str(TTL))


def _bundle() -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("a0/roles/web.sh", WEB), ("a0/roles/renew.sh", RENEW)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def cluster(svc: Service, c: str, nodes: list[str]) -> dict[str, str]:
    spec = {
        "appliance": "demo",
        "source": "/nowhere/demo",
        "pool": "local",
        "parameters": {},
        "roles": {
            "web": {
                "recipe": "a0/roles/web.sh",
                "renew": "a0/roles/renew.sh",
                "appdir": "a0",
                "env": {},
                "depends_on": [],
            }
        },
        "bundle": _bundle(),
    }
    with svc.admin() as admin:
        assert admin.put(f"/v1/admin/clusters/{c}", json=spec).status_code == 200
        items = [
            {"name": n, "group": "web", "roles": ["web"], "pool": "local", "state": "provisioned"}
            for n in nodes
        ]
        r = admin.put(f"/v1/admin/clusters/{c}/nodes", json={"nodes": items})
        assert r.status_code == 200, r.text
        return issue_tokens(svc, admin, c, nodes)


class Agent:
    def __init__(self, svc: Service, home: Path, cluster: str, node: str, token: str) -> None:
        self.svc, self.home, self.cluster, self.node = svc, home, cluster, node
        home.mkdir(parents=True, exist_ok=True)
        ca = svc.home.ca_file.read_bytes()
        der = x509.load_pem_x509_certificate(ca).public_bytes(Encoding.DER)
        boot = {
            "service": svc.url,
            "ca": ca.decode(),
            "ca_sha256": hashlib.sha256(der).hexdigest(),
            "cluster": cluster,
            "node": node,
            "token": token,
        }
        (home / "bootstrap.json").write_text(json.dumps(boot))
        self.log = home / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(AGENT), "run", "--home", str(self.home)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def serial(self) -> int | None:
        try:
            pem = (self.home / "node.crt").read_bytes()
            return x509.load_pem_x509_certificate(pem).serial_number
        except (OSError, ValueError):
            return None

    def ran(self) -> list[str]:
        try:
            return (self.home / "ran.log").read_text().splitlines()
        except OSError:
            return []

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(AGENT), *args, "--home", str(self.home)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "CRV_ROLE": "web"},
        )


def wait_for(what: str, check: Callable[[], Any], timeout: float, agent: Agent) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f} s; agent log:\n{agent.log.read_text()[-3000:]}")


def release(svc: Service, c: str, node: str) -> int:
    with svc.admin() as admin:
        r = admin.post(
            f"/v1/admin/clusters/{c}/roles",
            json={"updates": [{"node": node, "role": "web", "op": "release"}]},
        )
        assert r.status_code == 200, r.text
        return int(r.json()["results"][0]["release"])


def role_state(svc: Service, c: str, node: str) -> tuple[str, int]:
    with svc.admin() as admin:
        found = [n for n in admin.get(f"/v1/admin/clusters/{c}").json()["nodes"]]
    web = next(n for n in found if n["name"] == node)["roles"]["web"]
    return web["state"], web["release"]


def crl(svc: Service) -> set[int]:
    with httpx.Client(base_url=svc.url, verify=svc.context()) as client:
        return crl_serials(client.get("/v1/crl").content)


def test_the_agent_renews_again_and_again_and_rejoins_after_a_freeze(
    svc: Service, tmp_path: Path
) -> None:
    tokens = cluster(svc, "life", ["life-web-0"])
    a = Agent(svc, tmp_path / "node", "life", "life-web-0", tokens["life-web-0"])
    a.start()
    try:
        first = wait_for("enrolled", a.serial, 60, a)
        assert release(svc, "life", "life-web-0") == 1
        wait_for("recipe done", lambda: role_state(svc, "life", "life-web-0") == ("done", 1), 60, a)
        assert a.ran() == ["ran recipe"]

        # renewed twice, each time with a fresh key, the renew hook run after each
        seen = [first]

        def renewed() -> bool:
            s = a.serial()
            if s is not None and s != seen[-1]:
                seen.append(s)
            return len(seen) >= 3

        wait_for("two renewals", renewed, 3 * TTL, a)
        wait_for("two renew hooks", lambda: len(a.ran()) >= 3, 20, a)
        hooks = a.ran()[1:]
        assert all(line.startswith("renew renew ") for line in hooks), hooks
        assert len(set(hooks)) == len(hooks)  # a different certificate each time
        assert seen[0] in crl(svc)  # superseded once the next one was used
        assert a.cli("list", "web", "url").returncode == 0  # the CLI uses the new pair

        # frozen past the end of its certificate, then resumed: it re-joins by itself
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        time.sleep(TTL + 5)
        os.kill(a.proc.pid, signal.SIGCONT)
        assert time.monotonic() - frozen > TTL
        wait_for("re-joined", lambda: "re-joined cluster life" in a.log.read_text(), 60, a)
        assert release(svc, "life", "life-web-0") == 2
        wait_for("re-run", lambda: role_state(svc, "life", "life-web-0") == ("done", 2), 60, a)
        assert a.proc.poll() is None
    finally:
        a.stop()


@pytest.mark.parametrize("cut", ["before-answer", "before-move", "between-moves"])
def test_a_kill_in_the_middle_of_a_renewal_leaves_a_working_certificate(
    svc: Service, tmp_path: Path, cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent is cut short (as by SIGKILL) at each point of a renewal: when its answer has
    not been written, when both new files are written but not moved, and between the two
    moves. A new agent on the same home then works at once."""
    c = f"cut-{cut}"
    tokens = cluster(svc, c, [f"{c}-web-0"])
    a = Agent(svc, tmp_path / "node", c, f"{c}-web-0", tokens[f"{c}-web-0"])
    a.start()
    wait_for("enrolled", a.serial, 60, a)
    a.stop()
    before = a.serial()

    class Killed(BaseException):
        pass

    boot = json.loads((a.home / "bootstrap.json").read_text())
    identity = agent.Identity(a.home, boot)
    real_write, real_replace = agent.write_file, agent.os.replace
    moves = []

    def write(path: Path, data: bytes, mode: int) -> None:
        if cut == "before-answer" and path.name == "next.crt":
            raise Killed
        real_write(path, data, mode)

    def replace(src: str, dst: str) -> None:
        if Path(dst).name in ("node.key", "node.crt"):  # not write_file's own rename
            moves.append(dst)
        if (cut == "before-move" and len(moves) == 1) or (
            cut == "between-moves" and len(moves) == 2
        ):
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(agent, "write_file", write)
    monkeypatch.setattr(agent.os, "replace", replace)
    with pytest.raises(Killed):
        identity.renew()
    monkeypatch.undo()

    a.start()
    try:
        wait_for("polling", lambda: "already enrolled" in a.log.read_text(), 30, a)
        assert a.cli("list", "web", "url").returncode == 0, a.log.read_text()[-2000:]
        assert release(svc, c, f"{c}-web-0") == 1
        wait_for("recipe done", lambda: role_state(svc, c, f"{c}-web-0") == ("done", 1), 60, a)
        after = a.serial()
        assert (after == before) == (cut == "before-answer")  # finished when it could be
    finally:
        a.stop()
