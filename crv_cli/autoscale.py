"""`crv autoscale ...`: autoscaling of node groups that have a `scaling` section."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from crv.base.errors import SpecError
from crv.base.flock import exclusive
from crv_cli import common, guards

if TYPE_CHECKING:
    from crv.appliance.loader import Appliance, Group
    from crv.base.home import Home
    from crv.engine.autoscale import Decision
    from crv.engine.jobsim import Replay
    from crv.service.client import Service
    from crv.service.models import ClusterStatus
    from crv_cli import daemons

autoscale_app = typer.Typer(
    no_args_is_help=True, help="Autoscaling: node groups sized by a metric (their `scaling`)."
)


MIN_EVERY, MAX_EVERY = 5.0, 86400.0  # the autoscale schedule's interval, seconds
DEPLOYMENT_WAIT = 60.0  # seconds `enable` waits for the serve process to add the deployment


@autoscale_app.command("simulate")
def simulate(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="An appliance directory (holds appliance.yaml).")
    ],
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace", metavar="FILE.csv", help="SECONDS,VALUE rows of the metric (a metric group)."
        ),
    ] = None,
    jobs: Annotated[
        Path | None,
        typer.Option(
            "--jobs",
            metavar="FILE.csv",
            help="SUBMIT,NODES,RUNTIME rows of batch jobs, seconds (a group scaled by a queue).",
        ),
    ] = None,
    boot: Annotated[
        str | None,
        typer.Option("--boot", help="With --jobs: how long a new node boots, e.g. 90s (60s)."),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option("--group", "-g", help="The node group (default: the only one with scaling)."),
    ] = None,
    every: Annotated[
        str, typer.Option("--every", help="The schedule's interval, e.g. 60s, 5m.")
    ] = "60s",
    start: Annotated[
        int | None, typer.Option("--start", help="Nodes at the start (default: the group's count).")
    ] = None,
    most: Annotated[
        int | None,
        typer.Option("--max", help="What if scale.max were this (default: the group's)."),
    ] = None,
    plot_file: Annotated[
        Path | None,
        typer.Option(
            "--plot", metavar="OUT.png", help="Draw the metric (or the queue) and the nodes."
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Set an appliance parameter."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Replay a recorded metric trace (--trace), or a batch job trace (--jobs) through a simulated
    queue, against a group's scaling policy on a simulated clock (no machines): every decision,
    the node count over time (with --jobs: node-hours, waits), and optionally a PNG plot."""
    from dataclasses import replace

    from crv.appliance.loader import load_appliance, parse_overrides
    from crv.appliance.spec import MAX_NODES
    from crv.engine import autoscale

    with common.user_errors():
        if (trace is None) == (jobs is None):
            raise SpecError(
                "crv autoscale simulate",
                "",
                "give exactly one of --trace FILE.csv (a metric trace) or --jobs FILE.csv (a "
                "job trace)",
            )
        if boot is not None and jobs is None:
            raise SpecError("--boot", boot, "only with --jobs FILE.csv")
        appliance = load_appliance(directory, parse_overrides(sets or []))
        chosen = _scaled_group(appliance, group)
        if most is not None:
            if not chosen.scale_min <= most <= MAX_NODES:
                limits = f"between the group's scale.min {chosen.scale_min} and {MAX_NODES}"
                raise SpecError("--max", str(most), f"must be {limits}")
            chosen = replace(chosen, scale_max=most)
        seconds = interval("--every", every, least=0.001)
        assert chosen.scaling is not None
        if jobs is not None:
            if chosen.scaling.queue is None:
                raise SpecError(
                    "--jobs",
                    str(jobs),
                    f"group {chosen.name} is scaled by a metric: replay a metric trace with "
                    "--trace FILE.csv",
                )
            boot_seconds = interval("--boot", "60s" if boot is None else boot, least=0.0)
            title = f"{appliance.name}: {chosen.name} ({jobs.name}, max {chosen.scale_max}, "
            title += f"every {seconds:g} s, boot {boot_seconds:g} s)"
            replayed = _replay_jobs(appliance.name, chosen, jobs, seconds, boot_seconds, start)
            _plot_jobs(replayed, plot_file, title)
        elif chosen.scaling.queue is not None:
            raise SpecError(
                "--trace",
                str(trace),
                f"group {chosen.name} is scaled by a queue: replay a job trace with "
                "--jobs FILE.csv",
            )
    if jobs is not None:
        _print_jobs(chosen.name, replayed, seconds, boot_seconds, as_json)
        if plot_file is not None and not as_json:
            print(f"plot: {plot_file}")
        return
    assert trace is not None
    with common.user_errors():
        readings = autoscale.read_trace(trace)
        decisions = autoscale.replay(
            chosen.scaling,
            chosen.scale_min,
            chosen.scale_max,
            chosen.count if start is None else start,
            readings,
            seconds,
        )
        if plot_file is not None:
            title = f"{appliance.name}: {chosen.name} ({trace.name}, every {every})"
            try:
                autoscale.plot(decisions, plot_file, title)
            except OSError as exc:
                raise SpecError("--plot", str(plot_file), exc.strerror or str(exc)) from None
    summary = _summary(chosen.name, decisions)
    if as_json:
        rows = [d.row() for d in decisions]
        sys.stdout.write(json.dumps({**summary, "decisions": rows}) + "\n")
        return
    _print_replay(decisions, summary, every)
    if plot_file is not None:
        print(f"plot: {plot_file}")


def _replay_jobs(
    cluster: str, chosen: Group, path: Path, every: float, boot: float, start: int | None
) -> Replay:
    """The job trace at `path` replayed through the group's queue policy (crv.engine.jobsim)."""
    from crv.engine import jobsim

    assert chosen.scaling is not None
    trace = jobsim.read_jobs(path)
    try:
        return jobsim.simulate(
            chosen.scaling,
            chosen.scale_min,
            chosen.scale_max,
            chosen.count if start is None else start,
            trace,
            every,
            boot,
            name=f"{cluster}-{chosen.name}",
        )
    except ValueError as exc:  # more decisions than a replay takes
        raise SpecError("--every", f"{every:g} s", str(exc)) from None


def _plot_jobs(replayed: Replay, plot_file: Path | None, title: str) -> None:
    from crv.engine import jobsim

    if plot_file is None:
        return
    try:
        jobsim.plot(replayed, plot_file, title)
    except OSError as exc:
        raise SpecError("--plot", str(plot_file), exc.strerror or str(exc)) from None


def _print_jobs(group: str, replayed: Replay, every: float, boot: float, as_json: bool) -> None:
    f = replayed.figures
    if as_json:
        doc = {
            "group": group,
            "every": every,
            "boot": boot,
            "figures": f.as_dict(),
            "decisions": [{**d.row(), "remove": list(d.remove)} for d in replayed.decisions],
            "jobs": [r.row() for r in replayed.jobs],
        }
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    actions = [d for d in replayed.decisions if d.action != "none"]
    if actions:
        table = Table("time", "nodes", "wanted", "action", "reason", box=None)
        for d in actions:
            table.add_row(
                _clock(d.at), f"{d.current}->{d.target}", str(d.desired), d.action, d.reason
            )
        common.console.print(table)
    never = f"; {f.never_started} never started (more nodes than the group can have)"
    print(
        f"{f.jobs} jobs{never if f.never_started else ''}; every {every:g} s, boot {boot:g} s; "
        f"the group settled at {_clock(f.end)}"
    )
    ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
    print(
        f"node-hours {f.node_hours:.2f} (booting nodes included, until {_clock(f.until)}: the "
        f"last job's end), minimum {f.minimum:.2f} (the jobs' nodes x runtime): {ratio}"
    )
    waits = "-" if f.mean_wait is None else f"mean {f.mean_wait:.0f} s, max {f.max_wait:.0f} s"
    reaction = "-" if f.reaction is None else f"{f.reaction:.0f} s"
    print(f"wait {waits}; first pending job to the first job on a new node: {reaction}")
    print(
        f"{f.actions} scale actions ({f.grow} grow, {f.shrink} shrink, {f.direction_changes} "
        f"direction changes); nodes up to {f.peak_nodes}, {f.final_nodes} at the end"
    )


def _scaled_group(appliance: Appliance, group: str | None) -> Group:
    """The group `--group` names, or the only one with a scaling section."""
    scaled = appliance.scaled
    if group is None:
        if len(scaled) != 1:
            names = ", ".join(g.name for g in scaled) or "none has a scaling section"
            raise SpecError("--group", "", f"name the node group ({names})")
        return scaled[0]
    found = appliance.groups.get(group)
    if found is None or found.scaling is None:
        names = ", ".join(g.name for g in scaled) or "none"
        raise SpecError("--group", group, f"no scaling section (groups with one: {names})")
    return found


def _summary(group: str, decisions: list[Decision]) -> dict[str, int | str]:
    from crv.engine.autoscale import direction_changes

    return {
        "group": group,
        "ticks": len(decisions),
        "grow": sum(d.action == "grow" for d in decisions),
        "shrink": sum(d.action == "shrink" for d in decisions),
        "direction_changes": direction_changes(decisions),
        "min_nodes": min(d.target for d in decisions),
        "max_nodes": max(d.target for d in decisions),
        "final_nodes": decisions[-1].target,
    }


def _print_replay(decisions: list[Decision], summary: dict[str, int | str], every: str) -> None:
    table = Table("time", "metric", "nodes", "desired", "action", "reason", box=None)
    for d in decisions:
        if d.action != "none" or d is decisions[0] or d is decisions[-1]:
            metric = "-" if d.metric is None else f"{d.metric:g}"
            table.add_row(
                _clock(d.at), metric, f"{d.current}->{d.target}" if d.action != "none"
                else str(d.current), str(d.desired), d.action, d.reason,
            )  # fmt: skip
    common.console.print(table)
    changes = sum(d.action != "none" for d in decisions)
    print(
        f"{summary['ticks']} decisions every {every}: {changes} changes "
        f"({summary['grow']} grow, {summary['shrink']} shrink, "
        f"{summary['direction_changes']} direction changes); nodes "
        f"{summary['min_nodes']}-{summary['max_nodes']}, {summary['final_nodes']} at the end"
    )


def interval(option: str, text: str, least: float = MIN_EVERY) -> float:
    """A schedule interval from `60s`, `5m`, `1h` or seconds; a SpecError naming the option."""
    from crv.appliance.spec import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise SpecError(option, text, str(exc)) from None
    if not least <= seconds <= MAX_EVERY:
        raise SpecError(option, text, f"must be between {least:g} s and {MAX_EVERY:g} s")
    return seconds


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


ClusterArg = Annotated[str, typer.Argument(metavar="NAME", help="Cluster name.")]


def _cluster(
    name: str, command: str
) -> tuple[Home, daemons.Endpoints, Service, ClusterStatus, Appliance]:
    """(home, endpoints, service, status, appliance) of a cluster whose appliance has a scaling
    section; a SpecError (exit 2) otherwise."""
    from crv.appliance.loader import NOT_SCALED, load_recorded
    from crv.service.client import Service

    home = common.home()
    endpoints = common.ensure_up(home)
    service = Service(home, endpoints.service_url)
    status = service.status(name)
    if status is None:
        raise SpecError(f"crv autoscale {command}", "NAME", f"no cluster {name!r}")
    loaded = load_recorded(status["source"], status["parameters"] or {}, status.get("counts") or {})
    if not loaded.scaled:
        raise SpecError(loaded.source, "nodes", NOT_SCALED)
    return home, endpoints, service, status, loaded


def _remove_deployment(name: str) -> bool:
    """Remove `autoscale/<name>` the way the serve process does; whether it was there."""
    import asyncio

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from deployments.serve import remove_deployment

    async def remove() -> bool:
        async with get_client() as client:
            try:
                found = await client.read_deployment_by_name(f"autoscale/{name}")
            except ObjectNotFound:
                return False
            await remove_deployment(client, found)
            return True

    return asyncio.run(remove())


def _deployment(name: str) -> Any:
    """The `autoscale/<name>` deployment on the Prefect server, or None."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"autoscale/{name}")
        except ObjectNotFound:
            return None


@autoscale_app.command("enable")
def enable(
    name: ClusterArg,
    every: Annotated[
        str, typer.Option("--every", help="How often the autoscale flow runs, e.g. 60s, 5m.")
    ] = "60s",
    lease: guards.Lease = None,
    no_lease: guards.NoLease = False,
    on_lease: guards.OnLease = None,
    idle_after: guards.IdleAfter = None,
    no_idle_after: guards.NoIdleAfter = False,
    budget: guards.Budget = None,
    no_budget: guards.NoBudget = False,
    warn_before: guards.WarnBefore = None,
) -> None:
    """Autoscale a cluster: a scheduled Prefect deployment `autoscale/NAME` runs the autoscale
    flow every interval (pause it in the Prefect UI; `crv autoscale disable` removes it). Its
    guards (a lease, idle_after, a node-hours budget) are enforced by the same runs; the options
    given change them, the others stay as they are."""
    import time

    from crv_cli import daemons
    from deployments.serve import _interval

    with common.user_errors():
        seconds = interval("--every", every)
        changes = guards.changes(
            lease, no_lease, on_lease, idle_after, no_idle_after, budget, no_budget, warn_before
        )
        home, endpoints, service, _, _ = _cluster(name, "enable")
        daemons.ensure_served(home, endpoints)
        with exclusive(home.autoscale_lock):  # not in the middle of a pass (deployments.serve)
            setting = service.put_guards(name, changes) if changes else None
            service.put_autoscaling(name, True, seconds)
        deadline = time.monotonic() + DEPLOYMENT_WAIT
        while True:  # the serve process adds the deployment (deployments.serve)
            found = _deployment(name)
            if found is not None and _interval(found) == seconds:
                break
            if time.monotonic() > deadline:
                raise daemons.DaemonError(
                    f"the deployment autoscale/{name} did not appear within "
                    f"{DEPLOYMENT_WAIT:g} s; is `crv up` serving? (see {home.prefect_dir})"
                )
            time.sleep(0.5)
        if found.paused:
            from prefect import get_client

            with get_client(sync_client=True) as client:
                client.resume_deployment(found.id)
    print(f"autoscaling {name} every {seconds:g} s: deployment autoscale/{name}")
    if setting is not None:
        print(guards.summary(setting))
    print(f"watch it: {endpoints.prefect_ui_url}/deployments/deployment/{found.id}")


@autoscale_app.command("disable")
def disable(name: ClusterArg) -> None:
    """Stop autoscaling a cluster: its `autoscale/NAME` deployment and schedule are removed
    (its recorded decisions are kept; the cluster keeps its current size)."""
    with common.user_errors():
        home, _, service, _, _ = _cluster(name, "disable")  # sets up this process's Prefect
        # under the lock: a pass of the serve process that read "enabled" before this change
        # would make the deployment again after it was deleted (deployments.serve)
        with exclusive(home.autoscale_lock):
            setting = service.autoscaling(name)[0]
            service.put_autoscaling(name, False, setting.get("every") or 60.0)
            found = _remove_deployment(name)
    removed = f" (autoscale/{name} removed)" if found else ""
    print(f"autoscaling of {name} disabled{removed}")


@autoscale_app.command("run")
def run_now(
    name: ClusterArg,
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait",
            help="Seconds to wait for another change of the cluster to end (default: as long "
            "as it takes; 0: skip at once, as the schedule's runs do).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """One autoscale pass now, in this process: every scaled group decides from its metric or
    queue (and acts), as a scheduled run of `autoscale/NAME` does; prints the decisions. It
    needs no `crv autoscale enable`."""
    import asyncio
    from collections.abc import Coroutine
    from typing import cast

    from prefect.client.schemas.objects import State

    from crv_cli.approval import announce_waits

    with common.user_errors():
        _, endpoints, _, _, _ = _cluster(name, "run")
    from flows.autoscale import autoscale

    announce_waits(endpoints.prefect_ui_url)  # a shrink that waits for approval says so

    run = autoscale(name=name, wait=wait, return_state=True)
    state = asyncio.run(cast("Coroutine[Any, Any, State[dict[str, Any]]]", run))
    if not state.is_completed():
        print(f"error: autoscale of {name} failed: {common.reason(state)}", file=sys.stderr)
        raise typer.Exit(1)
    result = state.result()
    if as_json:
        print(json.dumps(result))
        return
    for d in result["decisions"]:
        nodes = f"{d['current']}->{d['target']}" if d["action"] != "none" else str(d["current"])
        outcome = f"; {d['outcome']}" if d.get("outcome") else ""
        print(f"{d['group']}: {d['action']} ({nodes} nodes): {d['reason']}{outcome}")


@autoscale_app.command("status")
def status(
    name: ClusterArg,
    last: Annotated[int, typer.Option("--last", help="How many decisions to show.", min=1)] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Whether a cluster autoscales, its scaled groups and its latest decisions."""
    with common.user_errors():
        _, endpoints, service, found, loaded = _cluster(name, "status")
        setting = service.autoscaling(name)[0]
        deployment = _deployment(name)
        decisions = service.decisions(name, limit=last)
        usage = service.usage(name)
        guarded = service.guards(name)
    groups = [
        {
            "group": g.name,
            "nodes": sum(1 for n in found["nodes"] if n["group"] == g.name),
            "min": g.scale_min,
            "max": g.scale_max,
            "metric": _metric_text(g.scaling),
        }
        for g in loaded.groups.values()
        if g.scaling is not None
    ]
    out = {
        "cluster": name,
        "enabled": bool(setting["enabled"]),
        "every": setting["every"],
        "deployment": f"autoscale/{name}" if deployment is not None else None,
        "paused": None if deployment is None else bool(deployment.paused),
        "groups": groups,
        "decisions": decisions,
        "guards": guards.state(guarded, usage),
        "usage": guards.today(usage),
    }
    if as_json:
        sys.stdout.write(json.dumps(out) + "\n")
        return
    state = "enabled" if out["enabled"] else "disabled"
    if out["enabled"]:
        state += f", every {out['every']:g} s"
        state += ", paused in Prefect" if out["paused"] else ""
        state += "" if deployment else " (deployment not there yet)"
    print(f"cluster {name}: autoscaling {state}")
    if deployment is not None:
        print(f"deployment: {endpoints.prefect_ui_url}/deployments/deployment/{deployment.id}")
    for g in groups:
        print(f"  {g['group']}: {g['nodes']} nodes ({g['min']}-{g['max']}), metric {g['metric']}")
    for line in guards.lines(out["guards"], usage):
        print(line)
    table = Table("time", "group", "metric", "nodes", "wanted", "action", "reason", "outcome")
    for d in decisions:
        metric = "-" if d["metric"] is None else f"{d['metric']:g}"
        nodes = f"{d['current']}->{d['target']}" if d["action"] != "none" else str(d["current"])
        table.add_row(
            _time(d["at"]), d["group"], metric, nodes, str(d["desired"]), d["action"],
            d["reason"], d["outcome"] or "",
        )  # fmt: skip
    if decisions:
        common.console.print(table)
    else:
        print("no decisions yet")


def _metric_text(scaling: Any) -> str:
    if scaling.queue is not None:
        q = scaling.queue
        return f"the queue of {q.role}, {q.jobs_per_node} waiting jobs per node"
    m = scaling.metric
    if m.attribute is not None:
        where = f"{m.attribute.aggregate} of {m.attribute.role}.{m.attribute.key}"
    else:
        where = m.http
    p = scaling.policy
    if p.target_per_node is not None:
        return f"{where}, {p.target_per_node:g} per node"
    return f"{where}, per node {p.scale_down_below:g}-{p.scale_up_above:g}"


def _time(at: float) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(at))
