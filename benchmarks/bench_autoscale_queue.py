"""Queue-driven autoscaling, replayed: the slurm appliance's `compute` policy (its `scaling:
{queue: ...}`) on job traces, through crv.engine.jobsim (the simulator behind `crv autoscale
simulate --jobs`). The live half of issue 23's figure is the end-to-end test in real guests.

For each trace (docs/autoscale/jobs-12x1min.csv: 12 one-minute jobs at once, the end-to-end
case; docs/autoscale/jobs-bursts-4h.csv: 3.7 hours of bursts with multi-node jobs), with the
group at 1-3 nodes starting from 1, the schedule every 15 s and nodes booting for 90 s, it
prints:

- node-hours used (nodes in the group, booting ones included, until the last job ended), the
  minimum the trace needed (sum of nodes x runtime) and their ratio;
- mean and max wait, scale actions (and direction changes);
- from the first pending job to the first job running on a new node (seconds, simulated).

`--live` also runs the issue's case in real guests (tests/test_vm_slurm_autoscale.py
`test_twelve_one_minute_jobs_grow_to_3_and_back_to_1`: the lab's PXE rack of 2 machines and lab
guests, 12 one-minute jobs, 1-3 compute nodes, autoscale every 20 s), prints the same figures
from that run (job times from slurmctld's completion log, node counts from `crv status`) next to
the replay of the same trace with the live schedule and the live grow time as the boot, and
keeps the run's plot. Needs root and what the lab needs (says why and skips otherwise); about
13 minutes of TCG guests on an idle 2-core host.

    python -m benchmarks.bench_autoscale_queue [--every 15] [--boot 90] [--max 3] [--smoke]
    python -m benchmarks.bench_autoscale_queue --live [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crv.appliance.spec import Scaling
from crv.engine.jobsim import Job, Replay, read_jobs, simulate

REPO = Path(__file__).resolve().parent.parent
TRACES = [REPO / "docs/autoscale/jobs-12x1min.csv", REPO / "docs/autoscale/jobs-bursts-4h.csv"]
# issue 23's values, while appliances/slurm has no `scaling` on its compute group
FALLBACK = {
    "queue": {"role": "slurmctld", "jobs_per_node": 1},
    "cooldown": "60s",
    "scale_down_delay": "120s",
    "max_step": 2,
}
SMOKE = [Job(0.0, 1, 60.0)] * 4 + [Job(30.0, 2, 60.0)]


def slurm_policy() -> tuple[Scaling, int, str]:
    """The compute group's scaling and scale.min, and where they came from."""
    from crv.appliance.loader import load_appliance

    group = load_appliance(REPO / "appliances" / "slurm").groups["compute"]
    if group.scaling is not None and group.scaling.queue is not None:
        return group.scaling, group.scale_min, "appliances/slurm (compute)"
    return Scaling.model_validate(FALLBACK), 1, "issue 23's values (appliances/slurm has none)"


def describe(s: Scaling) -> str:
    assert s.queue is not None
    return (
        f"queue of {s.queue.role}, {s.queue.jobs_per_node} job per node, cooldown "
        f"{s.cooldown:g} s, scale_down_delay {s.scale_down_delay:g} s, max_step {s.max_step}"
    )


def replay(
    scaling: Scaling, low: int, high: int, jobs: list[Job], every: float, boot: float
) -> tuple[Replay, float]:
    """The replay and the median wall time of 5 (seconds)."""
    times, result = [], None
    for _ in range(5):
        started = time.perf_counter()
        result = simulate(scaling, low, high, 1, jobs, every, boot, name="slurm-compute")
        times.append(time.perf_counter() - started)
    assert result is not None
    return result, statistics.median(times)


def report(name: str, r: Replay, wall: float) -> None:
    f = r.figures
    ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
    reaction = "-" if f.reaction is None else f"{f.reaction:.0f} s"
    mean = "-" if f.mean_wait is None else f"{f.mean_wait:.0f} s"
    most = "-" if f.max_wait is None else f"{f.max_wait:.0f} s"
    print(f"  {name}: {f.jobs} jobs, replayed in {wall * 1000:.1f} ms")
    print(f"    node-hours {f.node_hours:.2f}, minimum {f.minimum:.2f}: {ratio}")
    print(
        f"    wait mean {mean}, max {most}; {f.actions} scale actions ({f.grow} grow, {f.shrink} "
        f"shrink, {f.direction_changes} direction changes); nodes up to {f.peak_nodes}"
    )
    print(f"    first pending job to the first job on a new node: {reaction}")
    if f.never_started:
        print(f"    {f.never_started} jobs never started")


def check(name: str, r: Replay, low: int) -> None:
    """What every replay must show: every job ran once and the group ends at min."""
    f = r.figures
    if f.never_started or f.final_nodes != low or f.grow < 1 or f.shrink < 1:
        sys.exit(f"{name}: unexpected replay: {f}")


LIVE_MODULE = "tests/test_vm_slurm_autoscale.py"
LIVE_TESTS = [f"{LIVE_MODULE}::test_twelve_one_minute_jobs_grow_to_3_and_back_to_1",
              f"{LIVE_MODULE}::test_the_lab_leaves_nothing"]  # fmt: skip
LIVE_EVERY = 20.0  # the live test's `crv autoscale enable --every 20s`


def live(scaling: Scaling, low: int, keep: Path | None) -> None:
    """The live run (the real-guest test) and the replay of its trace beside it."""
    from benchmarks.bench_baremetal import real_rack_reason

    why = real_rack_reason()
    if why:
        print(f"  live: skipped, {why}")
        return
    out = keep or Path(tempfile.mkdtemp(prefix="crv-bench-autoscale-"))
    env = {**os.environ, "CRV_AUTOSCALE_LIVE": str(out)}
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-n", "0", "-p", "no:cacheprovider",
            "-m", "rack", *LIVE_TESTS]  # fmt: skip
    print(f"  live: {' '.join(argv[1:])} (about 13 minutes)", flush=True)
    started = time.monotonic()
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    found = sorted(out.glob("*.json"))
    if r.returncode != 0 or not found:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-40:])
        sys.exit(f"live run failed (exit {r.returncode}):\n{tail}")
    f = json.loads(found[0].read_text())
    print(f"  live run in {time.monotonic() - started:.0f} s; the test said:")
    for line in r.stdout.splitlines():
        if line.startswith(
            ("  ", "grown", "first", "grow", "jobs", "shrink", "node-hours", "deploy")
        ):
            print(f"    | {line.strip()}")
    jobs = [Job(0.0, 1, float(f["job_seconds"]))] * int(f["jobs"])
    boot = float(f["grown_s"])
    replayed = simulate(scaling, low, int(f["max_nodes"]), 1, jobs, LIVE_EVERY, boot,
                        name="slurm-compute").figures  # fmt: skip
    live_ratio = f["node_hours_to_last_job"] / f["minimum_node_hours"]
    print(
        f"  live vs replay (same trace, every {LIVE_EVERY:g} s, boot = the live grow {boot:.0f} s):"
    )
    print(f"    first pending job -> first job on a new node: live {f['reaction_s']:.0f} s, "
          f"replay {replayed.reaction or 0:.0f} s")  # fmt: skip
    print(f"    node-hours to the last job's end: live {f['node_hours_to_last_job']:.3f} "
          f"({live_ratio:.2f}x the minimum {f['minimum_node_hours']:.3f}), replay "
          f"{replayed.node_hours:.3f} ({replayed.ratio or 0:.2f}x)")  # fmt: skip
    print(f"    node-hours to the end of the shrink: live {f['node_hours_to_shrunk']:.3f}")
    print(f"    scale actions: live {len(f['actions'])}, replay {replayed.actions}")
    plots = ", ".join(p.name for p in sorted(out.glob("*.png"))) or "no plot"
    print(f"  the live run's figures and plot: {out} ({plots})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_autoscale_queue")
    parser.add_argument("--every", type=float, default=15.0, help="schedule interval, seconds")
    parser.add_argument("--boot", type=float, default=90.0, help="a new node's boot, seconds")
    parser.add_argument("--max", type=int, default=3, help="the group's scale.max")
    parser.add_argument("--smoke", action="store_true", help="a tiny trace only (CI)")
    parser.add_argument("--live", action="store_true", help="also the real-guest run (root)")
    parser.add_argument("--keep", type=Path, help="with --live: where its figures and plot go")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    scaling, low, source = slurm_policy()
    print(f"autoscale by queue (replayed): the policy of {source}: {describe(scaling)}")
    print(f"  nodes {low}-{args.max} from 1, schedule every {args.every:g} s, boot {args.boot:g} s")
    traces = [("smoke", SMOKE)] if args.smoke else [(p.name, read_jobs(p)) for p in TRACES]
    for name, jobs in traces:
        result, wall = replay(scaling, low, args.max, jobs, args.every, args.boot)
        report(name, result, wall)
        check(name, result, low)
    if args.live and not args.smoke:
        live(scaling, low, args.keep)


if __name__ == "__main__":
    main()
