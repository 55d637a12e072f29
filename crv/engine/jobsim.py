"""A what-if replay of a batch job trace: the queue policy (crv.engine.autoscale.decide_queue)
sizes a simulated Slurm partition on a simulated clock (no Prefect, no machines, no clock of
its own), so `crv autoscale simulate --jobs` and the benchmark show what a `scaling: {queue:
...}` section would have cost and how long jobs would have waited.

The model, and its limits:

- the autoscale schedule ticks every `every` seconds from 0 and calls decide_queue with the
  queue as Slurm would show it at that instant: the jobs waiting, the nodes they ask for, the
  jobs running, and each booted node's state (`idle`, `mixed`, `allocated`); a node still
  booting is not listed yet (the controller does not know it);
- a growth adds its nodes at once, each booting for `boot` seconds before it takes jobs; a
  shrink removes exactly the decision's victims at once (they run no job: no drain time);
- between ticks the scheduler runs at every event (a submit, a job's end, a node booted):
  jobs in submit order, first fit (a job that does not fit does not block later smaller ones,
  as Slurm's backfill does when runtimes are unknown), each taking one of `jobs_per_node`
  slots on `nodes` distinct booted nodes, oldest node first, for exactly `runtime` seconds
  (with `jobs_per_node: 1` a job takes whole nodes);
- no failures, no drain timeouts, no pool capacity limits, no job priorities or limits: the
  replay tests the policy, not the machines.

Event-driven and exact: the clock jumps from event to event (ticks, submits, job ends, boots).
It stops once every job ran (or can never start: it asks for more nodes than `scale.max`) and
the group no longer changes, so a job too big for the group is reported, not waited for.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from crv.appliance.spec import MAX_NODES, Scaling
from crv.base.errors import SpecError
from crv.engine.autoscale import (
    Decision,
    Memory,
    QueueReading,
    decide_queue,
    direction_changes,
    number,
)

MAX_SECONDS = 366 * 86400.0  # a submit time or a runtime: at most a year
MAX_JOBS = 1_000_000
MAX_TICKS = 200_000  # decisions in one replay (about 35 days at 15 s)


@dataclass(frozen=True)
class Job:
    submit: float  # seconds since the trace began
    nodes: int
    runtime: float  # seconds


@dataclass(frozen=True)
class Run:
    """One job of the trace as the replay ran it (start None: never started)."""

    id: int  # 1-based, in trace order
    job: Job
    start: float | None = None
    on: tuple[str, ...] = ()

    @property
    def wait(self) -> float | None:
        return None if self.start is None else self.start - self.job.submit

    @property
    def end(self) -> float | None:
        return None if self.start is None else self.start + self.job.runtime

    def row(self) -> dict[str, object]:
        return {
            "id": self.id,
            "submit": self.job.submit,
            "nodes": self.job.nodes,
            "runtime": self.job.runtime,
            "start": self.start,
            "end": self.end,
            "wait": self.wait,
            "on": list(self.on),
        }


@dataclass(frozen=True)
class Point:
    """The group and the queue from `at` until the next point."""

    at: float
    nodes: int  # in the group, booting ones included
    booting: int
    pending: int  # jobs waiting
    running: int  # jobs running


@dataclass(frozen=True)
class Figures:
    node_hours: float  # nodes in the group (booting included) x time, over [0, until]
    minimum: float  # node-hours the jobs that ran needed: sum(nodes x runtime) / jobs_per_node
    ratio: float | None  # node_hours / minimum
    mean_wait: float | None  # seconds, over the jobs that started
    max_wait: float | None
    actions: int  # grow and shrink decisions
    grow: int
    shrink: int
    direction_changes: int
    jobs: int
    never_started: int  # jobs that asked for more than the group could ever give
    reaction: float | None  # from the first pending job to the first job on a grown node
    until: float  # node-hours are counted until the last job ended, or the last submit
    peak_nodes: int
    final_nodes: int
    end: float  # the replay's last event (the group settled)

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass(frozen=True)
class Replay:
    decisions: list[Decision]
    jobs: list[Run]
    timeline: list[Point]
    figures: Figures


# -- the trace ---------------------------------------------------------------------------------


def read_jobs(path: Path) -> list[Job]:
    """A CSV of `submit,nodes,runtime` rows (seconds, a positive count, seconds; a header line
    and `#` comments are allowed); submit times must not decrease. Errors name the file and
    the line."""
    source = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise SpecError(source, "", reason or str(exc)) from None
    jobs: list[Job] = []
    header_seen = False
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        where = f"line {line_no}"
        if len(row) != 3:
            raise SpecError(source, where, f"expected SUBMIT,NODES,RUNTIME (got {len(row)} fields)")
        submit = number(row[0])
        if submit is None:
            if not jobs and not header_seen:
                header_seen = True
                continue  # a header
            raise SpecError(source, where, f"submit {row[0].strip()[:20]!r} is not a number")
        if not 0 <= submit <= MAX_SECONDS:
            raise SpecError(source, where, f"submit {submit:g} is not within 0-{MAX_SECONDS:.0f} s")
        if jobs and submit < jobs[-1].submit:
            raise SpecError(
                source, where, f"submit {submit:g} is before the previous {jobs[-1].submit:g}"
            )
        nodes = number(row[1])
        if nodes is None or nodes != int(nodes) or not 1 <= nodes <= MAX_NODES:
            raise SpecError(
                source, where, f"nodes {row[1].strip()[:20]!r} is not a count of 1-{MAX_NODES}"
            )
        runtime = number(row[2])
        if runtime is None or not 0 < runtime <= MAX_SECONDS:
            raise SpecError(
                source,
                where,
                f"runtime {row[2].strip()[:20]!r} is not a number of seconds in (0, "
                f"{MAX_SECONDS:.0f}]",
            )
        if len(jobs) >= MAX_JOBS:
            raise SpecError(source, where, f"more than {MAX_JOBS} jobs")
        jobs.append(Job(submit, int(nodes), runtime))
    if not jobs:
        raise SpecError(source, "", "no jobs (expected SUBMIT,NODES,RUNTIME rows)")
    return jobs


# -- the replay --------------------------------------------------------------------------------


_too_long = (
    f"the replay would take more than {MAX_TICKS} decisions: take a longer interval or a "
    "shorter trace"
)


@dataclass
class _Node:
    name: str
    ready_at: float
    grown: bool  # added by a growth (not one of the nodes at the start)
    used: int = 0  # job slots taken


def simulate(
    scaling: Scaling,
    low: int,
    high: int,
    start: int,
    jobs: Sequence[Job],
    every: float,
    boot: float,
    name: str = "c-compute",
) -> Replay:
    """Replay `jobs` with the queue policy of `scaling` (module doc): every decision, every
    job's start, the timeline and the figures. A ValueError if the replay would take more than
    MAX_TICKS decisions (an interval too short for the trace)."""
    assert scaling.queue is not None, "a queue replay needs a scaling section with a queue"
    if every <= 0 or boot < 0:
        raise ValueError("every must be positive and boot not negative")
    if jobs and jobs[-1].submit / every > MAX_TICKS:
        raise ValueError(_too_long)
    per = scaling.queue.jobs_per_node
    nodes: dict[str, _Node] = {}  # in creation order: the oldest first
    serial = 0

    def add(ready_at: float, grown: bool) -> None:
        nonlocal serial
        serial += 1
        node = _Node(f"{name}-{serial}", ready_at, grown)
        nodes[node.name] = node

    for _ in range(min(max(start, low), high)):
        add(0.0, grown=False)
    runs = [Run(i + 1, job) for i, job in enumerate(jobs)]
    pending: list[int] = []  # indexes into runs, in submit order
    running: list[tuple[float, int]] = []  # (end, index), a heap
    decisions: list[Decision] = []
    timeline: list[Point] = []
    memory = Memory()
    submitted = 0
    first_pending: float | None = None
    first_on_grown: float | None = None
    last_change = 0.0

    def schedule(now: float) -> None:
        nonlocal first_on_grown, last_change
        free = [n for n in nodes.values() if n.ready_at <= now and n.used < per]
        if not free or not pending:
            return
        kept: list[int] = []
        for index in pending:
            job = runs[index].job
            if job.nodes > len(free):
                kept.append(index)
                continue
            taken = free[: job.nodes]  # the oldest nodes with a free slot
            for node in taken:
                node.used += 1
            free = [n for n in free if n.used < per]
            runs[index] = Run(runs[index].id, job, now, tuple(n.name for n in taken))
            heapq.heappush(running, (now + job.runtime, index))
            last_change = now
            if first_on_grown is None and any(n.grown for n in taken):
                first_on_grown = now
        pending[:] = kept

    def state(node: _Node) -> str:
        return "idle" if node.used == 0 else "allocated" if node.used >= per else "mixed"

    now, tick = 0.0, 0
    while True:
        while running and running[0][0] <= now:
            _, index = heapq.heappop(running)
            for node_name in runs[index].on:
                nodes[node_name].used -= 1
            last_change = now
        while submitted < len(runs) and runs[submitted].job.submit <= now:
            pending.append(submitted)
            submitted += 1
            last_change = now
        if any(n.ready_at == now and n.grown for n in nodes.values()):
            last_change = now
        schedule(now)
        if pending and first_pending is None:
            first_pending = now
        if tick * every <= now:
            if tick >= MAX_TICKS:
                raise ValueError(_too_long)
            states = {n.name: state(n) for n in nodes.values() if n.ready_at <= now}
            queue = QueueReading(
                sum(runs[i].job.nodes for i in pending),
                len(pending),
                len(running),
                states,
            )
            newest_first = list(reversed(nodes))
            d = decide_queue(scaling, low, high, newest_first, queue, now, memory)
            decisions.append(d)
            memory = d.memory
            if d.action == "grow":
                for _ in range(d.target - d.current):
                    add(now + boot, grown=True)
                schedule(now)  # nodes that boot in no time take jobs at once
            elif d.action == "shrink":
                for victim in d.remove:
                    assert nodes[victim].used == 0, f"{victim} runs a job"
                    del nodes[victim]
            tick += 1
        booting = sum(1 for n in nodes.values() if n.ready_at > now)
        point = Point(now, len(nodes), booting, len(pending), len(running))
        if not timeline or (point.nodes, point.booting, point.pending, point.running) != (
            timeline[-1].nodes,
            timeline[-1].booting,
            timeline[-1].pending,
            timeline[-1].running,
        ):
            timeline.append(point)
        last = decisions[-1] if decisions else None
        settled = (
            last is not None
            and last.at >= last_change
            and last.action == "none"
            and last.target == last.desired
        )
        if submitted == len(runs) and not running and not booting and settled:
            break
        upcoming = [tick * every]
        if running:
            upcoming.append(running[0][0])
        if submitted < len(runs):
            upcoming.append(runs[submitted].job.submit)
        upcoming.extend(n.ready_at for n in nodes.values() if n.ready_at > now)
        now = float(min(upcoming))
    if timeline[-1].at != now:
        timeline.append(Point(now, *_counts(timeline[-1])))
    return Replay(
        decisions, runs, timeline, _figures(scaling, runs, decisions, timeline, first_pending,
                                            first_on_grown, now)
    )  # fmt: skip


def _counts(p: Point) -> tuple[int, int, int, int]:
    return p.nodes, p.booting, p.pending, p.running


def _figures(
    scaling: Scaling,
    runs: Sequence[Run],
    decisions: Sequence[Decision],
    timeline: Sequence[Point],
    first_pending: float | None,
    first_on_grown: float | None,
    end: float,
) -> Figures:
    assert scaling.queue is not None
    started = [r for r in runs if r.start is not None]
    until = max([runs[-1].job.submit] + [r.end for r in started if r.end is not None])
    node_seconds = 0.0
    for here, there in zip(timeline, [*timeline[1:], None], strict=True):
        stop = min(until, there.at if there is not None else until)
        if stop > here.at:
            node_seconds += here.nodes * (stop - here.at)
    minimum = sum(r.job.nodes * r.job.runtime for r in started) / scaling.queue.jobs_per_node
    node_hours, minimum_hours = node_seconds / 3600, minimum / 3600
    waits = [r.wait for r in started if r.wait is not None]
    grow = sum(d.action == "grow" for d in decisions)
    shrink = sum(d.action == "shrink" for d in decisions)
    reaction = (
        first_on_grown - first_pending
        if first_pending is not None and first_on_grown is not None
        else None
    )
    return Figures(
        node_hours=node_hours,
        minimum=minimum_hours,
        ratio=node_hours / minimum_hours if minimum_hours > 0 else None,
        mean_wait=sum(waits) / len(waits) if waits else None,
        max_wait=max(waits) if waits else None,
        actions=grow + shrink,
        grow=grow,
        shrink=shrink,
        direction_changes=direction_changes(decisions),
        jobs=len(runs),
        never_started=len(runs) - len(started),
        reaction=reaction,
        until=until,
        peak_nodes=max(p.nodes for p in timeline),
        final_nodes=timeline[-1].nodes,
        end=end,
    )


def plot(replay: Replay, path: Path, title: str) -> None:
    """Nodes (booting ones apart) above, jobs pending and running below, against minutes, in
    one PNG; a grey line at each scale action."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = replay.timeline
    times = [p.at / 60 for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), dpi=100)
    top.step(times, [p.nodes for p in points], where="post", color="tab:red", label="nodes")
    top.step(times, [p.booting for p in points], where="post", color="tab:orange", label="booting")
    top.set_ylabel("nodes")
    top.set_ylim(0, max(p.nodes for p in points) * 1.25 + 0.5)  # room for the legend
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.legend(loc="upper right")
    bottom.step(
        times, [p.pending for p in points], where="post", color="tab:blue", label="jobs pending"
    )
    bottom.step(
        times, [p.running for p in points], where="post", color="tab:green", label="jobs running"
    )
    bottom.set_ylabel("jobs")
    bottom.set_ylim(0, max(max(p.pending, p.running) for p in points) * 1.25 + 0.5)
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("minutes")
    bottom.legend(loc="upper right")
    for d in replay.decisions:
        if d.action != "none":
            for axis in (top, bottom):
                axis.axvline(d.at / 60, color="tab:gray", alpha=0.3, linewidth=0.8)
    f = replay.figures
    ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
    top.set_title(
        f"{title}\n{f.node_hours:.2f} node-hours, {ratio} the minimum; "
        f"mean wait {_seconds(f.mean_wait)}; {f.actions} scale actions"
    )
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"
