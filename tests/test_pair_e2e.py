"""Pairing end to end through the CLI (issue 17 item 8): `crv pair` prints a PIN and the
command, a real agent on a machine crv did not make runs `crv-agent pair`, and the machine is
contextualized like any new node of its group, the roles that read the group included.

The paired machine says its address is 127.0.0.254, where nothing listens: every verify of its
roles runs on the node (`on_node`), and crv never dials it. Removing it revokes its certificate
and its agent stops.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crv.base.home import Home
from crv.service.client import Service
from tests.conftest import write_appliance
from tests.test_deploy_e2e import Crv, started_crv
from tests.test_pairing import _csr

AGENT = Path(__file__).resolve().parent.parent / "agent" / "crv_agent.py"
UNREACHABLE = "127.0.0.254"

HUB = """\
apiVersion: crv/v1
name: hub
nodes:
  hub: {count: 1, roles: [hub]}
  worker: {count: 1, roles: [worker], scale: {min: 1, max: 4}}
roles:
  worker:
    recipe: worker.sh
    publishes: [host]
    verify: {on_node: {command: 'test "$(cat ran)" = "$CRV_NODE"'}}
  hub:
    recipe: hub.sh
    depends_on: [worker]
    publishes: [workers]
    verify: {on_node: {command: "test -s workers"}}
"""
WORKER = '#!/bin/sh\nset -e\necho "$CRV_NODE" > ran\ncrv-agent set host "$CRV_NODE"\n'
HUB_RECIPE = (
    "#!/bin/sh\nset -e\ncrv-agent list worker host | sort > workers\n"
    'crv-agent set workers "$(paste -sd, workers)"\n'
)


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    yield from started_crv(tmp_path_factory)


@pytest.fixture(scope="module")
def hub(crv: Crv, tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = write_appliance(tmp_path_factory.mktemp("app"), "hub", HUB)
    for name, text in (("worker.sh", WORKER), ("hub.sh", HUB_RECIPE)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    r = crv("deploy", str(directory), "--name", "hubby", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return "hubby"


def test_a_paired_machine_is_contextualized_like_any_node_and_stops_when_removed(
    crv: Crv, hub: str, tmp_path: Path
) -> None:
    pairing = crv.popen("pair", hub, "worker")
    agent: subprocess.Popen[bytes] | None = None
    try:
        assert pairing.stdout is not None
        printed = []
        for line in pairing.stdout:
            printed.append(line)
            if "crv_agent.py" in line and " pair " in line:
                break
        else:
            pytest.fail("".join(printed))
        words = line.split()
        url, pin = words[words.index("pair") + 1 : words.index("pair") + 3]
        fingerprint = words[words.index("--ca-sha256") + 1]
        assert printed[0].startswith(f"PIN {pin} for cluster {hub} group worker: once, until ")
        assert f"CA fingerprint (SHA-256): {fingerprint}" in printed[1]
        with open(tmp_path / "agent.log", "wb") as out:
            agent = subprocess.Popen(
                [sys.executable, str(AGENT), "pair", "--home", str(tmp_path / "machine"), url,
                 pin, "--ca-sha256", fingerprint, "--address", UNREACHABLE],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        rest, _ = pairing.communicate(timeout=300)
        out = "".join(printed) + rest
        assert pairing.returncode == 0, out + (tmp_path / "agent.log").read_text()
        assert "hubby-worker-1 paired; contextualizing it" in out
        assert f"cluster {hub} is ready (3 nodes)" in out

        status = crv.status(hub)
        paired = next(n for n in status["nodes"] if n["name"] == "hubby-worker-1")
        assert (paired["pool"], paired["address"]) == ("manual", UNREACHABLE)
        assert paired["roles"] == {"worker": "verified"}
        record = json.loads((crv.home / "service" / "daemon.json").read_text())
        status = Service(Home(crv.home), record["url"]).status(hub) or {}
        front = next(n for n in status["nodes"] if n["group"] == "hub")
        assert front["roles"]["hub"]["state"] == "verified"
        # the hub read the group again and sees the paired machine
        assert front["roles"]["hub"]["attributes"]["workers"] == "hubby-worker-0,hubby-worker-1"
        assert status["counts"]["worker"] == 2

        # removing it (the newest) revokes its certificate: its agent is refused and stops
        r = crv("scale", hub, "worker", "1", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        names = [n["name"] for n in crv.status(hub)["nodes"]]
        assert "hubby-worker-1" not in names
        assert agent.wait(90) == 3, (tmp_path / "agent.log").read_text()
    finally:
        for p in (pairing, agent):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def test_pair_json_and_bad_input(crv: Crv, hub: str) -> None:
    r = crv("pair", hub, "worker", "--json", "--ttl", "1m")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["cluster"] == hub and made["group"] == "worker"
    assert len(made["pin"]) == 9 and made["pin"][4] == "-"
    assert len(made["ca_sha256"]) == 64 and made["pin"] in made["command"]
    assert Path(made["agent"]).name == "crv_agent.py"

    for args, message in (
        (("pair", "nope", "worker"), "error: crv pair: CLUSTER: no cluster 'nope'"),
        (("pair", hub, "gpu"), "error: crv pair: GROUP: no group 'gpu' in hubby (hub, worker)"),
        (("pair", hub, "hub"), "its count (1) is fixed"),
        (("pair", hub, "worker", "--ttl", "5s"), "error: --ttl: 5s: must be between 30 s"),
    ):
        r = crv(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_pin_that_ends_unused_fails_crv_pair_with_one_line(crv: Crv, hub: str) -> None:
    """Ten wrong PINs lock the waiting pairing out: crv pair says so and exits 1."""
    import httpx

    pairing = crv.popen("pair", hub, "worker")
    try:
        assert pairing.stdout is not None
        for line in pairing.stdout:
            if "crv_agent.py" in line and " pair " in line:
                break
        url = line.split()[line.split().index("pair") + 1]
        ca = ssl.create_default_context(cafile=str(crv.home / "ca" / "ca.crt"))
        with httpx.Client(base_url=url, verify=ca, timeout=30) as stranger:
            for i in range(10):
                r = stranger.post("/v1/pair", json={"pin": f"9999-999{i}", "csr": _csr()})
                assert r.status_code == 403, r.text
        started = time.monotonic()
        rest, _ = pairing.communicate(timeout=60)
        assert pairing.returncode == 1, rest
        assert "error: no machine paired: it was locked out; run crv pair again" in rest
        assert time.monotonic() - started < 30
    finally:
        if pairing.poll() is None:
            pairing.kill()
            pairing.wait(10)
