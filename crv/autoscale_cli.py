"""`crv autoscale ...`: autoscaling of node groups that have a `scaling` section."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from crv.errors import SpecError

autoscale_app = typer.Typer(
    no_args_is_help=True, help="Autoscaling: node groups sized by a metric (their `scaling`)."
)


def _cli() -> Any:
    from crv import cli  # the shared helpers; imported late (crv.cli imports this module)

    return cli


@autoscale_app.command("simulate")
def simulate(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="An appliance directory (holds appliance.yaml).")
    ],
    trace: Annotated[
        Path, typer.Option("--trace", metavar="FILE.csv", help="SECONDS,VALUE rows of the metric.")
    ],
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
    plot_file: Annotated[
        Path | None,
        typer.Option("--plot", metavar="OUT.png", help="Draw the metric and node count."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Set an appliance parameter."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Replay a recorded metric trace against a group's scaling policy on a simulated clock (no
    machines): every decision, the node count over time, and optionally a PNG plot."""
    from crv import autoscale
    from crv.appliance import load_appliance, parse_overrides
    from crv.spec import parse_duration

    cli = _cli()
    with cli._user_errors():
        appliance = load_appliance(directory, parse_overrides(sets or []))
        scaled = [g for g in appliance.groups.values() if g.scaling is not None]
        if group is None:
            if len(scaled) != 1:
                names = ", ".join(g.name for g in scaled) or "none has a scaling section"
                raise SpecError("--group", "", f"name the node group ({names})")
            chosen = scaled[0]
        else:
            found = appliance.groups.get(group)
            if found is None or found.scaling is None:
                names = ", ".join(g.name for g in scaled) or "none"
                raise SpecError("--group", group, f"no scaling section (groups with one: {names})")
            chosen = found
        try:
            interval = parse_duration(every)
        except ValueError as exc:
            raise SpecError("--every", every, str(exc)) from None
        if interval <= 0:
            raise SpecError("--every", every, "must be more than 0 s")
        readings = autoscale.read_trace(trace)
        assert chosen.scaling is not None
        decisions = autoscale.replay(
            chosen.scaling,
            chosen.scale_min,
            chosen.scale_max,
            chosen.count if start is None else start,
            readings,
            interval,
        )
        if plot_file is not None:
            title = f"{appliance.name}: {chosen.name} ({trace.name}, every {every})"
            try:
                autoscale.plot(decisions, plot_file, title)
            except OSError as exc:
                raise SpecError("--plot", str(plot_file), exc.strerror or str(exc)) from None
    actions = [d for d in decisions if d.action != "none"]
    summary = {
        "group": chosen.name,
        "ticks": len(decisions),
        "grow": sum(d.action == "grow" for d in decisions),
        "shrink": sum(d.action == "shrink" for d in decisions),
        "direction_changes": autoscale.direction_changes(decisions),
        "min_nodes": min(d.target for d in decisions),
        "max_nodes": max(d.target for d in decisions),
        "final_nodes": decisions[-1].target,
    }
    if as_json:
        rows = [d.row() for d in decisions]
        sys.stdout.write(json.dumps({**summary, "decisions": rows}) + "\n")
        return
    table = Table("time", "metric", "nodes", "desired", "action", "reason", box=None)
    for d in decisions:
        if d.action != "none" or d is decisions[0] or d is decisions[-1]:
            metric = "-" if d.metric is None else f"{d.metric:g}"
            table.add_row(
                _clock(d.at), metric, f"{d.current}->{d.target}" if d.action != "none"
                else str(d.current), str(d.desired), d.action, d.reason,
            )  # fmt: skip
    cli.console.print(table)
    print(
        f"{summary['ticks']} decisions every {every}: {len(actions)} changes "
        f"({summary['grow']} grow, {summary['shrink']} shrink, "
        f"{summary['direction_changes']} direction changes); nodes "
        f"{summary['min_nodes']}-{summary['max_nodes']}, {summary['final_nodes']} at the end"
    )
    if plot_file is not None:
        print(f"plot: {plot_file}")


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:d}:{whole // 60 % 60:02d}:{whole % 60:02d}"
