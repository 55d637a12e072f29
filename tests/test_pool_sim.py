"""The sim pool's contract (no service needed: the nodes never get far enough to call it)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pools import get_pool
from pools.base import TAG_CLUSTER, NodeSpec, PoolError
from pools.sim import SimPool, latency_for, parse_latency

BOOT = {"service": "https://127.0.0.1:1", "ca": "", "ca_sha256": "", "cluster": "c", "node": ""}


def spec(name: str, cluster: str = "c") -> NodeSpec:
    return NodeSpec(name, cluster, "worker", {**BOOT, "node": name, "token": "t" * 43})


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[SimPool]:
    p = SimPool(tmp_path / "sim", latency="provision=3600")  # never boots during a test
    p.validate()
    yield p
    p.shutdown()


def test_create_is_idempotent_list_get_destroy(pool: SimPool) -> None:
    assert pool.list_nodes() == [] and pool.get_node("c-worker-0") is None  # no host yet
    first = pool.create_node(spec("c-worker-0"))
    assert first.state == "pending" and first.address and first.address.startswith("10.")
    assert first.tags[TAG_CLUSTER] == "c"
    again = pool.create_node(spec("c-worker-0"))
    assert again.address == first.address
    pool.create_node(spec("d-worker-0", cluster="d"))
    assert [n.name for n in pool.list_nodes("c")] == ["c-worker-0"]
    assert len(pool.list_nodes()) == 2
    with pytest.raises(PoolError, match="exists in cluster 'c'"):
        pool.create_node(spec("c-worker-0", cluster="d"))
    pool.destroy_node("c-worker-0")
    pool.destroy_node("c-worker-0")  # idempotent
    assert pool.get_node("c-worker-0") is None
    assert [n.name for n in pool.list_nodes()] == ["d-worker-0"]


def test_verify_endpoint_answers_for_held_nodes_only(pool: SimPool) -> None:
    pool.create_node(spec("c-worker-0"))
    host = pool.host()
    assert host is not None
    base = f"http://127.0.0.1:{host['verify_port']}/verify/0.01"
    for suffix in ("", "/health"):  # a verify template may add a path to `self.url`
        with urllib.request.urlopen(f"{base}/c-worker-0{suffix}", timeout=5) as r:
            assert r.status == 200
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"{base}/c-worker-1", timeout=5)


def test_shutdown_stops_the_host(pool: SimPool) -> None:
    pool.create_node(spec("c-worker-0"))
    assert pool.shutdown() is True
    assert pool.host() is None and pool.list_nodes() == []
    assert pool.shutdown() is False


def test_latency_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lat = parse_latency("provision=2, contextualize.lb=3,verify=0.5")
    assert lat == {"provision": 2.0, "contextualize.lb": 3.0, "verify": 0.5}
    assert latency_for(lat, "contextualize", "lb") == 3.0
    assert latency_for(lat, "contextualize", "web") == 5.0  # the default
    monkeypatch.setenv("CRV_SIM_LATENCY", "boot=3")
    with pytest.raises(PoolError, match="CRV_SIM_LATENCY: 'boot=3'"):
        get_pool("sim", tmp_path / "sim")


def test_capacity_counts_the_nodes_held(tmp_path: Path) -> None:
    assert SimPool(tmp_path / "unlimited").capacity() is None
    p = SimPool(tmp_path / "capped", latency="provision=3600", name="tiny", max_nodes=2)
    p.validate()
    try:
        assert p.capacity() == 2  # no host yet
        p.create_node(spec("c-worker-0"))
        p.create_node(spec("d-worker-0", cluster="d"))
        assert p.capacity() == 0
        p.destroy_node("c-worker-0")
        assert p.capacity() == 1
    finally:
        p.shutdown()
