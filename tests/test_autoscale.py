"""Autoscaling decisions (crv/engine/autoscale.py) and the what-if replay (`crv autoscale simulate`):
the `scaling` section's validation, every rule of `decide`, and replays of square waves that
prove cooldowns, the scale-down delay and no flapping."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from crv.appliance.spec import Scaling
from crv.base.errors import SpecError
from crv.engine.autoscale import Memory, Reading, decide, direction_changes, read_trace, replay
from tests.conftest import crv, write_appliance

SCALED = """\
apiVersion: crv/v1
name: scaled
nodes:
  front: {count: 1, roles: [lb]}
  worker:
    count: 2
    roles: [web]
    scale: {min: 1, max: 10}
    scaling:
      metric: {attribute: {role: lb, key: requests_per_second}, stale_after: 2m}
      policy: {target_per_node: 50}
      cooldown: 3m
      scale_down_delay: 5m
      max_step: 3
roles:
  lb: {recipe: lb.sh, depends_on: [web], publishes: [requests_per_second]}
  web: {recipe: web.sh}
"""


def scaling(**change: object) -> Scaling:
    doc: dict[str, object] = {
        "metric": {"attribute": {"role": "lb", "key": "rps"}, "stale_after": "2m"},
        "policy": {"target_per_node": 50},
        "cooldown": "3m",
        "scale_down_delay": "5m",
        "max_step": 3,
    }
    doc.update(change)
    return Scaling.model_validate(doc)


def square(period: float, high: float, low: float, hours: float = 4) -> list[tuple[float, float]]:
    """A reading every 30 s: `high` for half of each period, then `low`."""
    return [
        (float(t), high if (t // (period / 2)) % 2 == 0 else low)
        for t in range(0, int(hours * 3600), 30)
    ]


# -- the format -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("    scale: {min: 1, max: 10}\n", "", "nodes.worker.scaling", "autoscaling needs bounds"),
        ("role: lb, key:", "role: lbb, key:", "nodes.worker.scaling.metric.attribute.role",
         "unknown role 'lbb'"),
        ("{target_per_node: 50}", "{target_per_node: 50, scale_up_above: 9, scale_down_below: 1}",
         "nodes.worker.scaling.policy", "not both"),
        ("{target_per_node: 50}", "{scale_up_above: 10, scale_down_below: 20}",
         "nodes.worker.scaling.policy", "must be below"),
        ("cooldown: 3m", "cooldown: 3 minutes", "nodes.worker.scaling.cooldown", "not a duration"),
        ("key: requests_per_second}", "key: rps}", "nodes.worker.scaling.metric.attribute.key",
         "role lb does not publish 'rps'"),
        ("stale_after: 2m}", "stale_after: 2m, http: 'http://127.0.0.1:9/m'}",
         "nodes.worker.scaling.metric", "exactly one of 'attribute' or 'http'"),
    ],
    ids=["no-bounds", "unknown-role", "both-policies", "crossed", "bad-duration", "unpublished",
         "two-sources"],
)  # fmt: skip
def test_scaling_errors_are_one_line_naming_the_field(
    tmp_path: Path, old: str, new: str, field: str, message: str
) -> None:
    assert old in SCALED
    directory = write_appliance(tmp_path, "scaled", SCALED.replace(old, new), ("lb.sh", "web.sh"))
    r = crv("validate", str(directory))
    assert r.exit_code == 2, r.stdout
    line = r.stderr.strip()
    assert "\n" not in line and f": {field}: " in line and message in line, line


def test_durations_read_as_seconds() -> None:
    s = scaling(cooldown=90, scale_down_delay="1h")
    assert (s.cooldown, s.scale_down_delay, s.metric.stale_after) == (90.0, 3600.0, 120.0)


# -- decide -------------------------------------------------------------------------------------


def test_no_metric_a_stale_one_or_not_a_number_changes_nothing_and_says_why() -> None:
    s = scaling()
    missing = decide(s, 1, 10, 3, Reading(None, problem="lb published nothing"), 0, Memory())
    assert (missing.action, missing.target) == ("none", 3)
    assert missing.reason == "no metric: lb published nothing"
    stale = decide(s, 1, 10, 3, Reading(900.0, age=121), 0, Memory())
    assert stale.action == "none" and stale.reason.startswith("stale metric: 121 s old")


def test_growth_is_bounded_by_max_step_and_max_then_waits_for_the_cooldown() -> None:
    s = scaling()
    first = decide(s, 1, 10, 2, Reading(5000.0), 0, Memory())
    assert (first.action, first.desired, first.target) == ("grow", 10, 5)  # 100 asked, max 10
    assert "clamped to max 10" in first.reason and "step limited to 3" in first.reason
    soon = decide(s, 1, 10, 5, Reading(5000.0), 179, first.memory)
    assert soon.action == "none" and "cooldown: 1 s left" in soon.reason
    later = decide(s, 1, 10, 5, Reading(5000.0), 180, soon.memory)
    assert (later.action, later.target) == ("grow", 8)


def test_shrink_waits_for_the_delay_without_a_break_and_never_goes_below_min() -> None:
    s = scaling()
    m = Memory()
    for t in (0, 120, 240):
        d = decide(s, 2, 10, 6, Reading(10.0), t, m)
        assert d.action == "none" and f"low for {t} of 300 s" in d.reason
        m = d.memory
    blip = decide(s, 2, 10, 6, Reading(300.0), 270, m)  # back to exactly 6 nodes' worth
    assert blip.action == "none" and blip.memory.low_since is None
    m = blip.memory
    for t in (280, 400, 579):
        m = decide(s, 2, 10, 6, Reading(10.0), t, m).memory
    d = decide(s, 2, 10, 6, Reading(10.0), 580, m)
    assert (d.action, d.desired, d.target) == ("shrink", 2, 3)  # min 2, at most 3 per step
    again = decide(s, 2, 10, 3, Reading(10.0), 640, d.memory)
    assert again.action == "none"  # a full delay again after each shrink
    last = decide(s, 2, 10, 3, Reading(10.0), 880, again.memory)
    assert (last.action, last.target) == ("shrink", 2)
    floor = decide(s, 2, 10, 2, Reading(0.0), 2000, last.memory)
    assert floor.action == "none" and "(at min)" in floor.reason


def test_threshold_policy_steps_on_the_metric_per_node() -> None:
    s = scaling(policy={"scale_up_above": 80, "scale_down_below": 20, "step_up": 2})
    up = decide(s, 1, 10, 4, Reading(400.0), 0, Memory())
    assert (up.action, up.target) == ("grow", 6) and "100 per node > 80" in up.reason
    calm = decide(s, 1, 10, 4, Reading(200.0), 0, Memory())
    assert calm.action == "none" and "within 20-80" in calm.reason


# -- replay -----------------------------------------------------------------------------------


def test_a_square_wave_faster_than_the_scale_down_delay_never_flaps() -> None:
    """High 2 min, low 2 min, for 4 hours: the low phases never last the 5 min delay, so the
    group grows to what the peaks need and stays there."""
    decisions = replay(scaling(), 1, 10, 2, square(240, 400, 20), 60)
    assert {d.action for d in decisions} == {"grow", "none"}
    assert direction_changes(decisions) == 0
    assert decisions[-1].target == 8  # 400 / 50


def test_a_slow_square_wave_follows_the_load_with_cooldowns_and_delays() -> None:
    s = scaling()
    decisions = replay(s, 1, 10, 2, square(3600, 400, 20), 60)
    grows = [d.at for d in decisions if d.action == "grow"]
    shrinks = [d for d in decisions if d.action == "shrink"]
    assert all(b - a >= s.cooldown for a, b in itertools.pairwise(grows))
    for d in shrinks:  # low for a full delay first: 30 min into each hour the load drops
        assert d.at % 3600 >= 1800 + s.scale_down_delay
    assert direction_changes(decisions) == 7  # one per load change after the first: no flapping
    assert {d.target for d in decisions} <= set(range(1, 11))
    assert max(d.target for d in decisions) == 8 and decisions[-1].target == 1


def test_trace_errors_name_the_file_and_line(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("seconds,value\n0,1\n60,2\n60,3\n")
    with pytest.raises(SpecError) as caught:
        read_trace(trace)
    assert str(caught.value) == f"{trace}: line 4: time 60 does not increase"
    trace.write_text("0,1\n60,abc\n120,\n")
    assert read_trace(trace) == [(0.0, 1.0), (60.0, None), (120.0, None)]


def test_simulate_prints_decisions_and_draws_one_png(tmp_path: Path) -> None:
    directory = write_appliance(tmp_path, "scaled", SCALED, ("lb.sh", "web.sh"))
    trace = tmp_path / "square.csv"
    trace.write_text("seconds,rps\n" + "".join(f"{t},{v}\n" for t, v in square(3600, 400, 20)))
    png = tmp_path / "out.png"
    r = crv("autoscale", "simulate", str(directory), "--trace", str(trace), "--plot", str(png))
    assert r.exit_code == 0, r.stderr
    assert "7 direction changes" in r.stdout and "1 at the end" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    r = crv("autoscale", "simulate", str(directory), "--trace", str(trace), "--json")
    doc = json.loads(r.stdout)
    assert doc["group"] == "worker" and doc["direction_changes"] == 7
    assert set(doc["decisions"][0]) == {
        "at",
        "metric",
        "current",
        "desired",
        "target",
        "action",
        "reason",
    }


def test_simulate_bad_input_is_exit_2(tmp_path: Path) -> None:
    directory = write_appliance(tmp_path, "scaled", SCALED, ("lb.sh", "web.sh"))
    trace = tmp_path / "t.csv"
    trace.write_text("0,1\nx,2\n")
    r = crv("autoscale", "simulate", str(directory), "--trace", str(trace))
    assert (
        r.exit_code == 2
        and r.stderr.strip() == f"error: {trace}: line 2: 'x' is not a number of seconds"
    )
    trace.write_text("0,1\n")
    r = crv("autoscale", "simulate", str(directory), "--trace", str(trace), "--group", "front")
    assert r.exit_code == 2 and "no scaling section" in r.stderr
    r = crv("autoscale", "simulate", str(directory), "--trace", str(trace), "--every", "soon")
    assert r.exit_code == 2 and "--every" in r.stderr


def test_a_blackboard_metric_aggregates_fresh_numbers_only() -> None:
    from crv.engine.autoscale import from_attribute

    s = scaling(
        metric={"attribute": {"role": "lb", "key": "rps", "aggregate": "sum"}, "stale_after": 60}
    )
    fresh = [{"node": "a", "value": "10", "age": 5}, {"node": "b", "value": "2.5", "age": 30}]
    assert from_attribute(s, fresh) == Reading(12.5, age=30)
    old = [*fresh, {"node": "c", "value": "1000", "age": 61}]  # a node that stopped publishing
    assert from_attribute(s, old).value == 12.5
    none = from_attribute(s, [])
    assert none.value is None and none.problem == "no node of lb published rps"
    stale = from_attribute(s, [{"node": "a", "value": "10", "age": 600}])
    assert stale.value is None and "the newest is 600 s old" in stale.problem
    junk = from_attribute(s, [{"node": "a", "value": "lots", "age": 1}])
    assert junk.value is None and "rps is not a number (a='lots')" in junk.problem


# -- the pools' room and the HTTP metric ---------------------------------------------------------


def test_growth_is_limited_to_the_pools_room_or_becomes_no_capacity() -> None:
    from crv.engine.autoscale import within_room

    s = scaling()
    before = Memory(last_scale_up=-1000.0)  # the last growth is long past: no cooldown now
    grow = decide(s, 1, 10, 2, Reading(250.0), 0, before)
    assert (grow.action, grow.current, grow.target) == ("grow", 2, 5)
    assert grow.memory.last_scale_up == 0  # a growth starts the cooldown

    full = within_room(grow, {"rack": 0, "ec2": 0}, before)
    assert (full.action, full.target, full.desired) == ("none", 2, 5)
    assert (
        "no capacity in pools rack, ec2" in full.reason and "(room: rack 0, ec2 0)" in full.reason
    )
    assert full.reason.startswith(grow.reason)
    assert full.memory == before  # no cooldown for a growth that did not happen
    retry = decide(s, 1, 10, 2, Reading(250.0), 10, full.memory)
    assert retry.action == "grow"  # the next run tries again at once

    some = within_room(grow, {"rack": 1, "vm": 0, "ec2": 1}, before)
    assert (some.action, some.target) == ("grow", 4)
    assert some.reason == f"{grow.reason}; room for 2 more only (rack 1, vm 0, ec2 1)"
    assert some.memory == grow.memory  # it did grow: the cooldown starts
    # enough room, or a pool with no known limit: the decision as it was
    assert within_room(grow, {"rack": 2, "ec2": 1}, before) == grow
    assert within_room(grow, {"rack": 0, "ec2": None}, before) == grow

    shrink = replace(grow, action="shrink", current=5, target=3)
    calm = replace(grow, action="none", target=2)
    for d in (shrink, calm):
        assert within_room(d, {"rack": 0}, before) == d


@pytest.mark.parametrize(
    ("body", "value"),
    [("12.5", 12.5), (" 7\n", 7.0), ("3e2", 300.0), ('"8"', 8.0), ("1E1", 10.0),
     ('{"value": 42}', 42.0), ('{"value": "0.5", "unit": "rps"}', 0.5), ('{"value": 0}', 0.0)],
)  # fmt: skip
def test_an_http_metric_is_a_number_as_text_or_json(body: str, value: float) -> None:
    from crv.engine.autoscale import from_http_body

    assert from_http_body("http://m/x", 200, body) == Reading(value)


@pytest.mark.parametrize(
    "body",
    ["lots", "", "NaN", "nan", "inf", "-Infinity", "true", "false", "null", "[1]",
     '{"value": true}', '{"value": null}', '{"value": NaN}', '{"value": Infinity}',
     '{"rps": 12}', '{"value": [1]}', '{"value": "many"}'],
)  # fmt: skip
def test_an_http_metric_that_is_not_a_finite_number_is_no_metric(body: str) -> None:
    from crv.engine.autoscale import from_http_body

    url = "http://127.0.0.1:9/metric"
    got = from_http_body(url, 200, body)
    assert got.value is None
    assert got.problem == f"{url} did not answer a number ({body.strip()[:40]!r})"
    d = decide(scaling(), 1, 10, 3, got, 0, Memory())
    assert (d.action, d.target) == ("none", 3)
    assert d.reason == f"no metric: {got.problem}"


def test_an_http_metric_answered_with_an_error_status_is_no_metric() -> None:
    from crv.engine.autoscale import from_http_body

    for status in (500, 404, 204, 301):
        got = from_http_body("http://m/rps", status, "12")  # a number, but not a 200 answer
        assert got == Reading(None, problem=f"http://m/rps answered HTTP {status}")
        d = decide(scaling(), 1, 10, 3, got, 0, Memory(last_scale_up=-1000.0))
        assert d.action == "none" and d.reason.startswith("no metric: ")
        assert f"HTTP {status}" in d.reason and d.memory == Memory(last_scale_up=-1000.0)


def test_no_growth_while_nodes_of_the_group_are_quarantined() -> None:
    """F6: a growth would make nodes from what just failed; held, without a cooldown."""
    from crv.engine.autoscale import held_by_quarantine

    s = scaling()
    grow = decide(s, 1, 10, 2, Reading(900.0, 0.0), 1000.0, Memory())
    assert grow.action == "grow"
    held = held_by_quarantine(grow, ["c-web-2", "c-web-3"], Memory())
    assert (held.action, held.target, held.memory) == ("none", 2, Memory())
    assert held.reason.endswith(
        "; held: 2 quarantined (c-web-2, c-web-3): no growth until a deploy or `crv repair` "
        "makes them again"
    )
    assert held_by_quarantine(grow, [], Memory()) == grow
    shrink = decide(s, 1, 10, 5, Reading(0.0, 0.0), 1000.0, Memory(low_since=0.0))
    assert held_by_quarantine(shrink, ["c-web-2"], Memory()) == shrink  # shrinking is not held


# -- no flapping (FAULTS F13) ------------------------------------------------------------------


def webfarm_scaling(**change: object) -> tuple[Scaling, int, int]:
    """The web farm's own policy (appliances/webfarm), its bounds, with `change` to its policy."""
    from crv.appliance.loader import load_appliance
    from tests.conftest import CATALOG

    group = load_appliance(CATALOG / "webfarm").groups["worker"]
    s = group.scaling
    assert s is not None and s.policy is not None
    if change:
        s = s.model_copy(update={"policy": s.policy.model_copy(update=change)})
    return s, group.scale_min, group.scale_max


def around(low: float, high: float, low_for: int, high_for: int, hours: float = 2) -> list:
    """A reading every 30 s: `low` for `low_for` seconds, then `high` for `high_for`, again."""
    period = low_for + high_for
    return [
        (float(t), low if t % period < low_for else high) for t in range(0, int(hours * 3600), 30)
    ]


def test_a_load_around_a_threshold_is_inside_the_tolerance_band() -> None:
    """59-61 requests/s around 60 (3 web nodes' worth at 20 each), 6 min under, 2 min over: the
    web farm's policy keeps its 4 nodes (3 would run at 98 % of target). Without the band it
    shrinks 4->3 after the 5 min delay and grows back as soon as its cooldown allows: one flap
    per period."""
    s, low, high = webfarm_scaling()
    trace = around(59, 61, 360, 120)
    kept = replay(s, low, high, 4, trace, 30)
    assert {d.action for d in kept} == {"none"}, [d.reason for d in kept if d.action != "none"]
    assert any("4 within the 10% tolerance" in d.reason for d in kept)
    bare, low, high = webfarm_scaling(tolerance=0)
    flaps = replay(bare, low, high, 4, trace, 30)
    acts = [(d.at, d.action, d.target) for d in flaps if d.action != "none"]
    assert acts[:2] == [(300.0, "shrink", 3), (420.0, "grow", 4)], acts
    assert direction_changes(flaps) >= 10


def test_at_most_one_scale_action_per_cooldown_window_either_way() -> None:
    """FAULTS F13: a load swinging well past the band both ways, faster than the cooldown:
    every two actions, grow or shrink in any order, are a full cooldown apart; a shrink holds
    the growth that follows it back too."""
    s, low, high = webfarm_scaling()
    trace = around(30, 90, 330, 90, hours=4)  # 2 nodes' worth, then 5 nodes' worth
    decisions = replay(s, low, high, 4, trace, 30)
    acts = [d for d in decisions if d.action != "none"]
    assert {d.action for d in acts} == {"grow", "shrink"}
    assert all(b.at - a.at >= s.cooldown for a, b in itertools.pairwise(acts)), [
        (d.at, d.action) for d in acts
    ]
    held = [d for d in decisions if d.action == "none" and "cooldown" in d.reason]
    assert any(d.desired > d.current for d in held)  # a growth waited for a shrink's cooldown


def test_real_growth_is_served_at_once() -> None:
    """The band delays no growth: past the target the group grows on the next tick."""
    s, low, high = webfarm_scaling()
    trace = [(float(t), 59.0 if t < 600 else 120.0) for t in range(0, 900, 30)]
    decisions = replay(s, low, high, 4, trace, 30)
    first = next(d for d in decisions if d.action != "none")
    assert (first.at, first.action, first.target) == (600.0, "grow", 6)


def test_plot_draws_the_queue_across_skipped_runs_and_nodes_from_their_first_count() -> None:
    """The live slurm run's rows: a grow 1 -> 3 that read 11 waiting jobs, runs skipped while it
    ran (no reading), then readings again. The metric line goes through both readings (a lone
    first point between gaps would not be drawn) and the nodes start at 1, not at the target."""
    from crv.engine.autoscale import curves, recorded

    def row(at: float, metric: float | None, current: int, target: int, action: str) -> dict:
        return {"at": 1000.0 + at, "metric": metric, "current": current, "desired": target,
                "target": target, "action": action, "reason": ""}  # fmt: skip

    rows = [
        row(0, 11, 1, 3, "grow"),
        row(20, None, 3, 3, "none"),  # skipped: the grow is under way
        row(40, None, 3, 3, "none"),
        row(120, 7, 3, 3, "none"),
        row(480, 0, 3, 1, "shrink"),
    ]
    metric, nodes = curves(recorded(reversed(rows)))  # the store lists the newest first
    assert metric == [(0.0, 11), (2.0, 7), (8.0, 0)]
    assert nodes == [(0.0, 1), (0.0, 3), (20 / 60, 3), (40 / 60, 3), (2.0, 3), (8.0, 1)]
    assert curves([]) == ([], [])
