"""The guards' side of `crv autoscale enable/status`: a cluster's lease, idle_after and node-hours
budget (crv.engine.guards), read from the options and shown with their state."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

import typer

from crv.base.errors import SpecError

ON_LEASE = ("destroy", "shrink")
MAX_BUDGET = 1e9  # node-hours a day

Lease = Annotated[
    str | None,
    typer.Option(
        "--lease",
        metavar="DURATION",
        help="Destroy the cluster (or shrink it to its minimum: --on-lease shrink) this long "
        "from now, e.g. 8h; given again, it starts again; 0 clears it.",
    ),
]
NoLease = Annotated[bool, typer.Option("--no-lease", help="Clear the lease.")]
OnLease = Annotated[
    str | None,
    typer.Option("--on-lease", metavar="destroy|shrink", help="What the lease does (destroy)."),
]
IdleAfter = Annotated[
    str | None,
    typer.Option(
        "--idle-after",
        metavar="DURATION",
        help="Shrink every scaled group to its minimum after no work for this long, e.g. 30m "
        "(work: jobs waiting or running, a metric above 0); 0 clears it.",
    ),
]
NoIdleAfter = Annotated[bool, typer.Option("--no-idle-after", help="Clear idle_after.")]
Budget = Annotated[
    str | None,
    typer.Option(
        "--budget",
        metavar="NODE_HOURS",
        help="Node-hours a day (UTC): no growth that would spend more than is left; 0 clears it.",
    ),
]
NoBudget = Annotated[bool, typer.Option("--no-budget", help="Clear the budget.")]
WarnBefore = Annotated[
    str | None,
    typer.Option(
        "--warn-before",
        metavar="DURATION",
        help="Announce a guard's action (a Prefect event) this long before it (default 5m).",
    ),
]


def changes(
    lease: str | None,
    no_lease: bool,
    on_lease: str | None,
    idle_after: str | None,
    no_idle_after: bool,
    budget: str | None,
    no_budget: bool,
    warn_before: str | None,
) -> dict[str, Any]:
    """The guard settings the options change (none given: {}); a SpecError names the option."""
    out: dict[str, Any] = {}
    for option, text, clear, key in (
        ("--lease", lease, no_lease, "lease"),
        ("--idle-after", idle_after, no_idle_after, "idle_after"),
    ):
        if text is not None and clear:
            raise SpecError(option, text, f"give {option} or --no-{option[2:]}, not both")
        if clear:
            out[key] = None
        elif text is not None:
            out[key] = _duration(option, text) or None
    if on_lease is not None:
        if on_lease not in ON_LEASE:
            raise SpecError("--on-lease", on_lease, "must be destroy or shrink")
        out["on_lease"] = on_lease
    if budget is not None and no_budget:
        raise SpecError("--budget", budget, "give --budget or --no-budget, not both")
    if no_budget:
        out["budget"] = None
    elif budget is not None:
        out["budget"] = _node_hours(budget) or None
    if warn_before is not None:
        out["warn_before"] = _duration("--warn-before", warn_before)
    return out


def _duration(option: str, text: str) -> float:
    from crv.appliance.spec import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise SpecError(option, text, str(exc)) from None


def _node_hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= MAX_BUDGET:
        raise SpecError("--budget", text, f"must be a number of node-hours, 0 to {MAX_BUDGET:g}")
    return value


def state(setting: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """The guards of `setting` (the admin API's guards of a cluster) and their state, as
    `crv autoscale status --json` shows them under "guards"."""
    from crv.engine.guards import Settings, notices_of

    s = Settings.of(setting)
    used = float(usage["node_hours"])
    lease = None
    if s.lease is not None and s.lease_from is not None:
        ends = s.lease_from + s.lease
        lease = {"seconds": s.lease, "on_lease": s.on_lease, "set_at": s.lease_from,
                 "ends_at": ends, "ended": ends <= float(usage["until"])}  # fmt: skip
    idle = None
    if s.idle_after is not None:
        since = s.idle_since(setting.get("work_seen"))
        idle = {"seconds": s.idle_after, "idle_since": since,
                "shrinks_from": None if since is None else since + s.idle_after}  # fmt: skip
    budget = None
    if s.budget is not None:
        budget = {"node_hours": s.budget, "used_today": used, "left": s.budget - used}
    notices = [
        {"guard": n.guard, "action": n.action, "announced": n.announced, "acts_at": n.acts_at,
         "text": n.text}
        for n in notices_of(setting.get("notices")).values()
    ]  # fmt: skip
    return {
        "lease": lease,
        "idle_after": idle,
        "budget": budget,
        "warn_before": s.warn_before,
        "notices": notices,
    }


def today(usage: dict[str, Any]) -> dict[str, Any]:
    """The day's usage as `crv autoscale status --json` shows it (the ledger's rows left out)."""
    running = sum(1 for r in usage["nodes"] if r["ended"] is None)
    return {"since": usage["since"], "until": usage["until"],
            "node_hours": usage["node_hours"], "nodes_now": running}  # fmt: skip


def lines(guards: dict[str, Any], usage: dict[str, Any]) -> list[str]:
    """`crv autoscale status`'s lines on the guards and the day's node-hours."""
    from crv.engine.guards import span

    out = []
    now = float(usage["until"])
    lease, idle, budget = guards["lease"], guards["idle_after"], guards["budget"]
    if lease or idle or budget:
        out.append(f"guards (announced {span(guards['warn_before'])} before they act):")
    if lease:
        what = "destroy the cluster" if lease["on_lease"] == "destroy" else "shrink to min"
        ends = lease["ends_at"]
        when = f"ended at {_time(ends)}" if lease["ended"] else (
            f"ends at {_time(ends)}, in {span(ends - now)}"
        )  # fmt: skip
        out.append(f"  lease {span(lease['seconds'])} ({what}): {when}")
    if idle:
        since = idle["idle_since"]
        said = "no work seen yet" if since is None else f"no work seen since {_time(since)}"
        if since is not None:
            said += f"; shrink to min from {_time(idle['shrinks_from'])} at the earliest"
        out.append(f"  idle after {span(idle['seconds'])}: {said}")
    if budget:
        out.append(
            f"  budget {budget['node_hours']:g} node-hours a day: {budget['used_today']:.2f} "
            f"used today (UTC), {max(0.0, budget['left']):.2f} left"
        )
    for n in guards["notices"]:
        out.append(f"  announced at {_time(n['announced'])}: {n['guard']}: {n['text']}")
    day = today(usage)
    out.append(f"node-hours today (UTC): {day['node_hours']:.2f} ({day['nodes_now']} nodes now)")
    return out


def summary(setting: dict[str, Any]) -> str:
    """One line on what `enable` set."""
    from crv.engine.guards import Settings, span

    s = Settings.of(setting)
    said = []
    if s.lease is not None and s.lease_from is not None:
        said.append(f"lease {span(s.lease)} ({s.on_lease} at {_time(s.lease_from + s.lease)})")
    if s.idle_after is not None:
        said.append(f"idle after {span(s.idle_after)}")
    if s.budget is not None:
        said.append(f"budget {s.budget:g} node-hours a day (UTC)")
    if not said:
        return "guards: none"
    return f"guards: {', '.join(said)}; announced {span(s.warn_before)} before they act"


def _time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))
