"""Autoscaling decisions: a pure function of a group's `scaling` section, its bounds, its
current size, one metric reading and what was decided before (no Prefect, no pools, no clock
of its own), so the scheduled flow and the what-if replay take exactly the same decisions.

The rules, in order:

1. no usable metric (missing, not a number, older than `stale_after`): do nothing, say why;
2. the policy says how many nodes the metric asks for (`desired`), clamped to `scale.min/max`;
   a target policy asks for fewer nodes only when they would stay below the target by its
   `tolerance` (the Kubernetes HPA's 10 %): a shrink the next small rise would undo is not
   taken (FAULTS F13);
3. growing: at once, not within `cooldown` of the last scale action (either way); by at most
   `max_step`;
4. shrinking: only once the metric has asked for fewer nodes for `scale_down_delay` without a
   break, and not within `cooldown` of the last scale action; by at most `max_step`; the delay
   starts again after each shrink (so a long low period shrinks in steady steps, and a short
   dip never does);
5. otherwise nothing, with the reason.

A group scaled by a batch `queue` (decide_queue) wants the nodes that run jobs plus the nodes
its waiting jobs ask for; it shrinks by the same delay and cooldown, and its victims are named
in the decision: only nodes that run no job (never `mixed` or `allocated` ones).

Every call returns a Decision, including "none" ones: the flow records each (store and
artifact), and the replay prints them.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from crv.appliance.spec import Scaling
from crv.base.errors import SpecError

AGGREGATES: dict[str, Callable[[Sequence[float]], float]] = {
    "sum": sum,
    "mean": lambda values: sum(values) / len(values),
    "max": max,
    "min": min,
}


@dataclass(frozen=True)
class Reading:
    """One metric reading: the value (None: missing or not a number) and how old it is."""

    value: float | None
    age: float = 0.0  # seconds since the value was published or fetched
    problem: str = ""  # why `value` is None


@dataclass(frozen=True)
class Memory:
    """What the next decision needs from the previous ones."""

    last_scale_up: float | None = None  # when the last growth was decided
    low_since: float | None = None  # since when the metric has asked for fewer nodes
    last_action: float | None = None  # when the last growth or shrink was decided

    def cooling(self, now: float, cooldown: float) -> float | None:
        """Seconds of cooldown left after the last scale action (None: none left)."""
        last = self.last_action if self.last_action is not None else self.last_scale_up
        left = None if last is None else cooldown - (now - last)
        return left if left is not None and left > 0 else None


@dataclass(frozen=True)
class Decision:
    at: float  # seconds (the flow: a Unix time; the replay: since the trace began)
    metric: float | None
    current: int
    desired: int  # what the metric asks for, within bounds
    target: int  # the size this decision sets (== current when action is "none")
    action: str  # "grow", "shrink" or "none"
    reason: str
    memory: Memory = field(default_factory=Memory)
    remove: tuple[str, ...] = ()  # a queue's shrink: exactly these nodes go (decide_queue)

    def row(self) -> dict[str, object]:
        return {
            "at": self.at,
            "metric": self.metric,
            "current": self.current,
            "desired": self.desired,
            "target": self.target,
            "action": self.action,
            "reason": self.reason,
        }


def aggregate(values: Sequence[float], how: str) -> float | None:
    return float(AGGREGATES[how](values)) if values else None


def number(text: object) -> float | None:
    """A finite number from a value published as text, else None."""
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def from_attribute(scaling: Scaling, readings: Sequence[Mapping[str, Any]]) -> Reading:
    """A blackboard metric: every node's value of the attribute (`{node, value, age}`, as the
    service's admin API answers), aggregated over the fresh ones. Stale and non-numeric values
    are left out, and said so when nothing usable remains."""
    assert scaling.metric is not None and scaling.metric.attribute is not None
    attribute = scaling.metric.attribute
    if not readings:
        return Reading(None, problem=f"no node of {attribute.role} published {attribute.key}")
    limit = scaling.metric.stale_after
    fresh = [r for r in readings if r.get("age") is not None and r["age"] <= limit]
    values = [v for r in fresh if (v := number(r.get("value"))) is not None]
    if not fresh:
        newest = min((r["age"] for r in readings if r.get("age") is not None), default=None)
        said = "never timed" if newest is None else f"the newest is {newest:.0f} s old"
        return Reading(None, problem=f"stale: {said} (stale after {limit:g} s)")
    if not values:
        shown = ", ".join(f"{r['node']}={str(r.get('value'))[:20]!r}" for r in fresh[:3])
        return Reading(None, problem=f"{attribute.key} is not a number ({shown})")
    value = aggregate(values, attribute.aggregate)
    return Reading(value, age=max(float(r["age"]) for r in fresh))


def from_http_body(url: str, status: int, body: str) -> Reading:
    """An HTTP metric: a 200 answer whose body is a number, as plain text or JSON (a number, or
    an object with a numeric "value")."""
    if status != 200:
        return Reading(None, problem=f"{url} answered HTTP {status}")
    value = number(body)
    if value is None:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            parsed = parsed.get("value")
        if not isinstance(parsed, bool):
            value = number(parsed) if isinstance(parsed, (int, float, str)) else None
    if value is None:
        return Reading(None, problem=f"{url} did not answer a number ({body.strip()[:40]!r})")
    return Reading(value)


def within_room(d: Decision, room: Mapping[str, int | None], before: Memory) -> Decision:
    """A growth limited to what the group's pools can still make (`room`: pool -> nodes it can
    add, None for no known limit, in order of preference). No room at all: no action, "no
    capacity", and the memory of `before` (no cooldown starts for a growth that did not
    happen)."""
    if d.action != "grow" or any(r is None for r in room.values()):
        return d
    total = sum(r or 0 for r in room.values())
    if total >= d.target - d.current:
        return d
    left = ", ".join(f"{pool} {r}" for pool, r in room.items())
    if total <= 0:
        reason = f"{d.reason}; no capacity in pools {', '.join(room)} (room: {left})"
        return replace(d, target=d.current, action="none", reason=reason, memory=before)
    reason = f"{d.reason}; room for {total} more only ({left})"
    return replace(d, target=d.current + total, reason=reason)


def held_by_quarantine(d: Decision, quarantined: Sequence[str], before: Memory) -> Decision:
    """No growth while nodes of the group are quarantined (FAULTS F6: no replacement loop): a
    growth would make nodes from what just failed; a deploy or repair once the cause is fixed
    makes them again. No cooldown starts for a growth that did not happen."""
    if d.action != "grow" or not quarantined:
        return d
    names = ", ".join(quarantined[:3]) + (
        f" and {len(quarantined) - 3} more" if len(quarantined) > 3 else ""
    )
    reason = (
        f"{d.reason}; held: {len(quarantined)} quarantined ({names}): no growth until a deploy "
        "or `crv repair` makes them again"
    )
    return replace(d, target=d.current, action="none", reason=reason, memory=before)


def wanted(scaling: Scaling, metric: float, current: int) -> tuple[int, str]:
    """The node count the policy asks for (before bounds), and how it got there."""
    p = scaling.policy
    assert p is not None
    if p.target_per_node is not None:
        need = math.ceil(metric / p.target_per_node - 1e-9)
        how = f"{metric:g} / {p.target_per_node:g} per node = {need}"
        if need < current and p.tolerance > 0:  # fewer only if they stay below the band
            keep = math.ceil(metric / (p.target_per_node * (1 - p.tolerance)) - 1e-9)
            if keep > need:
                how += f", {keep} within the {p.tolerance:.0%} tolerance"
                need = min(keep, current)
        return need, how
    per_node = metric / current if current else metric
    assert p.scale_up_above is not None and p.scale_down_below is not None
    if per_node > p.scale_up_above:
        return current + p.step_up, f"{per_node:g} per node > {p.scale_up_above:g}"
    if per_node < p.scale_down_below:
        return current - p.step_down, f"{per_node:g} per node < {p.scale_down_below:g}"
    return current, f"{per_node:g} per node within {p.scale_down_below:g}-{p.scale_up_above:g}"


def decide(
    scaling: Scaling,
    low: int,
    high: int,
    current: int,
    reading: Reading,
    now: float,
    memory: Memory,
) -> Decision:
    def nothing(reason: str) -> Decision:
        return Decision(now, reading.value, current, current, current, "none", reason, memory)

    if reading.value is None:
        return nothing(f"no metric: {reading.problem or 'missing'}")
    if reading.age > scaling.stale_after:
        return nothing(
            f"stale metric: {reading.age:.0f} s old (stale after {scaling.stale_after:g} s)"
        )
    need, how = wanted(scaling, reading.value, current)
    return _sized(scaling, low, high, current, need, how, reading.value, now, memory)


def _sized(
    scaling: Scaling,
    low: int,
    high: int,
    current: int,
    need: int,
    how: str,
    metric: float | None,
    now: float,
    memory: Memory,
    removable: Sequence[str] | None = None,
) -> Decision:
    """The decision for a group of `current` nodes whose metric asks for `need` (module doc,
    rules 2-5). `removable`: the only nodes a shrink may take, first to go first (a queue's
    nodes that run no job); None: any (the resize picks them)."""
    desired = min(max(need, low), high)
    bound = f" (clamped to {'max' if need > high else 'min'} {desired})" if desired != need else ""
    left = memory.cooling(now, scaling.cooldown)

    def nothing(reason: str, mem: Memory) -> Decision:
        return Decision(now, metric, current, desired, current, "none", reason, mem)

    if desired > current:
        calm = replace(memory, low_since=None)
        if left is not None:
            return nothing(f"{how}{bound}; cooldown: {left:.0f} s left", calm)
        target = min(desired, current + scaling.max_step)
        step = f"; step limited to {scaling.max_step}" if target < desired else ""
        mem = Memory(last_scale_up=now, low_since=None, last_action=now)
        return Decision(now, metric, current, desired, target, "grow", how + bound + step, mem)
    if desired < current:
        low_since = memory.low_since if memory.low_since is not None else now
        mem = replace(memory, low_since=low_since)
        waited = now - low_since
        if waited < scaling.scale_down_delay:
            delay = scaling.scale_down_delay
            return nothing(f"{how}{bound}; low for {waited:.0f} of {delay:g} s", mem)
        if left is not None:
            return nothing(f"{how}{bound}; cooldown: {left:.0f} s left", mem)
        target = max(desired, current - scaling.max_step)
        step = f"; step limited to {scaling.max_step}" if target > desired else ""
        victims: tuple[str, ...] = ()
        if removable is not None:
            victims = tuple(removable[: current - target])
            if not victims:
                return nothing(f"{how}{bound}; every node runs jobs", mem)
            if len(victims) < current - target:
                step += f"; only {len(victims)} run no job"
            target = current - len(victims)
            step += f"; removing {', '.join(victims)}"
        mem = Memory(memory.last_scale_up, low_since=now, last_action=now)  # a full delay again
        return Decision(
            now, metric, current, desired, target, "shrink", how + bound + step, mem, victims
        )
    at_bound = " (at max)" if current == high else " (at min)" if current == low else ""
    return nothing(f"{how}{bound}{at_bound}; no change", replace(memory, low_since=None))


# -- a batch queue (the slurm appliance's controller publishes it) ----------------------------

# Slurm's long node states (`sinfo -N -o %T`: a base state, `+FLAG`s, and a suffix such as `*`
# for not responding). A node in one of these runs, finishes or is about to start a job: it is
# never a victim (CLUES #97, #14: partly used nodes were powered off).
BUSY_STATES = frozenset({"allocated", "mixed", "completing", "draining", "planned", "reserved"})
BUSY_FLAGS = frozenset({"completing", "planned"})


def node_class(state: str | None) -> str:
    """ "busy" (runs or is about to run a job), "idle" (takes jobs, runs none) or "other"
    (runs none and takes none: down, drained, unknown, not listed yet)."""
    if not state:
        return "other"
    base, *flags = state.strip().lower().rstrip("*~#!%$@^-").split("+")
    if base in BUSY_STATES or BUSY_FLAGS.intersection(flags):
        return "busy"
    if base == "idle" and not {"drain", "fail", "maint"}.intersection(flags):
        return "idle"
    return "other"


@dataclass(frozen=True)
class QueueReading:
    """What the queue's role published: nodes the waiting jobs ask for, jobs waiting and
    running, every node's state; None with a problem when it cannot be used."""

    pending_nodes: int | None
    pending: int = 0
    running: int = 0
    states: Mapping[str, str] = field(default_factory=dict)
    age: float = 0.0
    problem: str = ""


def from_queue(
    scaling: Scaling, readings: Mapping[str, Sequence[Mapping[str, Any]]]
) -> QueueReading:
    """The queue from its role's attributes (key -> `{node, value, age}` readings, as the
    service's admin API answers): the newest reading of each key, every key fresh."""
    queue = scaling.queue
    assert queue is not None
    values: dict[str, str] = {}
    oldest = 0.0
    for key in ("pending_nodes", "pending", "running", "node_states"):
        timed = [r for r in readings.get(key, ()) if r.get("age") is not None]
        if not timed:
            return QueueReading(None, problem=f"no node of {queue.role} published {key}")
        newest = min(timed, key=lambda r: float(r["age"]))
        age = float(newest["age"])
        if age > queue.stale_after:
            return QueueReading(
                None,
                problem=f"stale: {key} is {age:.0f} s old (stale after {queue.stale_after:g} s)",
            )
        values[key], oldest = str(newest.get("value") or ""), max(oldest, age)
    counts: dict[str, int] = {}
    for key in ("pending_nodes", "pending", "running"):
        n = number(values[key])
        if n is None or n < 0 or n != int(n):
            return QueueReading(None, problem=f"{key} is not a count ({values[key][:20]!r})")
        counts[key] = int(n)
    states = {}
    for word in values["node_states"].split():
        node, sep, state = word.partition("=")
        if sep and node:
            states[node] = state
    return QueueReading(
        counts["pending_nodes"], counts["pending"], counts["running"], states, oldest
    )


def decide_queue(
    scaling: Scaling,
    low: int,
    high: int,
    nodes: Sequence[str],
    queue: QueueReading,
    now: float,
    memory: Memory,
) -> Decision:
    """The decision for a group sized by a batch queue. `nodes`: the group's nodes in the order
    a shrink should take them (crv.engine.placement.release_order). The group wants its busy
    nodes plus ceil(nodes the waiting jobs ask for / jobs_per_node); a shrink names its
    victims, only nodes that run no job, and takes fewer if there are not enough of them."""
    assert scaling.queue is not None
    current = len(nodes)
    metric = None if queue.pending_nodes is None else float(queue.pending_nodes)
    if queue.pending_nodes is None:
        reason = f"no queue: {queue.problem or 'missing'}"
        return Decision(now, None, current, current, current, "none", reason, memory)
    classes = {n: node_class(queue.states.get(n)) for n in nodes}
    busy = sum(1 for c in classes.values() if c == "busy")
    per = scaling.queue.jobs_per_node
    need = busy + math.ceil(queue.pending_nodes / per)
    waiting = f"{queue.pending} jobs waiting for {queue.pending_nodes} nodes"
    per_text = f" / {per} per node" if per > 1 else ""
    how = f"{waiting}{per_text}, {busy} of {current} nodes busy: {need}"
    removable = [n for n in nodes if classes[n] != "busy"]
    return _sized(scaling, low, high, current, need, how, metric, now, memory, removable)


# -- the what-if replay ------------------------------------------------------------------------


def read_trace(path: Path) -> list[tuple[float, float | None]]:
    """A CSV of `seconds,value` rows (a header line is allowed; an empty or non-numeric value
    is a missing reading); seconds must increase. Errors name the file and the line."""
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(source, "", exc.strerror or str(exc)) from None
    rows: list[tuple[float, float | None]] = []
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise SpecError(source, f"line {line_no}", "expected SECONDS,VALUE")
        at = number(row[0])
        if at is None:
            if not rows and line_no == 1:
                continue  # a header
            raise SpecError(source, f"line {line_no}", f"{row[0]!r} is not a number of seconds")
        if rows and at <= rows[-1][0]:
            raise SpecError(source, f"line {line_no}", f"time {at:g} does not increase")
        rows.append((at, number(row[1]) if row[1].strip() else None))
    if not rows:
        raise SpecError(source, "", "no readings (expected SECONDS,VALUE rows)")
    return rows


def replay(
    scaling: Scaling,
    low: int,
    high: int,
    start: int,
    trace: Sequence[tuple[float, float | None]],
    every: float,
) -> list[Decision]:
    """The decisions a schedule running every `every` seconds would take on `trace`, on a
    simulated clock. The newest reading at or before each tick is used (its age counts); a
    change takes effect at once (no machines: the replay tests the policy, not the pools)."""
    decisions: list[Decision] = []
    memory, current = Memory(), min(max(start, low), high)
    end = trace[-1][0]
    i, tick = 0, trace[0][0]
    while tick <= end + 1e-9:
        while i + 1 < len(trace) and trace[i + 1][0] <= tick:
            i += 1
        at, value = trace[i]
        reading = Reading(value, tick - at, "" if value is not None else "not a number")
        d = decide(scaling, low, high, current, reading, tick, memory)
        decisions.append(d)
        memory, current = d.memory, d.target
        tick += every
    return decisions


def direction_changes(decisions: Iterable[Decision]) -> int:
    """How often the replay turned from growing to shrinking or back (flapping shows here)."""
    last, turns = "", 0
    for d in decisions:
        if d.action in ("grow", "shrink"):
            if last and d.action != last:
                turns += 1
            last = d.action
    return turns


def recorded(rows: Iterable[Mapping[str, Any]]) -> list[Decision]:
    """Decisions from the store's rows (`crv autoscale status --json`), oldest first, their
    times in seconds since the first (as a replay's), for `plot`."""
    ordered = sorted(rows, key=lambda r: float(r["at"]))
    start = float(ordered[0]["at"]) if ordered else 0.0
    return [
        Decision(float(r["at"]) - start, r["metric"], int(r["current"]), int(r["desired"]),
                 int(r["target"]), str(r["action"]), str(r["reason"]))
        for r in ordered
    ]  # fmt: skip


def curves(
    decisions: Sequence[Decision],
) -> tuple[list[tuple[float, float]], list[tuple[float, int]]]:
    """What `plot` draws, as (minutes, value) points: the metric through the decisions that
    read one (a run skipped while a change was under way read none), and the node count as a
    step line from the first decision's current count, then each decision's target."""
    metric = [(d.at / 60, d.metric) for d in decisions if d.metric is not None]
    nodes = [(d.at / 60, d.target) for d in decisions]
    if decisions:
        nodes.insert(0, (decisions[0].at / 60, decisions[0].current))
    return metric, nodes


def plot(
    decisions: Sequence[Decision], path: Path, title: str, metric_label: str = "metric"
) -> None:
    """The metric and the node count over time, in one PNG (two y axes): `curves`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    metric, nodes = curves(decisions)
    fig, left = plt.subplots(figsize=(10, 4.5), dpi=100)
    left.plot([t for t, _ in metric], [m for _, m in metric], color="tab:blue", marker=".",
              markersize=3, label="metric")  # fmt: skip
    left.set_xlabel("minutes")
    left.set_ylabel(metric_label, color="tab:blue")
    right = left.twinx()
    right.step([t for t, _ in nodes], [n for _, n in nodes], where="post", color="tab:red",
               label="nodes")  # fmt: skip
    right.set_ylabel("nodes", color="tab:red")
    right.set_ylim(bottom=0)
    for d in decisions:
        if d.action != "none":
            right.axvline(d.at / 60, color="tab:gray", alpha=0.25, linewidth=0.8)
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
