"""Which pool each node group goes to (crv.placement.place) and the pools a cluster uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from crv.appliance import load_appliance
from crv.errors import SpecError
from crv.placement import Placement, place, pools_of, recorded
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
