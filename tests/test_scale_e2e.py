"""Resize end to end through the CLI (`crv scale`, the scale-role flow): a real Prefect server,
the real service, the local pool and the real agent.

Growing adds nodes through every step and re-contextualizes only the load balancer (it reads
the web nodes); the web nodes already there are not touched — their server process is the same
one, their role was not released again. Shrinking removes the idlest nodes (by the `busy` the
web servers publish), else the newest, after the load balancer let them go, destroys them and
revokes their certificates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from benchmarks.bench_autoscale import Load
from crv.base.home import Home
from crv.service.client import Service
from crv_cli import daemons
from tests.conftest import CATALOG, write_appliance
from tests.test_deploy_e2e import Crv, free_port


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    c = Crv(tmp_path_factory.mktemp("crv-home"))
    c.up()
    yield c
    c("destroy", "elastic")
    c("destroy", "idler")
    for pid in c.node_processes():  # what a failed test left behind
        os.kill(pid, signal.SIGKILL)
    c("down")


def node_dir(crv: Crv, node: str) -> Path:
    return crv.home / "pools" / "local" / node


def web_pid(crv: Crv, node: str) -> str:
    (pid,) = node_dir(crv, node).rglob("web.pid")
    return pid.read_text().strip()


def backends(crv: Crv) -> list[str]:
    (path,) = node_dir(crv, "elastic-front-0").rglob("backends.txt")
    return path.read_text().split()


def answers(lb_url: str, n: int) -> set[str]:
    seen = set()
    for _ in range(n):
        with urllib.request.urlopen(lb_url + "/", timeout=5) as resp:
            seen.add(resp.read().decode().strip())
    return seen


def service_status(crv: Crv, cluster: str) -> dict:
    """The service's admin status of a cluster (more than `crv status --json` shows: counts)."""
    home = Home(crv.home)
    return dict(Service(home, daemons.running(home).service_url).status(cluster))


def releases(crv: Crv) -> dict[str, int]:
    """Each node's release of its role, from the service's admin status (a new release = the
    recipe ran again)."""
    status = service_status(crv, "elastic")
    return {n["name"]: next(iter(n["roles"].values()))["release"] for n in status["nodes"]}


def prefect_events(crv: Crv, names: set[str], deadline: float = 30.0) -> list[dict]:
    """crv's events on the cluster, read back from the Prefect server (they arrive a moment
    after the flow emitted them): waits until every name in `names` is there."""
    api = daemons.running(Home(crv.home)).prefect_api_url
    body = {
        "filter": {
            "event": {"prefix": ["crv."]},
            "resource": {"id": ["crv.cluster.elastic"]},
            "order": "ASC",
        },
        "limit": 50,  # the server's most per page
    }
    end = time.monotonic() + deadline
    while True:
        r = httpx.post(f"{api}/events/filter", json=body, auth=crv.prefect_auth, timeout=10)
        assert r.status_code == 200, r.text
        found = r.json()["events"]
        if names <= {e["event"] for e in found} or time.monotonic() > end:
            return list(found)
        time.sleep(0.5)


def node_serial(crv: Crv, node: str) -> int:
    cert = x509.load_pem_x509_certificate((node_dir(crv, node) / "node.crt").read_bytes())
    return cert.serial_number


def test_grow_then_shrink_touches_only_what_changed(crv: Crv) -> None:
    port = free_port()
    # rate-every: no web server reports `busy` during the test, so a shrink takes the newest
    r = crv("deploy", str(CATALOG / "webfarm"), "--name", "elastic", "--set", "workers=2",
            "--set", f"port={port}", "--set", "rate-every=3600")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    lb_url = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("lb"))
    assert answers(lb_url, 4) == {"hello from elastic-worker-0", "hello from elastic-worker-1"}
    pids = {n: web_pid(crv, n) for n in ("elastic-worker-0", "elastic-worker-1")}
    before = releases(crv)

    # grow 2 -> 4: two new nodes through every step, the lb again, the old web nodes untouched
    r = crv("scale", "elastic", "worker", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cluster elastic is ready (5 nodes)" in r.stdout
    status = crv.status("elastic")
    assert [n["name"] for n in status["nodes"]] == [
        "elastic-front-0", *(f"elastic-worker-{i}" for i in range(4))
    ]  # fmt: skip
    assert all(set(n["roles"].values()) == {"verified"} for n in status["nodes"])
    after = releases(crv)
    assert after["elastic-front-0"] == before["elastic-front-0"] + 1  # the lb ran again
    for n, pid in pids.items():
        assert after[n] == before[n]  # not released again
        assert web_pid(crv, n) == pid  # the same server process
    assert len(backends(crv)) == 4
    seen = prefect_events(crv, {"crv.cluster.scaled", "crv.node.verified", "crv.cluster.ready"})
    scaled = [e for e in seen if e["event"] == "crv.cluster.scaled"]
    assert scaled and scaled[-1]["payload"]["after"] == 4
    assert scaled[-1]["resource"]["crv.appliance"] == "webfarm"
    verified = {
        r["prefect.resource.id"]
        for e in seen
        if e["event"] == "crv.node.verified"
        for r in e["related"]
        if r.get("prefect.resource.role") == "node"
    }
    assert {"crv.node.elastic-worker-2", "crv.node.elastic-worker-3"} <= verified
    assert len(backends(crv)) == 4
    assert answers(lb_url, 8) == {f"hello from elastic-worker-{i}" for i in range(4)}

    # nothing changed: scaling to the same size runs nothing again
    r = crv("scale", "elastic", "worker", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert releases(crv) == after

    # shrink 4 -> 1: the newest three go, after the lb let them go; certificates revoked
    victims = [f"elastic-worker-{i}" for i in (1, 2, 3)]
    serials = {node_serial(crv, v) for v in victims}
    r = crv("scale", "elastic", "worker", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    status = crv.status("elastic")
    assert [n["name"] for n in status["nodes"]] == ["elastic-front-0", "elastic-worker-0"]
    assert status["ready"]
    assert releases(crv)["elastic-front-0"] == after["elastic-front-0"] + 1
    assert web_pid(crv, "elastic-worker-0") == pids["elastic-worker-0"]
    assert backends(crv) == [f"http://{status['nodes'][1]['address']}:{port}"]
    assert answers(lb_url, 3) == {"hello from elastic-worker-0"}
    for v in victims:
        assert not node_dir(crv, v).exists()
    assert serials <= crv.revoked_serials()

    # a later deploy of the same cluster keeps the size it was scaled to
    r = crv("deploy", str(CATALOG / "webfarm"), "--name", "elastic", "--set", "workers=2",
            "--set", f"port={port}", "--set", "rate-every=3600")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(crv.status("elastic")["nodes"]) == 2


def busy(crv: Crv, cluster: str) -> dict[str, float]:
    """node -> the `busy` value its web server last published."""
    home = Home(crv.home)
    found = Service(home, daemons.running(home).service_url).call(
        "GET", f"/v1/admin/clusters/{cluster}/attributes/web/busy"
    )
    return {r["node"]: float(r["value"]) for r in found["values"]}


def test_shrink_takes_the_idle_nodes_first(crv: Crv) -> None:
    """Requests straight to worker-1 and worker-2: a shrink to 2 removes worker-0, the idle one,
    not the newest."""
    port = free_port()
    r = crv("deploy", str(CATALOG / "webfarm"), "--name", "idler", "--set", "workers=3",
            "--set", f"port={port}", "--set", "rate-every=3")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    address = {n["name"]: n["address"] for n in crv.status("idler")["nodes"]}
    served = ["idler-worker-1", "idler-worker-2"]

    def reported() -> bool:
        """worker-0 reports idle (once the deploy's verify requests are out of its window; a
        node without a report would count as busy), the two others busy."""
        found = busy(crv, "idler")
        return found.get("idler-worker-0") == 0 and all(found.get(n, 0) > 0 for n in served)

    with contextlib.ExitStack() as loads:
        for node in served:  # ~15 requests a report: a stalled load thread still shows
            loads.enter_context(Load(f"http://{address[node]}:{port}/", rate=5, limit=180))
        deadline = time.monotonic() + 60
        while not reported():
            assert time.monotonic() < deadline, f"no busy reports: {busy(crv, 'idler')}"
            time.sleep(0.5)
        r = crv("scale", "idler", "worker", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    workers = [n["name"] for n in crv.status("idler")["nodes"] if n["group"] == "worker"]
    assert workers == served
    r = crv("destroy", "idler")
    assert r.returncode == 0, r.stdout + r.stderr


SLOW = """\
apiVersion: crv/v1
name: slow
nodes:
  w: {count: 1, roles: [slow], scale: {min: 1, max: 4}}
roles:
  slow: {recipe: slow.sh}
"""


def test_one_change_per_cluster_at_a_time(crv: Crv, tmp_path: Path) -> None:
    """Changes of one cluster triggered at once from separate processes: one told not to wait
    is refused with a message naming the cluster, one that waits runs after; none interleave."""
    directory = write_appliance(tmp_path, "slow", SLOW, ("slow.sh",))
    # slow on the nodes a scale adds: the first change holds the cluster for 40 s after its new
    # node's recipe starts, longer than a loaded machine takes to start the second `crv scale`
    (directory / "slow.sh").write_text(
        '#!/bin/sh\ncase "$CRV_NODE" in *-w-0) exit 0 ;; esac\nsleep 40\n'
    )
    r = crv("deploy", str(directory), "--name", "lockme", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    first = crv.popen("scale", "lockme", "w", "2")
    try:
        deadline = time.monotonic() + 120

        def recipe_running() -> bool:  # the first is inside its change, its recipe under way
            nodes = crv.status("lockme")["nodes"]
            return any(n["roles"].get("slow") == "running" for n in nodes[1:])

        while not recipe_running():
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        refused = crv("scale", "lockme", "w", "3", "--wait", "0")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "cluster lockme is busy: another change to it is running" in refused.stderr
        waiting = crv.popen("destroy", "lockme")  # waits for the scale, then destroys
        out, _ = first.communicate(timeout=180)
        assert first.returncode == 0, out
        assert "cluster lockme is ready (2 nodes)" in out
        gone, _ = waiting.communicate(timeout=180)
        assert waiting.returncode == 0, gone
        assert "destroyed lockme: 2 nodes removed" in gone
    finally:
        for p in (first, locals().get("waiting")):
            if p is not None and p.poll() is None:
                p.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("elastic", "worker", "0"), "nodes.worker.scale.min: 0 is below scale.min 1"),
        (("elastic", "worker", "1001"), "nodes.worker.scale.max: 1001 is above scale.max 1000"),
        (("elastic", "front", "2"), "nodes.front.scale: the group has no scale section"),
        (("elastic", "nosuch", "2"), "count: nosuch: unknown node group"),
        (("ghost", "worker", "2"), "no cluster 'ghost'"),
    ],
)
def test_scale_refuses_bad_input_before_anything(
    crv: Crv, args: tuple[str, ...], message: str
) -> None:
    before = crv.node_agents()
    r = crv("scale", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert crv.node_agents() == before


# Workers publish their name; the head reads them all (it re-runs when the set changes). A
# worker's drain writes where it ran to a shared log; it fails on a node whose flag file exists.
DRAINY = """\
apiVersion: crv/v1
name: drainy
parameters:
  flags: {type: string, default: /nonexistent, max_length: 1024}
nodes:
  head: {count: 1, roles: [head]}
  worker: {count: 3, roles: [work], scale: {min: 1, max: 6}}
roles:
  work: {recipe: work.sh, drain: drain.sh, publishes: [id]}
  head: {recipe: head.sh, depends_on: [work]}
"""
WORK = """#!/bin/sh
set -eu
if [ -e "$CRV_PARAM_FLAGS/fail-$CRV_NODE" ]; then echo "cannot start work" >&2; exit 4; fi
crv-agent set id "$CRV_NODE"
"""
DRAIN = """#!/bin/sh
echo "$CRV_NODE $CRV_ACTION" >> "$CRV_PARAM_FLAGS/drained.log"
if [ -e "$CRV_PARAM_FLAGS/nodrain-$CRV_NODE" ]; then echo "jobs still running" >&2; exit 3; fi
"""
HEAD = """#!/bin/sh
set -eu
crv-agent list work id | sort > "$CRV_PARAM_FLAGS/head-view.txt"
"""


def drainy(tmp_path: Path) -> tuple[Path, Path]:
    directory = write_appliance(tmp_path, "drainy", DRAINY, ("work.sh", "drain.sh", "head.sh"))
    for name, text in (("work.sh", WORK), ("drain.sh", DRAIN), ("head.sh", HEAD)):
        (directory / name).write_text(text)
    flags = tmp_path / "flags"
    flags.mkdir()
    return directory, flags


def pool_nodes(crv: Crv, cluster: str) -> set[str]:
    from pools import get_pool

    return {n.name for n in get_pool("local", crv.home / "pools" / "local").list_nodes(cluster)}


def test_shrink_drains_victims_and_keeps_a_node_whose_drain_fails(crv: Crv, tmp_path: Path) -> None:
    directory, flags = drainy(tmp_path)
    r = crv("deploy", str(directory), "--name", "dr", "--set", f"flags={flags}")
    assert r.returncode == 0, r.stdout + r.stderr
    workers = [f"dr-worker-{i}" for i in range(3)]
    serials = {n: node_serial(crv, n) for n in workers}
    (flags / "nodrain-dr-worker-1").touch()

    r = crv("scale", "dr", "worker", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: scale of dr failed: dr-worker-1 was kept: its drain of work ")
    assert "exited 3: jobs still running; the cluster now has worker=2" in err
    # both victims were drained at once, with CRV_ACTION=drain; only the one that drained
    # went, after the head let it go
    assert sorted((flags / "drained.log").read_text().splitlines()) == [
        "dr-worker-1 drain",
        "dr-worker-2 drain",
    ]
    status = service_status(crv, "dr")
    assert status["ready"] and status["counts"] == {"worker": 2}
    assert sorted(n["name"] for n in status["nodes"]) == ["dr-head-0", *workers[:2]]
    assert pool_nodes(crv, "dr") == {"dr-head-0", *workers[:2]}
    assert (flags / "head-view.txt").read_text().split() == workers[:2]
    revoked = crv.revoked_serials()
    assert serials["dr-worker-2"] in revoked
    assert serials["dr-worker-1"] not in revoked
    # the kept node's role ran again after the failed drain: a full member, verified
    kept = next(n for n in status["nodes"] if n["name"] == "dr-worker-1")
    assert kept["roles"]["work"]["state"] == "verified"
    assert kept["roles"]["work"]["release"] == 3  # deploy, drain, contextualized again

    # the drain works now: the same shrink finishes (the kept node runs its drain again)
    (flags / "nodrain-dr-worker-1").unlink()
    r = crv("scale", "dr", "worker", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert pool_nodes(crv, "dr") == {"dr-head-0", "dr-worker-0"}
    assert (flags / "head-view.txt").read_text().split() == ["dr-worker-0"]
    assert serials["dr-worker-1"] in crv.revoked_serials()
    assert service_status(crv, "dr")["counts"] == {"worker": 1}
    assert crv("destroy", "dr").returncode == 0


def test_rollback_removes_what_the_run_added_and_keeps_what_was_there(
    crv: Crv, tmp_path: Path
) -> None:
    directory, flags = drainy(tmp_path)
    r = crv("deploy", str(directory), "--name", "rb", "--set", f"flags={flags}")
    assert r.returncode == 0, r.stdout + r.stderr
    before = crv.status("rb")
    processes = set(crv.node_processes())
    serial0 = node_serial(crv, "rb-worker-0")

    # grow 3 -> 5 where one new node cannot start: the run fails and is rolled back
    (flags / "fail-rb-worker-4").touch()
    r = crv("scale", "rb", "worker", "5", "--on-failure", "rollback", "--retries", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert "rb-worker-4:contextualize:work failed" in err
    assert "rolled back: removed 2 nodes this run added (rb-worker-4, rb-worker-3)" in err
    after = service_status(crv, "rb")
    assert after["ready"] and after["counts"] == {}  # as recorded before: never resized
    assert [n["name"] for n in after["nodes"]] == [n["name"] for n in before["nodes"]]
    assert pool_nodes(crv, "rb") == {n["name"] for n in before["nodes"]}
    assert (flags / "head-view.txt").read_text().split() == [f"rb-worker-{i}" for i in range(3)]
    assert serial0 not in crv.revoked_serials()  # what was there is kept, untouched
    assert processes <= set(crv.node_processes())
    assert not (flags / "drained.log").exists()  # nodes a rollback removes are not drained
    assert crv("destroy", "rb").returncode == 0


ROLLBACK = DRAINY.replace("name: drainy\n", "name: drainy\non_failure: rollback\n")


def test_failed_first_deploy_with_rollback_leaves_nothing(crv: Crv, tmp_path: Path) -> None:
    directory, flags = drainy(tmp_path)
    (directory / "appliance.yaml").write_text(ROLLBACK)  # the appliance asks for rollback
    (flags / "fail-fresh-worker-1").touch()
    before = crv.node_agents()
    r = crv("deploy", str(directory), "--name", "fresh", "--set", f"flags={flags}",
            "--retries", "0")  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert "fresh-worker-1:contextualize:work failed" in err
    # 3 certificates revoked by the rollback: fresh-worker-1's was when it was quarantined
    assert "rolled back: removed the new cluster (4 nodes, 3 certificates)" in err
    gone = crv("status", "fresh")
    assert gone.returncode == 2 and "fresh" in gone.stderr  # no such cluster any more
    assert pool_nodes(crv, "fresh") == set()
    assert crv.node_agents() == before

    # --on-failure keep overrides the appliance: what was made stays, and a run again resumes
    r = crv("deploy", str(directory), "--name", "fresh", "--set", f"flags={flags}",
            "--retries", "0", "--on-failure", "keep")  # fmt: skip
    assert r.returncode == 1
    assert "rolled back" not in r.stderr
    assert len(pool_nodes(crv, "fresh")) == 4
    (flags / "fail-fresh-worker-1").unlink()
    r = crv("deploy", str(directory), "--name", "fresh", "--set", f"flags={flags}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert crv("destroy", "fresh").returncode == 0


def test_remove_takes_exactly_the_named_nodes(crv: Crv, tmp_path: Path) -> None:
    """`crv scale ... --remove NODE` (Cluster API #75, #8829): the named nodes go, whatever the
    release order would have picked (the newest); each bad request is one line, exit 2, and
    changes nothing."""
    directory, flags = drainy(tmp_path)
    r = crv("deploy", str(directory), "--name", "pick", "--set", f"flags={flags}")
    assert r.returncode == 0, r.stdout + r.stderr
    workers = [f"pick-worker-{i}" for i in range(3)]
    every = {"pick-head-0", *workers}
    refused = [
        (("2", "--remove", "pick-worker-7"), "--remove: pick-worker-7: not a node of group worker"),
        (("2", "--remove", "pick-head-0"), "--remove: pick-head-0: not a node of group worker"),
        (("1", "--remove", "pick-worker-0", "--remove", "pick-worker-0"), "named twice"),
        (("0", *[a for w in workers for a in ("--remove", w)]),
         "removing 3 of 3 nodes leaves 0, below the group's scale.min 1"),
        (("1", "--remove", "pick-worker-0"),
         "removing 1 of 3 nodes leaves 2, not COUNT 1 (give COUNT 2)"),
    ]  # fmt: skip
    for args, message in refused:
        r = crv("scale", "pick", "worker", *args)
        assert r.returncode == 2, (args, r.stdout + r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert pool_nodes(crv, "pick") == every
    assert not (flags / "drained.log").exists()

    # the oldest and the middle one, which the release order would never take first
    r = crv(
        "scale", "pick", "worker", "1", "--remove", "pick-worker-0", "--remove", "pick-worker-1"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert pool_nodes(crv, "pick") == {"pick-head-0", "pick-worker-2"}
    assert sorted((flags / "drained.log").read_text().splitlines()) == [
        "pick-worker-0 drain",
        "pick-worker-1 drain",
    ]
    assert (flags / "head-view.txt").read_text().split() == ["pick-worker-2"]
    assert service_status(crv, "pick")["counts"] == {"worker": 1}
    assert crv("destroy", "pick").returncode == 0


def test_a_group_resized_to_zero_and_back(crv: Crv, tmp_path: Path) -> None:
    """A group with scale.min 0 goes to no node and comes back (a plan with no step left to
    run once the group is empty: its progress was a division by zero)."""
    directory = write_appliance(tmp_path, "zero", """\
        apiVersion: crv/v1
        name: zero
        nodes:
          worker: {count: 2, roles: [work], scale: {min: 0, max: 3}}
        roles:
          work: {recipe: work.sh}
        """, ("work.sh",))  # fmt: skip
    assert crv("deploy", str(directory), "--name", "zero").returncode == 0
    r = crv("scale", "zero", "worker", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert pool_nodes(crv, "zero") == set()
    assert service_status(crv, "zero")["counts"] == {"worker": 0}
    r = crv("scale", "zero", "worker", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert pool_nodes(crv, "zero") == {"zero-worker-0"}
    assert crv("destroy", "zero").returncode == 0
