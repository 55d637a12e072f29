"""The local pool with real processes: a stand-in agent that leaves a child in its group and a
grandchild that escaped with setsid, so destroy has to find processes the way a reconciler would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pools import local
from pools.base import TAG_CLUSTER, TAG_NODE, NodeSpec, Pool, PoolError
from pools.local import LocalPool
from tests.conftest import LOCAL_NET

TOKEN = "tok-3c1f9a7e5d2b48e6"

# Stands in for agent/crv_agent.py: reads its bootstrap (never prints it), starts a child in
# its own group and a setsid'd grandchild, writes their pids, and sleeps.
STAND_IN = textwrap.dedent(
    """
    import json, os, subprocess, sys, time

    home = sys.argv[sys.argv.index("--home") + 1]
    assert sys.argv[1] == "run"

    def note(name, value):
        tmp = os.path.join(home, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(value))
        os.replace(tmp, os.path.join(home, name))

    json.load(open(os.path.join(home, "bootstrap.json")))
    print("stand-in agent up", flush=True)
    child = subprocess.Popen(["sleep", "300"])
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            os.setsid()
            note("escapee.pid", os.getpid())
            time.sleep(300)
        os._exit(0)
    os.waitpid(middle, 0)
    note("child.pid", child.pid)
    time.sleep(300)
    """
)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[LocalPool]:
    agent = tmp_path / "crv_agent.py"
    agent.write_text(STAND_IN)
    pool = LocalPool(tmp_path / "pools" / "local", agent)
    yield pool
    for node in pool.list_nodes():  # whatever a failed test left, orphans included
        pool.destroy_node(node.name)


def spec(name: str, cluster: str = "c1", **tags: str) -> NodeSpec:
    return NodeSpec(name, cluster, "workers", bootstrap={"token": TOKEN, "ca": "x"}, tags=tags)


def wait_for(check: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """A zombie waiting for a reaper we do not control counts as gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def tree(pool: LocalPool, name: str) -> list[int]:
    """Agent, group child and setsid escapee of a node, once the stand-in has started them."""
    home = pool.root / name
    wait_for(lambda: (home / "child.pid").exists() and (home / "escapee.pid").exists())
    agent = json.loads((home / "node.json").read_text())["pid"]
    return [agent, int((home / "child.pid").read_text()), int((home / "escapee.pid").read_text())]


def agents_of(pool: LocalPool, name: str) -> list[int]:
    """Processes of a node that this test process spawned: its agents (one, or a bug)."""
    found = []
    for pid, marks in pool._scan().items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:  # a short-lived fork of the stand-in, gone since the scan
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if marks.get("CRV_LOCAL_NODE") == name and ppid == os.getpid():
            found.append(pid)
    return found


def test_is_a_pool(pool: LocalPool) -> None:
    assert isinstance(pool, Pool)
    assert pool.name == "local"
    pool.validate()


def test_create_is_idempotent_and_nodes_get_distinct_addresses(pool: LocalPool) -> None:
    first = pool.create_node(spec("n1", role="db"))
    record = (pool.root / "n1" / "node.json").read_bytes()
    again = pool.create_node(spec("n1", role="db"))
    assert first == again
    assert first.state == "running" and first.address == f"{LOCAL_NET}.1.1"
    assert (pool.root / "n1" / "node.json").read_bytes() == record
    assert first.tags == {"role": "db", TAG_CLUSTER: "c1", TAG_NODE: "n1"}
    assert agents_of(pool, "n1") == [json.loads(record)["pid"]]
    second = pool.create_node(spec("n2"))
    assert second.address == f"{LOCAL_NET}.1.2"
    for node in (first, second):
        assert node.address is not None
        with socket.socket() as s:
            s.bind((node.address, 0))
    assert pool.get_node("n1") == first
    assert pool.get_node("nope") is None


def test_agent_environment_and_files(pool: LocalPool) -> None:
    pool.create_node(spec("n1"))
    home = pool.root / "n1"
    agent = tree(pool, "n1")[0]
    env = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{agent}/environ").read_text().split("\0")
        if "=" in item
    )
    assert env["CRV_LOCAL_POOL"] == str(pool.root) and env["CRV_LOCAL_NODE"] == "n1"
    assert env["PATH"].split(os.pathsep)[0] == str(home / "bin")
    assert Path(f"/proc/{agent}/cwd").resolve() == home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "bin" / "crv-agent").stat().st_mode) == 0o755
    assert stat.S_IMODE((home / "bootstrap.json").stat().st_mode) == 0o600
    assert json.loads((home / "bootstrap.json").read_text()) == {"token": TOKEN, "ca": "x"}
    wait_for(lambda: b"stand-in agent up" in (home / "agent.log").read_bytes())
    assert TOKEN not in (home / "node.json").read_text()
    assert TOKEN.encode() not in (home / "agent.log").read_bytes()
    assert TOKEN not in repr(pool.get_node("n1"))


def test_destroy_leaves_no_process_and_frees_the_address(pool: LocalPool) -> None:
    pool.create_node(spec("n1"))
    pids = tree(pool, "n1")
    assert all(alive(pid) for pid in pids)
    pool.destroy_node("n1")
    assert not any(alive(pid) for pid in pids)
    assert not (pool.root / "n1").exists()
    assert pool.get_node("n1") is None
    pool.destroy_node("n1")
    pool.destroy_node("never-made")
    assert pool.create_node(spec("n3")).address == f"{LOCAL_NET}.1.1"


def test_what_ignores_sigterm_gets_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "TERM_GRACE", 0.2)
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + STAND_IN)
    pool = LocalPool(tmp_path / "stubborn-pool", stubborn)
    pool.create_node(spec("n1"))
    pids = tree(pool, "n1")
    began = time.monotonic()
    pool.destroy_node("n1")
    assert time.monotonic() - began >= 0.2
    assert not any(alive(pid) for pid in pids)
    assert pool.list_nodes() == []


def test_dead_agent_is_restarted_with_the_same_address(pool: LocalPool) -> None:
    node = pool.create_node(spec("n1"))
    pool.create_node(spec("n2"))
    agent, child, escapee = tree(pool, "n1")
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: pool.get_node("n1").state == "stopped")  # type: ignore[union-attr]
    (pool.root / "n1" / "child.pid").unlink()
    again = pool.create_node(spec("n1"))
    assert again.state == "running" and again.address == node.address
    assert again.extra["pid"] != agent
    assert not alive(child) and not alive(escapee)  # a restart is a reboot: no leftovers
    assert tree(pool, "n1")[0] == again.extra["pid"]


def test_restart_keeps_bootstrap_of_an_enrolled_node(pool: LocalPool) -> None:
    pool.create_node(spec("n1"))
    home = pool.root / "n1"
    agent = tree(pool, "n1")[0]
    (home / "node.crt").write_text("cert")
    (home / "bootstrap.json").unlink()  # spent and removed by the agent after enrolment
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: pool.get_node("n1").state == "stopped")  # type: ignore[union-attr]
    pool.create_node(spec("n1"))
    assert not (home / "bootstrap.json").exists()


def test_orphaned_processes_are_listed_and_destroyed(pool: LocalPool) -> None:
    pool.create_node(spec("n1"))
    pids = tree(pool, "n1")
    shutil.rmtree(pool.root / "n1")
    orphans = [n for n in pool.list_nodes() if n.name == "n1"]
    assert [(n.state, n.address, n.cluster) for n in orphans] == [("orphan", None, "c1")]
    assert [n.name for n in pool.list_nodes(cluster="c1")] == ["n1"]
    pool.destroy_node("n1")
    assert not any(alive(pid) for pid in pids)
    assert pool.list_nodes() == []


def test_concurrent_creates_get_distinct_addresses(pool: LocalPool) -> None:
    with ThreadPoolExecutor(max_workers=20) as executor:
        nodes = list(executor.map(pool.create_node, [spec(f"n{i}") for i in range(20)]))
    addresses = {node.address for node in nodes}
    assert len(addresses) == 20
    assert all(a is not None and a.startswith(f"{LOCAL_NET}.1.") for a in addresses)
    with ThreadPoolExecutor(max_workers=20) as executor:
        list(executor.map(pool.destroy_node, [f"n{i}" for i in range(20)]))
    assert pool.list_nodes() == []


def test_list_nodes_filters_by_cluster(pool: LocalPool) -> None:
    pool.create_node(spec("a1", cluster="alpha"))
    pool.create_node(spec("a2", cluster="alpha"))
    pool.create_node(spec("b1", cluster="beta"))
    assert [n.name for n in pool.list_nodes(cluster="alpha")] == ["a1", "a2"]
    assert [n.name for n in pool.list_nodes(cluster="beta")] == ["b1"]
    assert [n.name for n in pool.list_nodes()] == ["a1", "a2", "b1"]
    assert pool.list_nodes(cluster="gamma") == []


def test_a_name_belongs_to_one_cluster(pool: LocalPool) -> None:
    pool.create_node(spec("n1", cluster="alpha"))
    with pytest.raises(PoolError, match="exists in cluster 'alpha'") as info:
        pool.create_node(spec("n1", cluster="beta"))
    assert not info.value.temporary


@pytest.mark.parametrize("name", ["", ".lock", "../x", "a/b"])
def test_unusable_names_are_refused(pool: LocalPool, name: str) -> None:
    with pytest.raises(PoolError, match="unusable node name"):
        pool.create_node(spec(name))


def test_validate_refuses_a_missing_agent(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-agent.py"
    with pytest.raises(PoolError, match=f"agent program {missing} not found") as info:
        LocalPool(tmp_path / "root", missing).validate()
    assert not info.value.temporary


def test_filesystem_errors_become_pool_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    bad = LocalPool(tmp_path / "file" / "root", tmp_path / "file")
    with pytest.raises(PoolError, match="create node n1") as info:
        bad.create_node(spec("n1"))
    assert not info.value.temporary


def test_capacity_and_pools_side_by_side_share_addresses(pool: LocalPool, tmp_path: Path) -> None:
    assert pool.capacity() is None  # no max_nodes: no known limit
    small = LocalPool(tmp_path / "pools" / "small", pool.agent, name="small", max_nodes=2)
    assert small.capacity() == 2
    try:
        a = pool.create_node(spec("c1-a-0"))
        b = small.create_node(spec("c1-b-0"))
        assert a.address != b.address  # one address table for the local pools of a home
        assert small.capacity() == 1
        small.create_node(spec("c2-b-1", cluster="c2"))  # any cluster's node counts
        assert small.capacity() == 0
    finally:
        for node in small.list_nodes():
            small.destroy_node(node.name)
    assert small.capacity() == 2
