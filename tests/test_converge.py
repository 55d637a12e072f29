"""crv.engine.converge: the decisions a converge takes, state in, decision out."""

from __future__ import annotations

import pytest

from crv.appliance.loader import Appliance, load_appliance, with_counts
from crv.appliance.plan import expand
from crv.engine import converge
from crv.service.models import ClusterStatus, NodeStatus, RoleStatus
from tests.conftest import write_appliance

APPLIANCE = """\
apiVersion: crv/v1
name: drainy
nodes:
  head: {count: 1, roles: [head]}
  worker: {count: 3, roles: [work], scale: {min: 1, max: 6}}
  fixed: {count: 1, roles: [work]}
roles:
  work: {recipe: work.sh, drain: drain.sh}
  head: {recipe: head.sh, depends_on: [work]}
"""


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Appliance:
    root = tmp_path_factory.mktemp("converge")
    return load_appliance(
        write_appliance(root, "drainy", APPLIANCE, ("work.sh", "drain.sh", "head.sh"))
    )


def node(name: str, state: str = "enrolled", group: str = "worker", **roles: str) -> NodeStatus:
    return NodeStatus(
        name=name, group=group, pool="local", address=None, state=state, last_seen=None,
        roles={r: RoleStatus(state=s) for r, s in (roles or {"work": "verified"}).items()},
    )  # fmt: skip


def status(appliance: str = "drainy", **counts: int) -> ClusterStatus:
    return ClusterStatus(
        name="c", appliance=appliance, source="dir", pool="local", parameters={},
        counts=counts, pools={}, ready=True, nodes=[],
    )  # fmt: skip


def test_a_deploy_again_keeps_the_sizes_a_resize_recorded_for_the_same_appliance() -> None:
    assert converge.recorded_counts(status(worker=5), "drainy") == {"worker": 5}
    assert converge.recorded_counts(status("other", worker=5), "drainy") == {}
    assert converge.recorded_counts(None, "drainy") == {}


def test_victims_are_the_recorded_nodes_the_plan_lacks_newest_first() -> None:
    recorded = [node(f"c-worker-{i}") for i in (0, 1, 2, 10, 9)]
    found = converge.victims(recorded, {"c-worker-0", "c-worker-1"})
    assert [v["name"] for v in found] == ["c-worker-10", "c-worker-9", "c-worker-2"]
    assert converge.victims(recorded, {v["name"] for v in recorded}) == []


def test_only_roles_that_ran_on_a_node_with_an_agent_are_drained(appliance: Appliance) -> None:
    leaving = [
        node("c-worker-5"),  # verified: drained
        node("c-worker-4", work="done"),  # ran: drained
        node("c-worker-3", work="drained"),  # drained already
        node("c-worker-2", work="running"),  # still running its recipe: not drained
        node("c-worker-1", state="provisioned"),  # no agent yet
        node("c-head-1", group="head", head="verified"),  # head has no drain recipe
        node("c-gone-0", group="gone"),  # a group the appliance no longer has
        node("c-worker-0", state="leaving", work="verify_failed"),  # leaving still drains
    ]
    assert converge.roles_to_drain(appliance, leaving) == {
        "c-worker-5": ["work"],
        "c-worker-4": ["work"],
        "c-worker-0": ["work"],
    }


def test_a_victim_whose_drain_failed_stays_and_its_group_keeps_one_more(
    appliance: Appliance,
) -> None:
    plan = expand(with_counts(appliance, {"worker": 1}), "c")
    leaving = [node("c-worker-2"), node("c-worker-1")]
    grown_appliance, indices, sizes = converge.keep_undrained(plan, leaving, kept={"c-worker-2"})
    assert indices["worker"] == [0, 2] and indices["fixed"] == [0]
    assert sizes == {"worker": 2}
    assert grown_appliance.groups["worker"].count == 2
    assert grown_appliance.groups["head"].count == 1
    again = expand(grown_appliance, "c", indices)
    assert sorted(again.nodes) == ["c-fixed-0", "c-head-0", "c-worker-0", "c-worker-2"]


def test_only_a_resizable_groups_new_size_is_recorded(appliance: Appliance) -> None:
    # a fixed group (no scale section) tries again at the next deploy
    assert converge.recorded_sizes(appliance, {"worker": 2, "fixed": 2}) == {"worker": 2}


def test_kept_nodes_make_the_change_fail_saying_which_and_why() -> None:
    assert converge.kept_failure({}, {"worker": 1}) is None
    one = converge.kept_failure({"c-worker-2": "drain failed: exit 3"}, {"worker": 2, "head": 1})
    assert (
        one == "c-worker-2 was kept: its drain failed: exit 3; the cluster now has head=1, worker=2"
    )
    two = converge.kept_failure({"a": "x", "b": "y"}, {"worker": 3})
    assert two is not None and two.startswith("a was kept (and 1 more): its x")


def test_plan_indices_per_group(appliance: Appliance) -> None:
    plan = expand(with_counts(appliance, {"worker": 2}), "c", {"worker": [0, 4]})
    assert converge.plan_indices(plan) == {"head": [0], "worker": [0, 4], "fixed": [0]}


def test_a_repair_remakes_the_missing_then_the_lapsed_it_destroys_first() -> None:
    missing = [{"name": "c-worker-1", "pool": "sim", "state": "gone"}]
    ended = [
        {"name": "c-worker-1", "pool": "sim", "ended": "2026-01-01 00:00 UTC"},  # missing too
        {"name": "c-worker-2", "pool": "sim", "ended": "(no certificate)"},
    ]
    destroy, again = converge.remake(missing, ended)
    assert [n["name"] for n in destroy] == ["c-worker-2"]
    assert again == [
        {"name": "c-worker-1", "pool": "sim", "state": "gone"},
        {"name": "c-worker-2", "pool": "sim", "state": "lapsed"},
    ]
    assert converge.remake([], []) == ([], [])


# -- F5, F6: quarantine and the brake ------------------------------------------------------


def test_certify_or_a_new_nodes_first_contextualize_quarantines_it() -> None:
    assert converge.quarantines("certify", "c-w-0", made=set())
    assert converge.quarantines("contextualize", "c-w-0", made={"c-w-0"})
    # a member's recipe failing again (a resize re-ran it) does not shut it out
    assert not converge.quarantines("contextualize", "c-w-0", made={"c-w-1"})
    assert not converge.quarantines("verify", "c-w-0", made={"c-w-0"})
    assert not converge.quarantines("provision", "c-w-0", made={"c-w-0"})


@pytest.mark.parametrize(
    ("max_unhealthy", "new", "failed", "stops"),
    [
        ("40%", 5, 2, False),  # 40 % of 5 is 2: two may fail
        ("40%", 5, 3, True),
        ("40%", 3, 1, False),  # 1.2 rounds down to 1
        ("40%", 3, 2, True),
        ("40%", 1, 1, True),
        ("100%", 10, 10, False),  # the brake off
        ("0%", 10, 1, True),
        (3, 100, 3, False),  # a number of nodes
        (3, 100, 4, True),
    ],
)
def test_the_brake_stops_a_change_when_more_new_nodes_fail_than_max_unhealthy(
    max_unhealthy: int | str, new: int, failed: int, stops: bool
) -> None:
    why = converge.brake(max_unhealthy, new, failed)
    assert (why is not None) == stops
    if why is not None:
        limit = converge.unhealthy_limit(max_unhealthy, new)
        assert why == (
            f"stopped: {failed} of {new} new nodes failed, more than max_unhealthy "
            f"{max_unhealthy} ({limit}); crv makes no more nodes in this change"
        )


def test_a_halted_run_starts_no_step_and_a_stopped_node_none_of_its_own(
    appliance: Appliance,
) -> None:
    """The executor: after `halt` no step starts (those running finish); after `stop_node`
    none of that node's; both are skipped, not failed, and the halt counts what it kept."""
    import asyncio

    from crv.base.retry import RetryPolicy
    from crv.engine.executor import DagRun

    plan = expand(with_counts(appliance, {"worker": 3}), "c")
    ran: list[str] = []
    gate = asyncio.Event()

    async def step(sid: str) -> None:
        ran.append(sid)
        d = plan.graph.nodes[sid]
        if d["kind"] == "certify" and d["node"] == "c-worker-1":
            holder[0].stop_node("c-worker-1", "c-worker-1 is quarantined")
            raise RuntimeError("never enrolled")
        if d["kind"] == "contextualize" and d["node"] == "c-worker-0":
            holder[0].halt("stopped: the brake")
            gate.set()
        await asyncio.sleep(0)

    async def run() -> DagRun:
        dag = DagRun(plan, RetryPolicy(retries=0))
        holder.append(dag)
        await asyncio.gather(*(dag._run_step(sid, step) for sid in plan.graph))
        return dag

    holder: list[DagRun] = []
    dag = asyncio.run(run())
    states = {sid: r.state for sid, r in dag.results.items()}
    assert states["c-worker-1:certify"] == "failed"
    assert all(states[s] == "skipped" for s in states if s.startswith("c-worker-1:") and
               not s.endswith((":provision", ":certify")))  # fmt: skip
    assert not any(s.startswith("c-worker-1:contextualize") for s in ran)
    assert gate.is_set() and dag.halted == "stopped: the brake"
    assert not any(s.startswith("c-worker-0:verify") for s in ran)  # after the halt
    assert dag.results["c-worker-0:verify:work"].error == "stopped: the brake"
    assert dag.halted_steps >= 1
