"""One contract, every driver: the same tests over the local pool, the sim pool, libvirt's
test driver, EC2 on moto's server and a bare-metal pool on a simulated rack (pools/base.py
says what the contract is).

- create is idempotent on the node name: created twice, one node;
- destroy is idempotent: destroying a node that is gone (or never was) succeeds;
- list_nodes(cluster) lists only that cluster's nodes, each tagged with its cluster and node;
- get_node of an unknown name is None;
- a node name held by another cluster is refused, permanently;
- errors are classified: a pool that cannot be reached is temporary;
- validate() makes no network call (it passes with the network unreachable).

Each driver's own tests (test_pool_<driver>.py) go deeper into what only it does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from crv.service.pki import CertificateAuthority
from pools import AGENT
from pools.base import TAG_CLUSTER, TAG_NODE, NodeSpec, Pool, PoolError
from tests.moto_server import moto_ec2  # noqa: F401  (a fixture the ec2 driver needs)

DRIVERS = ("local", "sim", "libvirt", "ec2", "baremetal")


def _local(tmp_path: Path, request: pytest.FixtureRequest) -> Pool:
    from pools.local import LocalPool

    return LocalPool(tmp_path / "local", AGENT)


def _sim(tmp_path: Path, request: pytest.FixtureRequest) -> Pool:
    from pools.sim import SimPool

    pool = SimPool(tmp_path / "sim", latency="provision=3600")  # never boots during a test
    request.addfinalizer(pool.shutdown)
    return pool


def _libvirt(tmp_path: Path, request: pytest.FixtureRequest) -> Pool:
    from tests.test_pool_libvirt import make_pool

    return make_pool(tmp_path)


def _ec2(tmp_path: Path, request: pytest.FixtureRequest) -> Pool:
    request.getfixturevalue("moto_ec2")
    from tests.test_pool_cloud import make_pool

    return make_pool(tmp_path)


def _baremetal(tmp_path: Path, request: pytest.FixtureRequest) -> Pool:
    pool: Pool = request.getfixturevalue("rack_pool")
    return pool


@pytest.fixture(scope="module")
def rack_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A 4-machine simulated rack (ipmi_sim BMCs) and its boot service in a thread; the
    machines network-boot for real but never call back (nobody answers at the service URL)."""
    if not os.access("/usr/bin/ipmi_sim", os.X_OK) and os.environ.get("CI") != "true":
        pytest.skip("OpenIPMI's ipmi_sim (Debian package openipmi) is not installed")
    from crv.base.home import Home
    from pools import get_pool
    from pools.baremetal import simrack

    home = Home(tmp_path_factory.mktemp("rack-home"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CRV_HOME", str(home.root))
        env.delenv("CRV_POOLS_FILE", raising=False)
        simrack.create(home, "rack", machines=4)
        try:
            pool = get_pool("rack", home.pool_dir("rack"))
            ready = threading.Event()
            threading.Thread(target=pool.serve_boot, args=(ready,), daemon=True).start()  # type: ignore[attr-defined]
            assert ready.wait(10), "the boot service did not start"
            yield pool
        finally:
            simrack.stop(home, "rack")


MAKERS: dict[str, Callable[[Path, pytest.FixtureRequest], Pool]] = {
    "local": _local,
    "sim": _sim,
    "libvirt": _libvirt,
    "ec2": _ec2,
    "baremetal": _baremetal,
}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create_or_load(tmp_path_factory.mktemp("ca"))


@pytest.fixture(params=DRIVERS)
def pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pool]:
    p = MAKERS[request.param](tmp_path, request)
    made: list[str] = []
    original = p.create_node

    def tracked(spec: NodeSpec) -> Any:
        made.append(spec.name)
        return original(spec)

    p.create_node = tracked  # type: ignore[method-assign]
    yield p
    for name in made:  # whatever a failed test left behind
        with contextlib.suppress(PoolError):
            p.destroy_node(name)


def cluster_name() -> str:
    return f"k{uuid.uuid4().hex[:8]}"


def spec(ca: CertificateAuthority, cluster: str, index: int = 0) -> NodeSpec:
    name = f"{cluster}-w-{index}"
    return NodeSpec(
        name=name,
        cluster=cluster,
        group="w",
        bootstrap={
            "service": "https://127.0.0.1:1",  # nobody answers: the node never enrols
            "ca": ca.certificate_pem.decode(),
            "ca_sha256": ca.fingerprint_sha256,
            "cluster": cluster,
            "node": name,
            "token": "contract-" + "t" * 34,
        },
    )


def test_create_is_idempotent_and_the_node_is_tagged(pool: Pool, ca: CertificateAuthority) -> None:
    cluster = cluster_name()
    first = pool.create_node(spec(ca, cluster))
    again = pool.create_node(spec(ca, cluster))
    assert first.name == again.name == f"{cluster}-w-0"
    listed = pool.list_nodes(cluster)
    assert [n.name for n in listed] == [first.name]  # one node, not two
    node = listed[0]
    assert node.cluster == cluster
    assert node.state in ("pending", "running")
    assert node.tags.get(TAG_CLUSTER) == cluster and node.tags.get(TAG_NODE) == first.name
    got = pool.get_node(first.name)
    assert got is not None and got.name == first.name and got.cluster == cluster
    assert "contract-" not in repr(got) + repr(listed)  # the token never leaves the machine


def test_list_shows_only_the_clusters_own_nodes(pool: Pool, ca: CertificateAuthority) -> None:
    mine, other = cluster_name(), cluster_name()
    pool.create_node(spec(ca, mine, 0))
    pool.create_node(spec(ca, mine, 1))
    pool.create_node(spec(ca, other, 0))
    assert sorted(n.name for n in pool.list_nodes(mine)) == [f"{mine}-w-0", f"{mine}-w-1"]
    assert [n.name for n in pool.list_nodes(other)] == [f"{other}-w-0"]
    every = {n.name for n in pool.list_nodes()}
    assert {f"{mine}-w-0", f"{mine}-w-1", f"{other}-w-0"} <= every


def test_destroy_is_idempotent(pool: Pool, ca: CertificateAuthority) -> None:
    cluster = cluster_name()
    node = pool.create_node(spec(ca, cluster))
    pool.destroy_node(node.name)
    assert pool.get_node(node.name) is None
    assert pool.list_nodes(cluster) == []
    pool.destroy_node(node.name)  # gone already
    pool.destroy_node(f"{cluster}-w-99")  # never was
    assert pool.get_node(f"{cluster}-w-99") is None
    again = pool.create_node(spec(ca, cluster))  # and the name can be used again
    assert [n.name for n in pool.list_nodes(cluster)] == [again.name]


def test_a_name_held_by_another_cluster_is_refused(pool: Pool, ca: CertificateAuthority) -> None:
    cluster = cluster_name()
    taken = pool.create_node(spec(ca, cluster))
    thief = spec(ca, cluster)
    foreign = NodeSpec(taken.name, cluster_name(), "w", thief.bootstrap)
    with pytest.raises(PoolError) as caught:
        pool.create_node(foreign)
    assert caught.value.temporary is False
    assert [n.name for n in pool.list_nodes(cluster)] == [taken.name]


def test_validate_needs_no_network(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validate() opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    pool.validate()


def _unreachable(driver: str, tmp_path: Path) -> Pool | None:
    """The driver pointed at a place nobody answers; None for pools that have no remote end."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    if driver == "libvirt":
        from pools.libvirt import LibvirtOptions, LibvirtPool

        options = LibvirtOptions.model_validate(
            {"uri": f"qemu+tcp://127.0.0.1:{port}/system", "base_image": "/images/base.qcow2"}
        )
        return LibvirtPool("vm", tmp_path / "vm", options)
    if driver == "ec2":
        from pools.cloud import CloudOptions, CloudPool
        from tests.test_pool_cloud import options

        opts = CloudOptions.model_validate(options(port))
        return CloudPool("moto", tmp_path / "ec2", opts)
    return None


@pytest.mark.parametrize("driver", ["libvirt", "ec2"])
def test_an_unreachable_pool_is_a_temporary_error(
    driver: str, tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_pool_cloud import KEY_VAR, SECRET_VAR

    monkeypatch.setenv(KEY_VAR, "testing")
    monkeypatch.setenv(SECRET_VAR, "testing")
    pool = _unreachable(driver, tmp_path)
    assert pool is not None
    pool.validate()  # the configuration itself is fine
    for call in (
        lambda: pool.list_nodes(),
        lambda: pool.get_node("u-w-0"),
        lambda: pool.create_node(spec(ca, "u")),
        lambda: pool.destroy_node("u-w-0"),
    ):
        with pytest.raises(PoolError) as caught:
            call()
        assert caught.value.temporary is True, caught.value
        assert str(caught.value).startswith(f"pool {pool.name}: ")
