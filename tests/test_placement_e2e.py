"""Clusters that span pools, and drift and repair, through the CLI against the real service,
Prefect server, local pool (real agents running the recipes) and sim pool (simulated agents
speaking the real protocol): a node group's `pool:` in the appliance, `--pool-for GROUP=POOL`,
resize, rollback and destroy over every pool the cluster uses; `crv status` reporting nodes
missing from their pool and nodes a pool holds that crv does not know; `crv repair`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crv.base.home import Home
from crv.engine.placement import Drivers
from pools.base import NodeSpec
from tests.conftest import write_appliance
from tests.test_deploy_e2e import Crv

SPANNING = """\
apiVersion: crv/v1
name: spanning
parameters:
  flags: {type: string, default: /nonexistent, max_length: 1024}
nodes:
  head: {count: 1, roles: [head]}
  worker: {count: 2, roles: [work], scale: {min: 1, max: 6}, pool: sim}
roles:
  work: {recipe: work.sh, publishes: [url], verify: {http: "{{ self.url }}"}}
  head: {recipe: head.sh, depends_on: [work]}
"""
HEAD = """#!/bin/sh
set -eu
if [ -e "$CRV_PARAM_FLAGS/fail-head" ]; then echo "head refuses" >&2; exit 5; fi
crv-agent list work url | sort > "$CRV_PARAM_FLAGS/head-view-$CRV_NODE.txt"
"""
# on the local pool a real agent runs it; the sim pool's agents only publish a `url` that passes
WORK = """#!/bin/sh
set -eu
[ -f http.pid ] && kill -0 "$(cat http.pid)" 2>/dev/null ||
    { nohup python3 -m http.server 8099 --bind "$CRV_ADDRESS" >http.log 2>&1 & echo $! >http.pid; }
crv-agent set url "http://$CRV_ADDRESS:8099/"
"""
FAST_SIM = "provision=0.2,certify=0.1,contextualize=0.2,verify=0.1"


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    c = Crv(tmp_path_factory.mktemp("crv-home"))
    c.env["CRV_SIM_LATENCY"] = FAST_SIM
    c.up()
    yield c
    for pid in c.node_processes():
        os.kill(pid, signal.SIGKILL)
    c("down")
    for name in ("local", "sim"):  # the sim host exits with its last node
        for cluster in {n.cluster for n in pool(c, name).list_nodes()}:
            for n in pool(c, name).list_nodes(cluster):
                pool(c, name).destroy_node(n.name)


def pool(crv: Crv, name: str):  # type: ignore[no-untyped-def]
    return Drivers(Home(crv.home))(name)


def held(crv: Crv, name: str, cluster: str) -> set[str]:
    return {n.name for n in pool(crv, name).list_nodes(cluster)}


def spanning(tmp_path: Path, text: str = SPANNING) -> tuple[Path, Path]:
    directory = write_appliance(tmp_path, "spanning", text, ("work.sh", "head.sh"))
    (directory / "head.sh").write_text(HEAD)
    (directory / "work.sh").write_text(WORK)
    flags = tmp_path / "flags"
    flags.mkdir(exist_ok=True)
    return directory, flags


def stray_bootstrap(crv: Crv) -> dict[str, str]:
    """What a node made by hand would carry: the real service and CA, a token crv never gave."""
    ca = (crv.home / "ca" / "ca.crt").read_text()
    record = json.loads((crv.home / "service" / "daemon.json").read_text())
    return {
        "service": record["url"],
        "ca": ca,
        "ca_sha256": hashlib.sha256(ssl.PEM_cert_to_DER_cert(ca)).hexdigest(),
        "cluster": "dr",
        "node": "dr-worker-9",
        "token": "not-a-token-crv-gave",
    }


def pools_by_node(status: dict) -> dict[str, str]:
    return {n["name"]: n["pool"] for n in status["nodes"]}


def test_groups_in_two_pools_deploy_resize_and_destroy(crv: Crv, tmp_path: Path) -> None:
    directory, flags = spanning(tmp_path)
    r = crv("deploy", str(directory), "--name", "span", "--set", f"flags={flags}")
    assert r.returncode == 0, r.stdout + r.stderr
    status = crv.status("span")
    assert status["ready"] is True
    assert pools_by_node(status) == {
        "span-head-0": "local", "span-worker-0": "sim", "span-worker-1": "sim",
    }  # fmt: skip
    assert status["pool"] == "local" and status["pools"] == {"worker": "sim"}
    assert held(crv, "local", "span") == {"span-head-0"}
    assert held(crv, "sim", "span") == {"span-worker-0", "span-worker-1"}
    # the head (a real agent on the local pool) read what the sim nodes published
    view = (flags / "head-view-span-head-0.txt").read_text().split()
    assert len(view) == 2 and all(u.startswith("http://") for u in view)
    text = crv("status", "span")
    assert text.returncode == 0 and "sim" in text.stdout and "drift" not in text.stdout

    # a resize puts new nodes where the group's nodes go (the placement recorded)
    r = crv("scale", "span", "worker", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert pools_by_node(crv.status("span"))["span-worker-2"] == "sim"
    assert held(crv, "sim", "span") == {f"span-worker-{i}" for i in range(3)}
    assert len((flags / "head-view-span-head-0.txt").read_text().split()) == 3

    r = crv("destroy", "span")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 nodes removed" in r.stdout
    assert held(crv, "local", "span") == set() and held(crv, "sim", "span") == set()


def test_pool_for_overrides_the_appliance_and_the_default(crv: Crv, tmp_path: Path) -> None:
    directory, flags = spanning(tmp_path)
    r = crv("deploy", str(directory), "--name", "over", "--set", f"flags={flags}",
            "--pool", "sim", "--pool-for", "worker=local", "--pool-for", "head=local")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    status = crv.status("over")
    assert set(pools_by_node(status).values()) == {"local"}
    assert status["pool"] == "sim" and status["pools"] == {"head": "local", "worker": "local"}
    assert crv("destroy", "over").returncode == 0


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--pool-for", "nosuch=sim"],
         "error: --pool-for: nosuch: unknown node group; the groups are head, worker\n"),
        (["--pool-for", "worker=cloud9"],
         "error: --pool-for: worker=cloud9: unknown pool; known pools: local, sim\n"),
        (["--pool-for", "worker"], "error: --pool-for: worker: expected GROUP=POOL\n"),
        (["--pool", "cloud9"], "error: --pool: cloud9: unknown pool; known pools: local, sim\n"),
    ],
)  # fmt: skip
def test_bad_pool_choice_is_one_line_and_nothing_is_made(
    crv: Crv, tmp_path: Path, args: list[str], error: str
) -> None:
    directory, _ = spanning(tmp_path)
    r = crv("deploy", str(directory), "--name", "badpool", *args)
    assert (r.returncode, r.stderr) == (2, error)
    assert "badpool" not in crv("list").stdout


def test_unknown_pool_in_the_appliance_names_the_field(crv: Crv, tmp_path: Path) -> None:
    directory, _ = spanning(tmp_path, SPANNING.replace("pool: sim", "pool: cloud9"))
    r = crv("deploy", str(directory), "--name", "badpool")
    assert r.returncode == 2
    assert r.stderr == (
        f"error: {directory}/appliance.yaml: nodes.worker.pool: unknown pool; "
        "known pools: local, sim\n"
    )
    assert "badpool" not in crv("list").stdout
    assert crv("validate", str(directory)).returncode == 0  # pools are a deploy's to check


def test_failed_first_deploy_rolls_back_in_every_pool(crv: Crv, tmp_path: Path) -> None:
    directory, flags = spanning(tmp_path)
    (flags / "fail-head").touch()
    r = crv("deploy", str(directory), "--name", "rb", "--set", f"flags={flags}",
            "--retries", "0", "--on-failure", "rollback")  # fmt: skip
    assert r.returncode == 1
    assert "rolled back: removed the new cluster (3 nodes" in r.stderr
    assert held(crv, "local", "rb") == set() and held(crv, "sim", "rb") == set()
    assert "rb" not in crv("list").stdout


def test_status_reports_drift_and_repair_converges(crv: Crv, tmp_path: Path) -> None:
    directory, flags = spanning(tmp_path)
    r = crv("deploy", str(directory), "--name", "dr", "--set", f"flags={flags}")
    assert r.returncode == 0, r.stdout + r.stderr
    view = flags / "head-view-dr-head-0.txt"
    first_view = view.read_text()

    # out of band: a sim node deleted, the head's machine stopped, a stray node tagged "dr"
    pool(crv, "sim").destroy_node("dr-worker-1")
    head = json.loads((crv.home / "pools" / "local" / "dr-head-0" / "node.json").read_text())
    os.kill(head["pid"], signal.SIGKILL)
    view.unlink()
    pool(crv, "sim").create_node(NodeSpec("dr-worker-9", "dr", "worker", stray_bootstrap(crv)))

    status = crv.status("dr")
    missing = {n["name"]: (n["pool"], n["state"]) for n in status["drift"]["missing"]}
    assert missing["dr-worker-1"] == ("sim", "absent")
    assert missing["dr-head-0"][0] == "local" and missing["dr-head-0"][1] != "running"
    assert status["drift"]["orphans"] == [{"name": "dr-worker-9", "pool": "sim"}]
    text = crv("status", "dr").stdout
    assert "drift: dr-worker-1 is missing from pool sim (absent)" in text
    assert "drift: dr-worker-9 in pool sim is tagged for dr but not in its records" in text
    assert "run `crv repair dr` to converge" in text

    dry = crv("repair", "dr", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "destroying dr-worker-9 in pool sim: tagged for dr, not in its records" in dry.stdout
    assert "dr-worker-9" in held(crv, "sim", "dr")  # a dry run changes nothing

    r = crv("repair", "dr")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "making dr-worker-1 again in pool sim" in r.stdout
    assert "cluster dr is ready (3 nodes)" in r.stdout
    status = crv.status("dr")
    assert status["ready"] is True
    assert status["drift"] == {"missing": [], "orphans": [], "unreachable": {}}
    assert held(crv, "sim", "dr") == {"dr-worker-0", "dr-worker-1"}
    assert held(crv, "local", "dr") == {"dr-head-0"}
    # the head was made again: a new machine ran its recipe and read both workers again
    assert len(view.read_text().split()) == 2
    assert first_view
    again = crv("repair", "dr")  # nothing left to do
    assert again.returncode == 0 and "no drift" in again.stdout
    assert crv("destroy", "dr").returncode == 0


def test_repair_of_an_unknown_cluster_is_bad_input(crv: Crv) -> None:
    r = crv("repair", "nosuch")
    assert (r.returncode, r.stderr) == (
        2,
        "error: cluster: nosuch: no such cluster (see `crv list`)\n",
    )


def test_node_made_again_gets_a_new_certificate_and_the_old_one_is_revoked(
    crv: Crv, tmp_path: Path
) -> None:
    directory, flags = spanning(tmp_path)
    r = crv("deploy", str(directory), "--name", "cert", "--set", f"flags={flags}")
    assert r.returncode == 0, r.stdout + r.stderr
    node_dir = crv.home / "pools" / "local" / "cert-head-0"
    from cryptography import x509

    old = x509.load_pem_x509_certificate((node_dir / "node.crt").read_bytes()).serial_number
    pool(crv, "local").destroy_node("cert-head-0")
    deadline = time.monotonic() + 5
    while crv.status("cert")["drift"]["missing"] == [] and time.monotonic() < deadline:
        time.sleep(0.2)
    r = crv("repair", "cert")
    assert r.returncode == 0, r.stdout + r.stderr
    new = x509.load_pem_x509_certificate((node_dir / "node.crt").read_bytes()).serial_number
    assert new != old
    assert old in crv.revoked_serials() and new not in crv.revoked_serials()
    assert crv("destroy", "cert").returncode == 0


PREFERRING = SPANNING.replace("pool: sim}", "pools: [small, local]}").replace(
    "count: 2", "count: 3"
)
POOLS_YAML = """\
pools:
  small: {driver: local, options: {max_nodes: 1}}
  tiny: {driver: sim, options: {max_nodes: 1}}
"""


@pytest.fixture
def capped(crv: Crv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Crv:
    """Two capped pools beside the built-in ones: small (local, 1 node), tiny (sim, 1 node)."""
    path = tmp_path / "pools.yaml"
    path.write_text(POOLS_YAML)
    monkeypatch.setitem(crv.env, "CRV_POOLS_FILE", str(path))
    monkeypatch.setenv("CRV_POOLS_FILE", str(path))
    return crv


def test_growth_fills_the_first_pool_with_room_and_shrinking_the_last(
    capped: Crv, tmp_path: Path
) -> None:
    crv = capped
    directory, flags = spanning(tmp_path, PREFERRING)
    r = crv("deploy", str(directory), "--name", "pref", "--set", f"flags={flags}")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        status = crv.status("pref")
        assert pools_by_node(status) == {
            "pref-head-0": "local", "pref-worker-0": "small",
            "pref-worker-1": "local", "pref-worker-2": "local",
        }  # fmt: skip
        assert status["pools"] == {"worker": "small"}
        assert held(crv, "small", "pref") == {"pref-worker-0"}
        # the two local pools never share an address
        addresses = [n["address"] for n in status["nodes"]]
        assert len(set(addresses)) == 4
        assert len((flags / "head-view-pref-head-0.txt").read_text().split()) == 3

        r = crv("scale", "pref", "worker", "1")  # the last pool of the list goes first
        assert r.returncode == 0, r.stdout + r.stderr
        assert held(crv, "small", "pref") == {"pref-worker-0"}
        assert held(crv, "local", "pref") == {"pref-head-0"}

        r = crv("scale", "pref", "worker", "2")  # small is full: its node counts
        assert r.returncode == 0, r.stdout + r.stderr
        assert pools_by_node(crv.status("pref"))["pref-worker-1"] == "local"
    finally:
        assert crv("destroy", "pref").returncode == 0
    assert held(crv, "small", "pref") == set() and held(crv, "local", "pref") == set()


def test_no_pool_with_room_fails_the_change_before_anything_is_made(
    capped: Crv, tmp_path: Path
) -> None:
    crv = capped
    text = SPANNING.replace("pool: sim}", "pools: [small, tiny]}")
    directory, flags = spanning(tmp_path, text)
    r = crv("deploy", str(directory), "--name", "full", "--set", f"flags={flags}")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        before = pools_by_node(crv.status("full"))
        assert before == {"full-head-0": "local", "full-worker-0": "small",
                          "full-worker-1": "tiny"}  # fmt: skip

        r = crv("scale", "full", "worker", "4", "--retries", "0")
        assert r.returncode == 1
        assert "no capacity for 2 more nodes of group worker in pools small, tiny" in r.stderr
        assert pools_by_node(crv.status("full")) == before  # no node recorded
        assert held(crv, "small", "full") == {"full-worker-0"}  # nor made
        assert held(crv, "tiny", "full") == {"full-worker-1"}
        assert held(crv, "local", "full") == {"full-head-0"}
    finally:
        assert crv("destroy", "full").returncode == 0
        pool(crv, "tiny").shutdown()
