"""The guards of a cluster: a `lease` (destroy it, or shrink it to its minimum, once the lease
has run), `idle_after` (shrink it to its minimum after no work for that long) and a node-hours
`budget` per UTC day (no growth that would spend more than is left). Pure decisions: given the
settings and the facts of one autoscale run (now, when work was last seen, the node-hours used
today, the nodes), say per guard what that run does. No Prefect, no clock of its own: the
scheduled autoscale flow (flows.guards) and the tests take exactly the same decisions.

Announce first, then act. A guard that will act (destroy or shrink) announces it `warn_before`
ahead: the first run within `warn_before` of the guard falling due announces, and the guard acts
in the first run at or after the announced time, which is never earlier than `warn_before` after
the announcement. A run that first sees a guard already due announces then and acts
`warn_before` later. An announcement belongs to one occurrence (`Notice.due`): a lease set again,
work seen again or a new UTC day makes another, and the old one is withdrawn.

- **lease**: due `lease` after it was set; the cluster is destroyed (`on_lease: destroy`) or every
  scaled group shrunk to its `scale.min` (`shrink`). From then on no group grows (until a new
  lease is set), and a cluster above its minimum again is shrunk again, announced again.
- **idle_after**: due `idle_after` after work was last seen (or after it was set, if later):
  every scaled group shrunk to its `scale.min`. Work is any scaled group with work: a queue with
  jobs waiting or running, a metric above 0; a group whose metric or queue cannot be read counts
  as working (the guard never shrinks what it cannot see).
- **budget**: the cluster's node-hours of the current UTC day (crv.service.usage, from the usage
  ledger) against the budget. A growth is refused, or made smaller, when the cluster's nodes with
  the new ones would spend more than is left within the growth's horizon (until the group may
  shrink again: max(cooldown, scale_down_delay, the schedule's interval), at most until 00:00
  UTC, when the budget starts again). Once spent, no growth at all. Announced when, at the
  current size, it runs out within `warn_before` (once a day); refusing a growth needs no notice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from crv.appliance.spec import Scaling
from crv.engine.autoscale import Decision, Memory, QueueReading, Reading
from crv.service.usage import DAY, day_start

GUARDS = ("lease", "idle", "budget")
ON_LEASE = ("destroy", "shrink")
WARN_BEFORE = 300.0  # seconds an action is announced ahead, when the setting names none


@dataclass(frozen=True)
class Settings:
    """A cluster's guards (none set: none enforced), as the store keeps them."""

    lease: float | None = None  # seconds
    lease_from: float | None = None  # when the lease was set (it runs from then)
    on_lease: str = "destroy"  # or "shrink"
    idle_after: float | None = None  # seconds
    idle_from: float | None = None  # when idle_after was set (idle counts from then at most)
    budget: float | None = None  # node-hours per UTC day
    warn_before: float = WARN_BEFORE

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Settings:
        """From the autoscaling setting the admin API answers (absent keys: unset)."""
        warn = row.get("warn_before")
        return cls(
            lease=row.get("lease") or None,
            lease_from=row.get("lease_from"),
            on_lease=row.get("on_lease") or "destroy",
            idle_after=row.get("idle_after") or None,
            idle_from=row.get("idle_from"),
            budget=row.get("budget") or None,
            warn_before=WARN_BEFORE if warn is None else float(warn),
        )

    @property
    def any(self) -> bool:
        return self.lease is not None or self.idle_after is not None or self.budget is not None

    def idle_since(self, work_seen: float | None) -> float | None:
        """Since when the cluster counts as idle: work last seen, or idle_after set if later."""
        known = [t for t in (work_seen, self.idle_from) if t is not None]
        return max(known) if known else None


@dataclass(frozen=True)
class Notice:
    """An announcement that is out: `guard` will do `action` at `acts_at`."""

    guard: str  # lease, idle, budget
    action: str  # destroy, shrink, hold
    due: float  # when the guard falls due: which occurrence this is (budget: the UTC day)
    announced: float
    acts_at: float
    text: str

    def row(self) -> dict[str, Any]:
        return {
            "guard": self.guard,
            "action": self.action,
            "due": self.due,
            "announced": self.announced,
            "acts_at": self.acts_at,
            "text": self.text,
        }

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Notice:
        return cls(
            str(row["guard"]), str(row["action"]), float(row["due"]), float(row["announced"]),
            float(row["acts_at"]), str(row.get("text") or ""),
        )  # fmt: skip


def notices_of(rows: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Notice]:
    return {guard: Notice.of(row) for guard, row in (rows or {}).items()}


@dataclass(frozen=True)
class Facts:
    """What one run knows."""

    now: float
    work_seen: float | None = None  # when work was last seen (this run's reading included)
    used: float = 0.0  # the cluster's node-hours today (UTC) until now
    nodes: int = 0  # the cluster's nodes now
    above_min: Mapping[str, int] = field(default_factory=dict)  # scaled group -> nodes over min
    notices: Mapping[str, Notice] = field(default_factory=dict)  # the announcements out


@dataclass(frozen=True)
class Verdict:
    """What one guard does in this run."""

    guard: str
    action: str  # destroy, shrink or hold ("" when the guard is not set)
    announce: bool = False  # the warning goes out now
    act: bool = False  # destroy or shrink now (never before warn_before after announcing)
    withdraw: bool = False  # an announcement that was out no longer holds
    notice: Notice | None = None  # the announcement out after this run
    reason: str = ""


@dataclass(frozen=True)
class Judgement:
    verdicts: tuple[Verdict, ...]
    hold: str | None = None  # why no group grows now (the lease has run)

    def notices(self) -> dict[str, Notice]:
        return {v.guard: v.notice for v in self.verdicts if v.notice is not None}

    def acting(self) -> Verdict | None:
        """The action this run takes: a destroy over a shrink (one shrink to min serves all)."""
        acts = [v for v in self.verdicts if v.act]
        return next((v for v in acts if v.action == "destroy"), acts[0] if acts else None)


def judge(settings: Settings, facts: Facts) -> Judgement:
    """Every guard's verdict for this run (module doc)."""
    lease, hold = _lease(settings, facts)
    verdicts = (lease, _idle(settings, facts), _budget(settings, facts))
    return Judgement(verdicts, hold)


def _off(guard: str, facts: Facts, why: str = "") -> Verdict:
    """Nothing to do; an announcement out is withdrawn."""
    old = facts.notices.get(guard)
    return Verdict(guard, old.action if old else "", withdraw=old is not None, reason=why)


def _timed(
    guard: str, action: str, due: float, settings: Settings, facts: Facts, what: str
) -> Verdict:
    """A guard that falls due at `due` and then does `action`: announce, wait, act. `what`:
    the situation in words ("lease ends in 4 min")."""
    now, warn = facts.now, settings.warn_before
    old = facts.notices.get(guard)
    if now < due - warn:
        return _off(guard, facts, f"{what}; withdrawn" if old else what)
    doing = _doing(action)
    if old is not None and old.due == due and old.action == action:
        acts_at = max(old.acts_at, old.announced + warn)  # a longer warn_before set since
        when = f"(announced at {clock(old.announced)})"
        if now >= acts_at:
            return Verdict(guard, action, act=True, reason=f"{what}: {doing} now {when}")
        left = f"{doing} at {clock(acts_at)}, in {span(acts_at - now)} {when}"
        return Verdict(guard, action, notice=old, reason=f"{what}: {left}")
    acts_at = max(due, now + warn)
    text = f"{what}: {doing} at {clock(acts_at)}"
    notice = Notice(guard, action, due, now, acts_at, text)
    if now >= acts_at:  # warn_before 0, due already: announced and done in one run
        return Verdict(guard, action, announce=True, act=True, notice=notice, reason=text)
    return Verdict(guard, action, announce=True, withdraw=old is not None, notice=notice,
                   reason=text)  # fmt: skip


def _doing(action: str) -> str:
    return {
        "destroy": "the cluster will be destroyed",
        "shrink": "every scaled group will be shrunk to its minimum",
        "hold": "growth will be held",
    }[action]


def _lease(settings: Settings, facts: Facts) -> tuple[Verdict, str | None]:
    if settings.lease is None or settings.lease_from is None:
        return _off("lease", facts), None
    due = settings.lease_from + settings.lease
    now, action = facts.now, settings.on_lease
    over = now >= due
    what = (
        f"lease of {span(settings.lease)} ended {span(now - due)} ago" if over
        else f"lease of {span(settings.lease)} ends in {span(due - now)}"
    )  # fmt: skip
    hold = f"the lease of {span(settings.lease)} ended at {clock(due)}" if over else None
    if action == "shrink" and not any(n > 0 for n in facts.above_min.values()):
        return _off("lease", facts, f"{what}: every scaled group is at its minimum"), hold
    return _timed("lease", action, due, settings, facts, what), hold


def _idle(settings: Settings, facts: Facts) -> Verdict:
    since = settings.idle_since(facts.work_seen)
    if settings.idle_after is None or since is None:
        return _off("idle", facts)
    if facts.work_seen is not None and facts.work_seen >= facts.now:
        return _off("idle", facts, "work now")
    due = since + settings.idle_after
    what = f"no work for {span(facts.now - since)} (idle after {span(settings.idle_after)})"
    if not any(n > 0 for n in facts.above_min.values()):
        return _off("idle", facts, f"{what}: every scaled group is at its minimum")
    return _timed("idle", "shrink", due, settings, facts, what)


def _budget(settings: Settings, facts: Facts) -> Verdict:
    if settings.budget is None:
        return _off("budget", facts)
    now, budget = facts.now, settings.budget
    day = day_start(now)
    left = budget - facts.used
    what = f"budget of {budget:g} node-hours a day: {facts.used:.2f} used today (UTC)"
    if left <= 0:
        runs_out: float | None = now
        what += ", spent"
    elif facts.nodes > 0:
        runs_out = now + left * 3600 / facts.nodes
        what += f", runs out in {span(runs_out - now)} at {facts.nodes} nodes"
    else:
        runs_out = None
    old = facts.notices.get("budget")
    if old is not None and old.due == day:  # announced today: once is enough
        return Verdict("budget", "hold", notice=old, reason=what)
    if runs_out is None or runs_out - now > settings.warn_before or runs_out >= day + DAY:
        return _off("budget", facts, what)
    text = f"{what}: growth will be held" if left > 0 else f"{what}: growth is held"
    notice = Notice("budget", "hold", day, now, runs_out, text)
    return Verdict("budget", "hold", announce=True, withdraw=old is not None, notice=notice,
                   reason=text)  # fmt: skip


# -- work, and growth the guards hold ----------------------------------------------------------


def working(reading: Reading | QueueReading) -> bool | None:
    """Whether a group has work: a queue with jobs waiting or running, a metric above 0; None
    when its reading is not usable (missing, stale, not a number)."""
    if isinstance(reading, QueueReading):
        if reading.pending_nodes is None:
            return None
        return reading.pending > 0 or reading.running > 0 or reading.pending_nodes > 0
    if reading.value is None:
        return None
    return reading.value > 0


def work_seen(
    readings: Mapping[str, Reading | QueueReading], now: float, before: float | None
) -> tuple[float | None, str]:
    """When work was last seen after this run's `readings` (group -> reading), and why: now if
    a group has work or cannot be read (the guard never shrinks what it cannot see)."""
    busy = sorted(g for g, r in readings.items() if working(r))
    unknown = sorted(g for g, r in readings.items() if working(r) is None)
    if busy:
        return now, f"work in {', '.join(busy)}"
    if unknown:
        return now, f"no reading of {', '.join(unknown)}: counted as working"
    return before, "no work"


def horizon(scaling: Scaling, every: float, now: float) -> float:
    """Seconds a growth's nodes run at least: until the group may shrink again (cooldown,
    scale_down_delay) or the next run, and no further than 00:00 UTC (the budget's new day)."""
    least = max(scaling.cooldown, scaling.scale_down_delay, every)
    return min(least, day_start(now) + DAY - now)


def budget_room(budget: float, used: float, nodes: int, seconds: float) -> int | None:
    """How many nodes a growth may add so that the cluster's `nodes` and the new ones spend no
    more than is left of `budget` (node-hours) within `seconds`; None: any number."""
    left = budget - used
    if left <= 0:
        return 0
    if seconds <= 0:
        return None
    keeps = math.floor(left * 3600 / seconds + 1e-9)  # nodes the rest keeps that long
    return max(0, keeps - nodes)


def held(d: Decision, why: str | None, before: Memory) -> Decision:
    """No growth while a guard holds it (`why`: the lease has run). Recorded as "none" with the
    reason; no cooldown starts for a growth that did not happen."""
    if d.action != "grow" or why is None:
        return d
    reason = f"{d.reason}; held: {why}"
    return replace(d, target=d.current, action="none", reason=reason, memory=before)


def within_budget(
    d: Decision, budget: float | None, used: float, nodes: int, seconds: float, before: Memory
) -> Decision:
    """A growth within the day's budget (module doc): refused ("none", the reason, no cooldown)
    when no new node fits, made smaller when fewer fit."""
    if d.action != "grow" or budget is None:
        return d
    room = budget_room(budget, used, nodes, seconds)
    added = d.target - d.current
    if room is None or room >= added:
        return d
    left = budget - used
    spend = (nodes + added) * seconds / 3600
    said = (
        f"budget of {budget:g} node-hours a day: {used:.2f} used today (UTC)"
        + (", spent" if left <= 0 else f", {left:.2f} left; {nodes + added} nodes for "
           f"{span(seconds)} would spend {spend:.2f}")
    )  # fmt: skip
    if room <= 0:
        reason = f"{d.reason}; held: {said}"
        return replace(d, target=d.current, action="none", reason=reason, memory=before)
    reason = f"{d.reason}; {said}: room for {room} more only"
    return replace(d, target=d.current + room, reason=reason)


def above_min(groups: Sequence[tuple[str, int, int]]) -> dict[str, int]:
    """(group, nodes, scale.min) -> group -> nodes above its minimum."""
    return {name: max(0, count - low) for name, count, low in groups}


# -- words ------------------------------------------------------------------------------------


def span(seconds: float) -> str:
    """A duration in words: 45 s, 4 min, 4 min 30 s, 2 h 5 min, 1 d 2 h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m} min" + (f" {r} s" if r else "")
    if s < 86400:
        h, r = divmod(s, 3600)
        return f"{h} h" + (f" {r // 60} min" if r // 60 else "")
    d, r = divmod(s, 86400)
    return f"{d} d" + (f" {r // 3600} h" if r // 3600 else "")


def clock(at: float) -> str:
    """A Unix time as HH:MM:SS UTC."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))
