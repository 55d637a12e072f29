"""Autoscaling by a batch queue: `decide_queue` (state in, decision out), `from_queue` and
`node_class`, the job-trace replay (crv/engine/jobsim.py) and `crv autoscale simulate --jobs`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crv.appliance.spec import Scaling
from crv.base.errors import SpecError
from crv.engine.autoscale import Memory, QueueReading, decide_queue, from_queue, node_class
from crv.engine.jobsim import MAX_TICKS, Job, Replay, read_jobs, simulate
from tests.conftest import crv, write_appliance

REPO = Path(__file__).resolve().parent.parent
TWELVE = REPO / "docs/autoscale/jobs-12x1min.csv"
BURSTS = REPO / "docs/autoscale/jobs-bursts-4h.csv"

BATCH = """\
apiVersion: crv/v1
name: batch
nodes:
  ctl: {count: 1, roles: [queue]}
  compute:
    count: 1
    roles: [work]
    scale: {min: 1, max: 3}
    scaling:
      queue: {role: queue}
      cooldown: 60s
      scale_down_delay: 120s
      max_step: 2
roles:
  queue: {recipe: queue.sh, publishes: [pending_nodes, pending, running, node_states]}
  work: {recipe: work.sh}
"""
METRIC = """\
apiVersion: crv/v1
name: farm
nodes:
  front: {count: 1, roles: [lb]}
  worker:
    count: 1
    roles: [web]
    scale: {min: 1, max: 5}
    scaling:
      metric: {attribute: {role: lb, key: rps}}
      policy: {target_per_node: 50}
roles:
  lb: {recipe: lb.sh, depends_on: [web], publishes: [rps]}
  web: {recipe: web.sh}
"""


def queue_scaling(**change: object) -> Scaling:
    doc: dict[str, object] = {
        "queue": {"role": "slurmctld", "jobs_per_node": 1, "stale_after": "2m"},
        "cooldown": "60s",
        "scale_down_delay": "120s",
        "max_step": 10,
    }
    doc.update(change)
    return Scaling.model_validate(doc)


def q(
    pending_nodes: int | None, states: dict[str, str], pending: int | None = None
) -> QueueReading:
    running = sum(1 for s in states.values() if node_class(s) == "busy")
    return QueueReading(
        pending_nodes, (pending_nodes or 0) if pending is None else pending, running, states
    )


LONG_AGO = Memory(last_scale_up=-10_000.0, low_since=-10_000.0, last_action=-10_000.0)

# -- decide_queue -----------------------------------------------------------------------------


def test_the_group_grows_by_the_nodes_its_waiting_jobs_ask_for() -> None:
    s = queue_scaling()
    states = {"c-1": "allocated", "c-2": "mixed"}
    d = decide_queue(s, 1, 10, ["c-2", "c-1"], q(3, states, pending=2), 100.0, Memory())
    assert (d.action, d.current, d.desired, d.target) == ("grow", 2, 5, 5)
    assert d.reason == "2 jobs waiting for 3 nodes, 2 of 2 nodes busy: 5"
    assert d.remove == () and d.memory == Memory(100.0, None, 100.0)
    # idle nodes are not busy: they do not count on top of the waiting jobs
    states = {"c-1": "allocated", "c-2": "idle"}
    d = decide_queue(s, 1, 10, ["c-2", "c-1"], q(3, states), 100.0, Memory())
    assert (d.action, d.desired, d.target) == ("grow", 4, 4)


def test_jobs_per_node_packs_that_many_waiting_jobs_on_a_node() -> None:
    s = queue_scaling(queue={"role": "slurmctld", "jobs_per_node": 4})
    d = decide_queue(s, 1, 10, ["c-1"], q(9, {"c-1": "allocated"}), 0.0, Memory())
    assert (d.action, d.desired, d.target) == ("grow", 4, 4)  # 1 busy + ceil(9 / 4)
    assert "9 nodes / 4 per node, 1 of 1 nodes busy: 4" in d.reason
    d = decide_queue(s, 1, 10, ["c-1"], q(4, {"c-1": "allocated"}), 0.0, Memory())
    assert d.target == 2


def test_growth_is_clamped_to_max_and_to_max_step() -> None:
    s = queue_scaling(max_step=2)
    d = decide_queue(s, 1, 4, ["c-1"], q(20, {"c-1": "allocated"}), 0.0, Memory())
    assert (d.action, d.desired, d.target) == ("grow", 4, 3)
    assert "(clamped to max 4)" in d.reason and "step limited to 2" in d.reason
    nodes = ["c-4", "c-3", "c-2", "c-1"]
    d = decide_queue(s, 1, 4, nodes, q(20, dict.fromkeys(nodes, "allocated")), 0.0, Memory())
    assert (d.action, d.target) == ("none", 4) and "(at max)" in d.reason


@pytest.mark.parametrize(
    "busy", ["mixed", "allocated", "completing", "idle+completing", "mixed*", "draining"]
)
def test_a_node_that_runs_a_job_is_never_a_victim_even_first_in_the_order(busy: str) -> None:
    s = queue_scaling()
    nodes = ["c-4", "c-3", "c-2", "c-1"]  # newest first: c-4 would go first
    states = {"c-4": busy, "c-3": "idle", "c-2": "allocated", "c-1": "idle"}
    d = decide_queue(s, 1, 4, nodes, q(0, states), 500.0, LONG_AGO)
    assert d.action == "shrink" and d.desired == 2
    assert d.remove == ("c-3", "c-1") and d.target == 2
    assert "removing c-3, c-1" in d.reason


def test_a_shrink_takes_fewer_victims_when_too_few_run_no_job() -> None:
    s = queue_scaling()
    nodes = ["c-4", "c-3", "c-2", "c-1"]
    states = {"c-4": "allocated", "c-3": "mixed", "c-2": "idle", "c-1": "allocated"}
    # max lowered below the busy nodes: the group wants 2 but only c-2 runs no job
    d = decide_queue(s, 1, 2, nodes, q(0, states), 500.0, LONG_AGO)
    assert (d.action, d.desired, d.target, d.remove) == ("shrink", 2, 3, ("c-2",))
    assert "only 1 run no job" in d.reason
    states["c-2"] = "allocated"
    d = decide_queue(s, 1, 2, nodes, q(0, states), 500.0, LONG_AGO)
    assert (d.action, d.target, d.remove) == ("none", 4, ())
    assert d.reason.endswith("every node runs jobs")


def test_a_shrink_waits_for_the_delay_and_for_the_cooldown_of_any_action() -> None:
    s = queue_scaling()  # cooldown 60 s, scale_down_delay 120 s
    nodes = ["c-2", "c-1"]
    idle = q(0, {"c-2": "idle", "c-1": "allocated"})
    memory = Memory()
    for now in (0.0, 60.0, 119.0):
        d = decide_queue(s, 1, 3, nodes, idle, now, memory)
        assert d.action == "none" and f"low for {now:.0f} of 120 s" in d.reason
        memory = d.memory
    d = decide_queue(s, 1, 3, nodes, idle, 120.0, memory)
    assert (d.action, d.target, d.remove) == ("shrink", 1, ("c-2",))
    assert d.memory == Memory(None, 120.0, 120.0)
    # a queue that fills up again in between starts the delay again
    memory = decide_queue(s, 1, 3, nodes, idle, 0.0, Memory()).memory
    memory = decide_queue(s, 1, 3, nodes, q(1, {"c-2": "idle", "c-1": "allocated"}), 60.0,
                          memory).memory  # fmt: skip
    assert memory.low_since is None
    d = decide_queue(s, 1, 3, nodes, idle, 130.0, memory)
    assert d.action == "none" and "low for 0 of 120 s" in d.reason
    # low for long enough, but 30 s after the last action (a growth or a shrink): cooldown
    for last in (Memory(90.0, -500.0, 90.0), Memory(None, -500.0, 90.0)):
        d = decide_queue(s, 1, 3, nodes, idle, 120.0, last)
        assert d.action == "none" and d.reason.endswith("cooldown: 30 s left")
    # and a growth right after a shrink waits too
    d = decide_queue(
        s, 1, 3, ["c-1"], q(2, {"c-1": "allocated"}), 130.0, Memory(None, 120.0, 120.0)
    )
    assert d.action == "none" and d.reason.endswith("cooldown: 50 s left")


def test_a_stale_missing_or_malformed_queue_changes_nothing_and_says_why() -> None:
    s = queue_scaling()

    def readings(**values: tuple[object, float]) -> dict[str, list[dict[str, object]]]:
        base: dict[str, tuple[object, float]] = {
            "pending_nodes": ("2", 5.0),
            "pending": ("2", 5.0),
            "running": ("1", 5.0),
            "node_states": ("c-1=allocated", 5.0),
        }
        base.update(values)
        return {k: [{"node": "ctl-0", "value": v, "age": a}] for k, (v, a) in base.items()}

    assert from_queue(s, readings()).pending_nodes == 2
    cases = {
        "stale: pending is 121 s old (stale after 120 s)": readings(pending=("2", 121.0)),
        "no node of slurmctld published running": {
            k: v for k, v in readings().items() if k != "running"
        },
        "pending_nodes is not a count ('abc')": readings(pending_nodes=("abc", 1.0)),
        "running is not a count ('-1')": readings(running=("-1", 1.0)),
        "pending is not a count ('1.5')": readings(pending=("1.5", 1.0)),
    }
    memory = Memory(50.0, None, 50.0)
    for reason, given in cases.items():
        reading = from_queue(s, given)
        assert reading.pending_nodes is None and reading.problem == reason
        d = decide_queue(s, 1, 3, ["c-1"], reading, 1000.0, memory)
        assert (d.action, d.target, d.desired, d.remove) == ("none", 1, 1, ())
        assert d.reason == f"no queue: {reason}" and d.memory == memory and d.metric is None


def test_from_queue_takes_the_newest_reading_and_parses_the_node_states() -> None:
    s = queue_scaling()
    readings: dict[str, list[dict[str, object]]] = {
        "pending_nodes": [
            {"node": "ctl-0", "value": "7", "age": 90.0},
            {"node": "ctl-1", "value": "3", "age": 4.0},
            {"node": "ctl-2", "value": "9", "age": None},
        ],
        "pending": [{"node": "ctl-1", "value": "2", "age": 4.0}],
        "running": [{"node": "ctl-1", "value": "0", "age": 6.0}],
        "node_states": [
            {"node": "ctl-1", "value": "c-1=idle c-2=mixed junk =x c-3=allocated+ c-4=", "age": 4.0}
        ],
    }
    r = from_queue(s, readings)
    assert (r.pending_nodes, r.pending, r.running, r.age, r.problem) == (3, 2, 0, 6.0, "")
    assert dict(r.states) == {"c-1": "idle", "c-2": "mixed", "c-3": "allocated+", "c-4": ""}


@pytest.mark.parametrize(
    ("state", "cls"),
    [
        ("allocated", "busy"), ("mixed", "busy"), ("completing", "busy"), ("draining", "busy"),
        ("MIXED*", "busy"), ("idle+completing", "busy"), ("planned", "busy"), ("idle", "idle"),
        ("idle~", "idle"), ("IDLE#", "idle"), ("idle+drain", "other"), ("drained", "other"),
        ("down*", "other"), ("unknown", "other"), ("", "other"), (None, "other"),
    ],
)  # fmt: skip
def test_node_class(state: str | None, cls: str) -> None:
    assert node_class(state) == cls


# -- the replay -------------------------------------------------------------------------------

SLURM = queue_scaling(max_step=2)  # issue 23's values: cooldown 60 s, delay 120 s, step 2


def no_job_overlaps_on_a_node(r: Replay, boot: float, per: int = 1) -> None:
    """Each node runs at most `per` jobs at once, only once it booted, never once removed."""
    born: dict[str, float] = {}
    gone: dict[str, float] = {}
    serial = r.decisions[0].current  # the nodes at the start: booted at 0
    for n in range(1, serial + 1):
        born[f"c-compute-{n}"] = -boot
    for d in r.decisions:
        for _ in range(d.target - d.current if d.action == "grow" else 0):
            serial += 1
            born[f"c-compute-{serial}"] = d.at
        for node in d.remove:
            gone[node] = d.at
    spans: dict[str, list[tuple[float, float]]] = {}
    for run in r.jobs:
        assert run.start is not None and run.end is not None and len(run.on) == run.job.nodes
        for node in run.on:
            spans.setdefault(node, []).append((run.start, run.end))
    for node, times in spans.items():
        for at, _ in times:
            assert sum(1 for s, e in times if s <= at < e) <= per, node
        assert min(s for s, _ in times) >= born[node] + boot, node
        assert max(e for _, e in times) <= gone.get(node, float("inf")), node


def test_twelve_one_minute_jobs_grow_the_group_to_three_and_back_to_one() -> None:
    r = simulate(SLURM, 1, 3, 1, read_jobs(TWELVE), every=15, boot=90)
    acts = [
        (d.at, d.action, d.current, d.target, d.remove) for d in r.decisions if d.action != "none"
    ]
    assert acts == [
        (0.0, "grow", 1, 3, ()),
        (390.0, "shrink", 3, 1, ("c-compute-3", "c-compute-2")),
    ]
    assert sorted(run.id for run in r.jobs) == list(range(1, 13))
    assert all(run.start is not None and len(run.on) == 1 for run in r.jobs)
    assert [run.start for run in r.jobs] == [0, 60, 90, 90, 120, 150, 150, 180, 210, 210, 240, 270]
    # free nodes are taken oldest first
    assert [int(run.on[0][-1]) for run in r.jobs] == [1, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]
    no_job_overlaps_on_a_node(r, boot=90)
    f = r.figures
    assert (f.until, f.minimum) == (330.0, 0.2)
    assert f.node_hours == pytest.approx(3 * 330 / 3600)
    assert f.ratio == pytest.approx(990 / 720) and f.reaction == 90.0
    assert f.mean_wait == pytest.approx(1770 / 12) and f.max_wait == 270.0
    assert (f.actions, f.direction_changes, f.peak_nodes, f.final_nodes) == (2, 1, 3, 1)
    # the timeline: 2 nodes booting from 0 to 90, every job ends, the group back at 1
    assert (r.timeline[0].nodes, r.timeline[0].booting, r.timeline[0].pending) == (3, 2, 11)
    assert next(p.at for p in r.timeline if p.booting == 0) == 90.0
    assert (r.timeline[-1].nodes, r.timeline[-1].pending, r.timeline[-1].running) == (1, 0, 0)


def test_figures_on_a_hand_checked_trace() -> None:
    s = queue_scaling(cooldown=0, scale_down_delay=0)
    # t=0: job 1 on c-1, job 2 waits: grow to 2 (c-2 boots until 20); t=20: job 2 on c-2 until
    # 70; t=70: c-2 idle: shrink (no delay); t=100: job 1 ends
    r = simulate(s, 1, 2, 1, [Job(0, 1, 100), Job(0, 1, 50)], every=10, boot=20)
    acts = [(d.at, d.action, d.target, d.remove) for d in r.decisions if d.action != "none"]
    assert acts == [(0.0, "grow", 2, ()), (70.0, "shrink", 1, ("c-compute-2",))]
    assert [(run.start, run.on) for run in r.jobs] == [(0.0, ("c-compute-1",)),
                                                      (20.0, ("c-compute-2",))]  # fmt: skip
    f = r.figures
    assert f.node_hours == pytest.approx((2 * 70 + 1 * 30) / 3600)  # until job 1 ends at 100
    assert f.minimum == pytest.approx(150 / 3600) and f.ratio == pytest.approx(170 / 150)
    assert (f.mean_wait, f.max_wait, f.reaction, f.until) == (10.0, 20.0, 20.0, 100.0)
    assert (f.actions, f.grow, f.shrink, f.never_started, f.jobs) == (2, 1, 1, 0, 2)
    assert [(p.at, p.nodes, p.booting, p.pending, p.running) for p in r.timeline] == [
        (0.0, 2, 1, 1, 1), (20.0, 2, 0, 0, 2), (70.0, 1, 0, 0, 1), (100.0, 1, 0, 0, 0),
    ]  # fmt: skip


def test_first_fit_a_job_that_does_not_fit_does_not_block_a_smaller_one() -> None:
    s = queue_scaling()
    jobs = [Job(0, 1, 100), Job(10, 2, 50), Job(20, 1, 30)]
    r = simulate(s, 2, 2, 2, jobs, every=60, boot=0)
    assert [run.start for run in r.jobs] == [0.0, 100.0, 20.0]
    assert r.jobs[1].on == ("c-compute-1", "c-compute-2") and r.figures.actions == 0
    assert r.figures.node_hours == pytest.approx(2 * 150 / 3600)


def test_a_job_bigger_than_max_is_reported_never_started() -> None:
    r = simulate(SLURM, 1, 3, 1, [Job(0, 4, 60), Job(0, 1, 60), Job(30, 1, 60)], every=15, boot=90)
    f = r.figures
    assert [run.start for run in r.jobs] == [None, 0.0, 60.0]
    assert (f.never_started, f.jobs, f.final_nodes, f.peak_nodes) == (1, 3, 3, 3)
    assert f.minimum == pytest.approx(120 / 3600)  # the jobs that ran
    # it waits for the 4 nodes it asks for: the group grows to max and stays there
    assert r.decisions[-1].reason.startswith("1 jobs waiting for 4 nodes")


def test_jobs_per_node_shares_a_node_and_a_mixed_node_is_kept() -> None:
    s = queue_scaling(queue={"role": "slurmctld", "jobs_per_node": 2}, cooldown=0,
                      scale_down_delay=0)  # fmt: skip
    jobs = [Job(0, 1, 60), Job(0, 1, 60), Job(0, 1, 300)]
    r = simulate(s, 1, 2, 1, jobs, every=10, boot=10)
    assert [(run.start, run.on) for run in r.jobs] == [
        (0.0, ("c-compute-1",)), (0.0, ("c-compute-1",)), (10.0, ("c-compute-2",)),
    ]  # fmt: skip
    shrinks = [d for d in r.decisions if d.action == "shrink"]
    # c-2 runs its one job (mixed) until 310: c-1 goes at 60, c-2 stays
    assert [(d.at, d.remove) for d in shrinks] == [(60.0, ("c-compute-1",))]
    assert r.figures.minimum == pytest.approx(420 / 2 / 3600)


def test_the_burst_trace_runs_every_job_once_and_ends_at_min() -> None:
    r = simulate(SLURM, 1, 3, 1, read_jobs(BURSTS), every=15, boot=90)
    f = r.figures
    assert f.jobs == 35 and f.never_started == 0 and f.final_nodes == 1 and f.peak_nodes == 3
    no_job_overlaps_on_a_node(r, boot=90)
    assert 1 < f.ratio < 3 and f.node_hours > f.minimum  # type: ignore[operator]


def test_a_replay_that_would_take_too_many_decisions_is_refused() -> None:
    with pytest.raises(ValueError, match=f"more than {MAX_TICKS} decisions"):
        simulate(SLURM, 1, 3, 1, [Job(MAX_TICKS * 2, 1, 60)], every=1, boot=0)


def test_job_trace_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "jobs.csv"
    path.write_text("# a comment\nsubmit,nodes,runtime\n\n0,1,60\n30, 2 ,90.5\n30,1,1\n")
    assert read_jobs(path) == [Job(0, 1, 60), Job(30, 2, 90.5), Job(30, 1, 1)]
    cases = {
        "0,1,60\n10,1\n": "line 2: expected SUBMIT,NODES,RUNTIME (got 2 fields)",
        "0,1,60\nsubmit,1,60\n": "line 2: submit 'submit' is not a number",
        "10,1,60\n5,1,60\n": "line 2: submit 5 is before the previous 10",
        "-5,1,60\n": "line 1: submit -5 is not within 0-31622400 s",
        "0,0,60\n": "line 1: nodes '0' is not a count of 1-20000",
        "0,1.5,60\n": "line 1: nodes '1.5' is not a count of 1-20000",
        "0,1,0\n": "line 1: runtime '0' is not a number of seconds in (0, 31622400]",
        "0,1,nan\n": "line 1: runtime 'nan' is not a number of seconds in (0, 31622400]",
        "submit,nodes,runtime\n# nothing\n": "no jobs (expected SUBMIT,NODES,RUNTIME rows)",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(SpecError) as caught:
            read_jobs(path)
        assert str(caught.value) == f"{path}: {message}"
    with pytest.raises(SpecError, match="No such file"):
        read_jobs(tmp_path / "missing.csv")


# -- the command ------------------------------------------------------------------------------


def test_simulate_jobs_prints_the_figures_and_the_actions(tmp_path: Path) -> None:
    directory = write_appliance(tmp_path, "batch", BATCH, ("queue.sh", "work.sh"))
    r = crv("autoscale", "simulate", str(directory), "--jobs", str(TWELVE), "--every", "15s",
            "--boot", "90s")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "0:00:00 1->3 3 grow 11 jobs waiting for 11 nodes" in out
    assert "0:06:30 3->1 1 shrink" in out and "removing batch-compute-3, batch-compute-2" in out
    assert "node-hours 0.28" in out and "minimum 0.20" in out and ": 1.38x" in out
    assert "wait mean 148 s, max 270 s" in out
    assert "first pending job to the first job on a new node: 90 s" in out
    assert "2 scale actions (1 grow, 1 shrink, 1 direction changes)" in out
    # the default boot is 60 s; --max changes the bound
    r = crv("autoscale", "simulate", str(directory), "--jobs", str(TWELVE), "--every", "15s",
            "--max", "2")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "boot 60 s" in r.stdout and "1->2" in r.stdout and "nodes up to 2" in r.stdout


def test_simulate_jobs_json_and_plot(tmp_path: Path) -> None:
    directory = write_appliance(tmp_path, "batch", BATCH, ("queue.sh", "work.sh"))
    png = tmp_path / "jobs.png"
    r = crv("autoscale", "simulate", str(directory), "--jobs", str(TWELVE), "--every", "15s",
            "--boot", "90s", "--json", "--plot", str(png))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"group", "every", "boot", "figures", "decisions", "jobs"}
    assert (doc["group"], doc["every"], doc["boot"]) == ("compute", 15.0, 90.0)
    assert doc["figures"]["actions"] == 2 and doc["figures"]["ratio"] == pytest.approx(1.375)
    assert set(doc["figures"]) >= {"node_hours", "minimum", "ratio", "mean_wait", "max_wait",
                                   "actions", "direction_changes", "never_started", "reaction"}  # fmt: skip
    assert len(doc["decisions"]) == 28  # a tick every 15 s from 0:00 to 6:45
    shrink = next(d for d in doc["decisions"] if d["action"] == "shrink")
    assert shrink["remove"] == ["batch-compute-3", "batch-compute-2"]
    assert set(shrink) == {"at", "metric", "current", "desired", "target", "action", "reason",
                           "remove"}  # fmt: skip
    assert doc["jobs"][0] == {"id": 1, "submit": 0.0, "nodes": 1, "runtime": 60.0, "start": 0.0,
                              "end": 60.0, "wait": 0.0, "on": ["batch-compute-1"]}  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_simulate_jobs_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    batch = write_appliance(tmp_path, "batch", BATCH, ("queue.sh", "work.sh"))
    farm = write_appliance(tmp_path, "farm", METRIC, ("lb.sh", "web.sh"))
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("0,1,60\n0,x,60\n")
    metric = tmp_path / "metric.csv"
    metric.write_text("0,1\n")
    both = "error: crv autoscale simulate: give exactly one of --trace FILE.csv (a metric trace) "
    both += "or --jobs FILE.csv (a job trace)"
    cases = [
        ([str(batch)], both),
        ([str(batch), "--jobs", str(jobs), "--trace", str(metric)], both),
        ([str(batch), "--jobs", str(jobs)],
         f"error: {jobs}: line 2: nodes 'x' is not a count of 1-20000"),
        ([str(farm), "--jobs", str(jobs)],
         f"error: --jobs: {jobs}: group worker is scaled by a metric: replay a metric trace with "
         "--trace FILE.csv"),
        ([str(batch), "--trace", str(metric)],
         f"error: --trace: {metric}: group compute is scaled by a queue: replay a job trace with "
         "--jobs FILE.csv"),
        ([str(farm), "--trace", str(metric), "--boot", "90s"],
         "error: --boot: 90s: only with --jobs FILE.csv"),
        ([str(batch), "--jobs", str(TWELVE), "--boot", "soon"], "error: --boot: soon: "),
        ([str(batch), "--jobs", str(TWELVE), "--max", "0"],
         "error: --max: 0: must be between the group's scale.min 1 and 20000"),
        ([str(batch), "--jobs", str(TWELVE), "--plot", str(tmp_path / "no" / "x.png")],
         f"error: --plot: {tmp_path / 'no' / 'x.png'}: "),
    ]  # fmt: skip
    for args, message in cases:
        r = crv("autoscale", "simulate", *args)
        assert r.exit_code == 2, (args, r.stdout)
        assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    far = tmp_path / "far.csv"
    far.write_text(f"{MAX_TICKS * 2},1,60\n")
    r = crv("autoscale", "simulate", str(batch), "--jobs", str(far), "--every", "1s")
    assert r.exit_code == 2 and r.stderr.startswith("error: --every: 1 s: the replay would take")
