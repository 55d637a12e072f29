"""End to end through the CLI: a real Prefect server, the real service, the local pool and the
real agent, each `crv` command a separate process, as a user runs them.

One `crv up` serves the whole module (the Prefect server takes ~10 s to start).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.conftest import CATALOG, LOCAL_NET, REPO, crl_serials, write_appliance


def prefect_auth(home: Path) -> tuple[str, str]:
    """The user and password of a CRV_HOME's Prefect API (basic auth; `crv up` made them)."""
    user, _, password = (home / "prefect" / "api-auth").read_text().strip().partition(":")
    return user, password


@contextlib.contextmanager
def home_up(home: Path, *, service_port: int | None = None) -> Iterator[Crv]:
    """A crv home with its daemons up (`crv up`) for a module's tests; afterwards its node
    processes are killed and the daemons stopped. `service_port`: the port the service takes
    (and comes back on after a restart) instead of the suite's shared preference, 8443."""
    c = Crv(home)
    if service_port is not None:
        (home / "service").mkdir(parents=True, exist_ok=True)
        (home / "service" / "port").write_text(f"{service_port}\n")
    c.up()
    try:
        yield c
    finally:
        for pid in c.node_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        c("down")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Crv:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "CRV_HOME": str(home), "PYTHONUNBUFFERED": "1"}

    def __call__(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "crv_cli", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=self.env,
            timeout=timeout,
        )

    @property
    def prefect_auth(self) -> tuple[str, str]:
        return prefect_auth(self.home)

    def up(self) -> subprocess.CompletedProcess[str]:
        """`crv up`; if it fails, stop what it did start, so that no daemon outlives the test."""
        r = self("up", timeout=300)
        if r.returncode != 0:
            self("down")
            pytest.fail(f"crv up failed: {r.stdout}{r.stderr}")
        return r

    def prefect_errors(self, last: int = 15) -> str:
        """The last error lines of this home's Prefect server log, for a failure message (the
        server logs why it answered 503)."""
        try:
            log = (self.home / "prefect" / "prefect.log").read_text(errors="replace")
        except OSError:
            return "(no prefect.log)"
        found = [line for line in log.splitlines() if "rror" in line or "Exception" in line]
        return "\n".join(found[-last:]) or "(no error in prefect.log)"

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "crv_cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=self.env,
        )

    def status(self, name: str) -> dict:
        r = self("status", name, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def revoked_serials(self) -> set[int]:
        """The serials on the service's CRL, fetched as a node would (HTTPS, our CA)."""
        record = json.loads((self.home / "service" / "daemon.json").read_text())
        ca = ssl.create_default_context(cafile=str(self.home / "ca" / "ca.crt"))
        return crl_serials(httpx.get(f"{record['url']}/v1/crl", verify=ca).content)

    def node_agents(self) -> list[int]:
        """The node agents (`crv-agent run`) among them: one per running local node. Unlike
        every process, this does not change while a node's daemons run a short command (the
        web farm's lb runs `crv-agent set` every few seconds)."""
        found = []
        for pid in self.node_processes():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"crv-agent") for a in argv) and b"run" in argv:
                found.append(pid)
        return found

    def node_processes(self) -> list[int]:
        """Every live process the local pool of this home started (its env marker)."""
        marker = f"CRV_LOCAL_POOL={self.home / 'pools' / 'local'}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    stat = (entry / "stat").read_text()
                    if stat[stat.rindex(")") + 2] != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
        return found


def started_crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    """`crv up` in a new CRV_HOME for a module's fixture (`yield from started_crv(...)`); after
    the module, its local nodes are killed and `crv down` stops the daemons."""
    c = Crv(tmp_path_factory.mktemp("crv-home"))
    up = c.up()
    assert "Prefect UI:  http://127.0.0.1:" in up.stdout
    try:
        yield c
    finally:
        for pid in c.node_processes():
            os.kill(pid, signal.SIGKILL)
        c("down")


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    yield from started_crv(tmp_path_factory)


def prefect_api(crv: Crv) -> str:
    record = json.loads((crv.home / "prefect" / "daemon.json").read_text())
    return str(record["url"])


def test_up_is_idempotent_and_prints_urls(crv: Crv) -> None:
    before = json.loads((crv.home / "service" / "daemon.json").read_text())["pid"]
    again = crv("up")
    assert again.returncode == 0
    assert "crv service: https://127.0.0.1:" in again.stdout
    assert json.loads((crv.home / "service" / "daemon.json").read_text())["pid"] == before


def test_webfarm_deploys_answers_round_robin_and_destroys_clean(crv: Crv) -> None:
    port = free_port()
    r = crv("deploy", str(CATALOG / "webfarm"), "--pool", "local", "--name", "farm",
            "--set", "workers=3", "--set", f"port={port}")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cluster farm is ready (4 nodes)" in r.stdout
    assert "Prefect UI: http://127.0.0.1:" in r.stdout
    lb_url = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("lb"))

    answers = set()
    for _ in range(6):
        with urllib.request.urlopen(lb_url + "/", timeout=5) as resp:
            answers.add(resp.read().decode().strip())
    assert answers == {f"hello from farm-worker-{i}" for i in range(3)}

    status = crv.status("farm")
    assert status["name"] == "farm" and status["appliance"] == "webfarm" and status["ready"]
    assert [n["name"] for n in status["nodes"]] == [
        "farm-front-0", "farm-worker-0", "farm-worker-1", "farm-worker-2",
    ]  # fmt: skip
    for n in status["nodes"]:
        assert set(n) == {"name", "group", "pool", "address", "state", "roles", "timings"}
        assert n["pool"] == "local" and n["address"].startswith(f"{LOCAL_NET}.")
        assert set(n["roles"].values()) == {"verified"}
        # where its time went: every phase crv sees on the local pool, in order
        order = ["provision", "created", "enrolled", "recipes", "verified"]
        assert list(n["timings"]) == order, n["timings"]
        times = [datetime.fromisoformat(n["timings"][p]) for p in order]
        assert times == sorted(times) and times[-1] - times[0] < timedelta(minutes=5)
    table = crv("status", "farm", "--timings")
    assert table.returncode == 0 and "enrolled" in table.stdout and "farm-worker-2" in table.stdout
    listed = crv("list", "--json")
    assert {"name": "farm", "appliance": "webfarm", "pool": "local", "nodes": 4, "ready": True} in (
        json.loads(listed.stdout)["clusters"]
    )

    # the Prefect server has the run, its stage task runs and the cluster summary artifact
    api = prefect_api(crv)
    auth = crv.prefect_auth
    runs = httpx.post(f"{api}/task_runs/filter", json={"limit": 200}, auth=auth).json()
    names = {t["name"] for t in runs}
    assert {"provision[worker]", "certify[worker]", "contextualize[worker/web]",
            "verify[worker/web]", "contextualize[front/lb]", "verify[front/lb]"} <= names  # fmt: skip
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"limit": 50}, auth=auth).json()
    assert "cluster-farm" in {a["key"] for a in artifacts}
    summary = next(a for a in artifacts if a["key"] == "cluster-farm")
    assert "verified +" in json.dumps(summary["data"])  # the timings column
    assert "deploy-farm" in {a["key"] for a in artifacts}

    # nothing secret reached Prefect: flow parameters, task and flow logs, artifacts (F: secrets)
    flow_runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 50}, auth=auth).json()
    logs = httpx.post(f"{api}/logs/filter", json={"limit": 1000}, auth=auth).json()
    seen = json.dumps([flow_runs, runs, logs, artifacts])
    assert "-----BEGIN" not in seen and "PRIVATE KEY" not in seen
    assert '"token"' not in seen.lower()
    tokens_db = (crv.home / "service" / "state.db").read_bytes()
    for log_file in crv.home.glob("pools/local/farm-*/agent.log"):
        assert "token" not in log_file.read_text().lower()
    assert b"-----BEGIN EC PRIVATE KEY" not in tokens_db

    certs = sorted((crv.home / "pools" / "local").glob("farm-*/node.crt"))
    serials = {x509.load_pem_x509_certificate(p.read_bytes()).serial_number for p in certs}
    assert len(serials) == 4

    d = crv("destroy", "farm")
    assert d.returncode == 0, d.stderr
    assert "4 nodes removed, 4 certificates revoked" in d.stdout
    assert crv.node_processes() == []
    assert not list((crv.home / "pools" / "local").glob("farm-*"))
    assert crv("status", "farm").returncode == 2
    ca = ssl.create_default_context(cafile=str(crv.home / "ca" / "ca.crt"))
    service = json.loads((crv.home / "service" / "daemon.json").read_text())["url"]
    assert serials <= crl_serials(httpx.get(f"{service}/v1/crl", verify=ca).content)


FLAKY = """\
apiVersion: crv/v1
name: flaky
parameters:
  bad: {type: string, default: flaky-node-1}
nodes:
  node: {count: 3, roles: [svc]}
  head: {count: 1, roles: [top]}
roles:
  svc: {recipe: svc.sh}
  top: {recipe: top.sh, depends_on: [svc]}
"""


def test_failing_recipe_is_retried_then_named_and_others_are_kept(crv: Crv, tmp_path: Path) -> None:
    app = write_appliance(tmp_path, "flaky", FLAKY, ("svc.sh", "top.sh"))
    (app / "svc.sh").write_text(
        '#!/bin/sh\necho "starting on $CRV_NODE"\n'
        'if [ "$CRV_NODE" = "$CRV_PARAM_BAD" ]; then echo "disk on fire" >&2; exit 3; fi\n'
    )
    revoked_before = crv.revoked_serials()
    r = crv("deploy", str(app), "--retries", "1")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: deploy of flaky failed: flaky-node-1:contextualize:svc failed")
    assert "recipe of svc on flaky-node-1 exited 3" in err and "disk on fire" in err
    assert "Traceback" not in r.stderr.splitlines()[-1]

    status = crv.status("flaky")
    states = {n["name"]: n["roles"] for n in status["nodes"]}
    assert states["flaky-node-1"] == {"svc": "failed"}
    assert states["flaky-node-0"] == {"svc": "verified"} == states["flaky-node-2"]
    assert states["flaky-head-0"] == {"top": "pending"}  # never released: its dependency failed
    assert not status["ready"]
    log = (crv.home / "pools/local/flaky-node-1/logs/svc.log").read_text()
    assert log.count("disk on fire") == 2  # the first run and one retry
    # F5: its first contextualize failed for good: quarantined, its certificate revoked (and
    # on the CRL), while the other nodes were verified; 1 of 3 is not beyond max_unhealthy 40 %
    assert {n["name"]: n["state"] for n in status["nodes"]}["flaky-node-1"] == "quarantined"
    assert len(crv.revoked_serials() - revoked_before) == 1
    assert "stopped:" not in err

    # run again with the fault gone: the quarantined node is made again and joins
    again = crv("deploy", str(app), "--set", "bad=none")
    assert again.returncode == 0, again.stderr
    status = crv.status("flaky")
    assert status["ready"] and {n["state"] for n in status["nodes"]} == {"enrolled"}

    d = crv("destroy", "flaky")
    assert d.returncode == 0, d.stderr
    assert "4 nodes removed, 4 certificates revoked" in d.stdout
    assert crv.node_processes() == []


SLOW = """\
apiVersion: crv/v1
name: slow
nodes:
  node: {count: 4, roles: [svc]}
roles:
  svc: {recipe: svc.sh}
"""


def test_killed_deploy_converges_when_run_again(crv: Crv, tmp_path: Path) -> None:
    app = write_appliance(tmp_path, "slow", SLOW, ("svc.sh",))
    (app / "svc.sh").write_text("#!/bin/sh\nsleep 3\necho done >> runs.txt\n")
    pools = crv.home / "pools" / "local"
    deploying = crv.popen("deploy", str(app))
    deadline = time.monotonic() + 120
    while len(list(pools.glob("slow-*/node.crt"))) < 2:  # mid-way: nodes enrolled, recipes run
        assert deploying.poll() is None, deploying.stdout.read() if deploying.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.1)
    deploying.kill()
    deploying.wait()

    again = crv("deploy", str(app))
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(p.name for p in pools.glob("slow-*")) == [f"slow-node-{i}" for i in range(4)]
    status = crv.status("slow")
    assert status["ready"]
    agents = [
        p for p in crv.node_processes() if b"crv-agent" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    assert len(agents) == 4  # no duplicate agent for any node
    for i in range(4):  # a recipe that finished before the kill is not run again
        assert (pools / f"slow-node-{i}/work/runs.txt").read_text().count("done") == 1

    assert crv("destroy", "slow").returncode == 0
    assert crv.node_processes() == []


def test_prefect_database_locked_fails_in_one_line_then_converges(crv: Crv, tmp_path: Path) -> None:
    """F8: the Prefect server cannot write (its SQLite database held by another writer, as a
    burst of parallel deploys on a loaded machine did for minutes): `crv deploy` exits 1 with
    one line naming the server's answer and its log, no traceback, and nothing is made in the
    pool. Once the database is free, the same command converges."""
    app = write_appliance(tmp_path, "locked", SLOW.replace("count: 4", "count: 2"), ("svc.sh",))
    (app / "svc.sh").write_text("#!/bin/sh\necho done >> runs.txt\n")
    pools = crv.home / "pools" / "local"
    impatient = Crv(crv.home)
    impatient.env |= {"PREFECT_CLIENT_MAX_RETRIES": "0", "PREFECT_API_REQUEST_TIMEOUT": "10"}
    db = sqlite3.connect(crv.home / "prefect" / "prefect.db", timeout=60, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        r = impatient("deploy", str(app), "--name", "locked", timeout=300)
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    # the client's own 10 s timeout (the server would answer 503 after its 60 s wait)
    assert errors[0].startswith(
        ("error: the Prefect server answered 503 Service Unavailable to POST http://127.0.0.1:",
         "error: the Prefect server did not answer in time (ReadTimeout) to POST http://127.0.0.1:")
    ), errors[0]  # fmt: skip
    assert str(crv.home / "prefect" / "prefect.log") in errors[0]
    assert not list(pools.glob("locked-*"))

    again = crv("deploy", str(app), "--name", "locked", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert crv.status("locked")["ready"]
    assert crv("destroy", "locked").returncode == 0
    assert not list(pools.glob("locked-*"))


def test_deploy_refuses_bad_input_before_anything(crv: Crv, tmp_path: Path) -> None:
    r = crv("deploy", str(CATALOG / "webfarm"), "--set", "workers=0")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "workers" in r.stderr
    assert "Traceback" not in r.stderr
    r = crv("deploy", str(CATALOG / "webfarm"), "--pool", "nowhere")
    assert r.returncode == 2 and "unknown pool" in r.stderr
    assert crv("status", "webfarm").returncode == 2  # nothing was registered
