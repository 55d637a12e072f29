"""Which pool each node group goes to (crv.engine.placement.place) and the pools a cluster uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from crv.appliance.loader import load_appliance
from crv.base.errors import SpecError
from crv.engine.placement import Placement, capacities, place, pools_of, recorded, release_order
from pools.base import PoolError
from tests.conftest import write_appliance

TWO_GROUPS = """\
apiVersion: crv/v1
name: two
nodes:
  head: {count: 1, roles: [head]}
  worker: {count: 2, roles: [work], pool: vm}
roles:
  work: {recipe: work.sh}
  head: {recipe: head.sh, depends_on: [work]}
"""


@pytest.fixture
def appliance(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_appliance(write_appliance(tmp_path, "two", TWO_GROUPS, ("work.sh", "head.sh")))


def test_appliance_pool_then_default(appliance) -> None:  # type: ignore[no-untyped-def]
    p = place(appliance, "local", None)
    assert (p.of("head"), p.of("worker")) == ("local", "vm")
    assert p == Placement("local", {"worker": "vm"})
    assert p.names() == ["local", "vm"]


def test_pool_for_wins_over_the_appliance(appliance) -> None:  # type: ignore[no-untyped-def]
    p = place(appliance, "sim", {"worker": "ec2", "head": "local"})
    assert (p.of("head"), p.of("worker")) == ("local", "ec2")
    # a group placed in the default pool is not recorded as a choice of its own
    assert place(appliance, "vm", None).groups == {}


def test_pool_for_an_unknown_group_is_refused(appliance) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError) as err:
        place(appliance, "local", {"wroker": "vm"})
    assert str(err.value) == "--pool-for: wroker: unknown node group; the groups are head, worker"


def test_recorded_placement_and_every_pool_a_cluster_uses() -> None:
    status = {
        "pool": "local",
        "pools": {"worker": "ec2"},
        "nodes": [
            {"name": "c-head-0", "pool": "local"},
            {"name": "c-worker-0", "pool": "vm"},  # made before the group moved to ec2
        ],
    }
    assert recorded(status).of("worker") == "ec2" and recorded(status).of("head") == "local"
    assert pools_of(status, "sim") == ["ec2", "local", "sim", "vm"]
    assert pools_of(None, "local") == ["local"]


PREFERENCE = TWO_GROUPS.replace("pool: vm}", "pools: [rack, vm, ec2]}")


@pytest.fixture
def preferring(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_appliance(write_appliance(tmp_path, "two", PREFERENCE, ("work.sh", "head.sh")))


def test_a_list_of_pools_is_an_order(preferring) -> None:  # type: ignore[no-untyped-def]
    assert preferring.groups["worker"].pools == ("rack", "vm", "ec2")
    p = place(preferring, "local", None)
    assert p.of("worker") == "rack" and p.order("worker") == ("rack", "vm", "ec2")
    assert p.order("head") == ("local",)
    assert p.groups == {"worker": "rack"}  # what the cluster record keeps: the first pool
    assert p.names() == ["ec2", "local", "rack", "vm"]  # every pool is checked and opened
    # --pool-for replaces the list with its one pool
    over = place(preferring, "local", {"worker": "vm"})
    assert over.order("worker") == ("vm",) and over.names() == ["local", "vm"]


def test_the_recorded_order_comes_from_the_recorded_appliance(preferring) -> None:  # type: ignore[no-untyped-def]
    status = {"pool": "local", "pools": {"worker": "rack"}, "nodes": []}
    assert recorded(status).order("worker") == ("rack",)
    assert recorded(status, preferring).order("worker") == ("rack", "vm", "ec2")
    assert recorded(status, preferring) == place(preferring, "local", None)
    # placed with --pool-for elsewhere: the list does not apply
    moved = {"pool": "local", "pools": {"worker": "vm"}, "nodes": []}
    assert recorded(moved, preferring).order("worker") == ("vm",)
    # the first pool of the list is the deploy's default: not in `pools`, still the list
    default = {"pool": "rack", "pools": {"head": "local"}, "nodes": []}
    assert recorded(default, preferring).order("worker") == ("rack", "vm", "ec2")


def test_release_order_goes_from_the_last_pool_newest_first() -> None:
    p = Placement("local", {"worker": "rack"}, {"worker": ("rack", "vm", "ec2")})
    nodes = [
        {"name": "c-worker-0", "pool": "rack"},
        {"name": "c-worker-1", "pool": "vm"},
        {"name": "c-worker-2", "pool": "rack"},
        {"name": "c-worker-3", "pool": "ec2"},
        {"name": "c-worker-10", "pool": "vm"},
        {"name": "c-worker-4", "pool": "sim"},  # a pool no longer in the list: first to go
        {"name": "c-worker-9", "pool": "ec2"},
    ]
    assert release_order(p, "worker", nodes) == [
        "c-worker-4", "c-worker-9", "c-worker-3", "c-worker-10", "c-worker-1",
        "c-worker-2", "c-worker-0",
    ]  # fmt: skip
    # a group without a list: newest first
    assert release_order(p, "head", [{"name": "c-head-1", "pool": "local"},
                                     {"name": "c-head-2", "pool": "local"}]) == [
        "c-head-2", "c-head-1"
    ]  # fmt: skip


def test_release_order_is_idle_first_within_a_pool_and_the_pool_order_comes_first() -> None:
    p = Placement("local", {"worker": "rack"}, {"worker": ("rack", "ec2")})
    nodes = [
        {"name": "c-worker-0", "pool": "rack"},
        {"name": "c-worker-1", "pool": "rack"},
        {"name": "c-worker-2", "pool": "rack"},
        {"name": "c-worker-3", "pool": "rack"},
        {"name": "c-worker-9", "pool": "rack"},
        {"name": "c-worker-10", "pool": "rack"},
        {"name": "c-worker-4", "pool": "ec2"},
        {"name": "c-worker-5", "pool": "ec2"},
        {"name": "c-worker-6", "pool": "sim"},  # a pool no longer in the list
    ]
    busy = {
        "c-worker-0": 5.0,
        "c-worker-1": 0.0,  # idle: a value of 0 is a value, not a missing one
        "c-worker-3": 0.0,
        "c-worker-9": 5.0,
        "c-worker-10": 0.5,
        "c-worker-4": 900.0,  # very busy, but in the last preferred pool: still goes first
        "c-worker-6": 1e9,
        "c-other-0": 0.0,  # another group's node: not in the answer
    }  # c-worker-2 and c-worker-5 published nothing: counted as busy
    assert release_order(p, "worker", nodes, busy) == [
        "c-worker-6",
        "c-worker-4", "c-worker-5",
        "c-worker-3", "c-worker-1", "c-worker-10", "c-worker-9", "c-worker-0", "c-worker-2",
    ]  # fmt: skip
    # without busy values (or none published): newest first within each pool
    newest = ["c-worker-6", "c-worker-5", "c-worker-4", "c-worker-10", "c-worker-9",
              "c-worker-3", "c-worker-2", "c-worker-1", "c-worker-0"]  # fmt: skip
    assert release_order(p, "worker", nodes) == newest
    assert release_order(p, "worker", nodes, {}) == newest
    # a busy node in the last pool goes before an idle one in the first
    two = [{"name": "c-worker-0", "pool": "rack"}, {"name": "c-worker-1", "pool": "ec2"}]
    assert release_order(p, "worker", two, {"c-worker-0": 0.0, "c-worker-1": 50.0}) == [
        "c-worker-1", "c-worker-0"
    ]  # fmt: skip


class _Full:
    def __init__(self, room: int | None, fail: bool = False) -> None:
        self.room, self.fail, self.asked = room, fail, 0

    def capacity(self, group: str | None = None) -> int | None:
        self.asked += 1
        if self.fail:
            raise PoolError("broken", "BMC unreachable", temporary=True)
        return self.room


class _Classes:
    """A bare-metal pool's answer: free machines by the group's class."""

    def capacity(self, group: str | None = None) -> int | None:
        return {"gpu": 1, None: 5}.get(group, 4)


def test_capacities_for_a_group_count_only_what_it_could_get() -> None:
    pools = {"rack": _Classes(), "lab": _Full(None)}
    assert capacities(lambda n: pools[n], ["rack", "lab"], "gpu") == {"rack": 1, "lab": None}  # type: ignore[arg-type,return-value]
    assert capacities(lambda n: pools[n], ["rack"], "compute") == {"rack": 4}  # type: ignore[arg-type,return-value]
    assert capacities(lambda n: pools[n], ["rack"]) == {"rack": 5}  # type: ignore[arg-type,return-value]


def test_capacities_asks_each_pool_once() -> None:
    pools = {"a": _Full(2), "b": _Full(None), "c": _Full(5, fail=True), "d": object()}
    got = capacities(lambda name: pools[name], ["a", "b", "c", "d", "a"])  # type: ignore[arg-type,return-value]
    assert got == {"a": 2, "b": None, "c": 0, "d": None}
    assert pools["a"].asked == 1  # type: ignore[attr-defined]
