"""The `crv` command line.

Exit codes are a contract: 0 success, 2 bad input (one line on stderr,
`error: <file>: <field>: <what is wrong>`, no traceback, nothing done).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from crv import __version__
from crv.appliance import load_appliance, parse_overrides
from crv.errors import CrvError
from crv.plan import Plan, expand
from crv.plan_view import describe
from crv.spec import json_schema

EXIT_BAD_INPUT = 2

app = typer.Typer(
    name="crv",
    help="Deploy virtual cluster appliances onto resource pools.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()

Directory = Annotated[
    Path, typer.Argument(metavar="DIR", help="An appliance directory (holds appliance.yaml).")
]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Set an appliance parameter."),
]
ClusterName = Annotated[
    str | None, typer.Option("--name", "-n", help="Cluster name (default: the appliance's name).")
]


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad input becomes one line on stderr and exit code 2."""
    try:
        yield
    except CrvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _plan(directory: Path, sets: list[str] | None, name: str | None) -> Plan:
    return expand(load_appliance(directory, parse_overrides(sets or [])), cluster=name)


@app.command()
def validate(directory: Directory, set_: Sets = None, name: ClusterName = None) -> None:
    """Check an appliance (and its plan) without provisioning anything."""
    with _user_errors():
        plan = _plan(directory, set_, name)
    a = plan.appliance
    print(
        f"ok: {a.source}: appliance {a.name}, {len(a.groups)} node groups, {len(a.roles)} roles, "
        f"{len(plan.nodes)} nodes, {plan.graph.number_of_nodes()} steps"
    )


@app.command()
def plan(
    directory: Directory,
    set_: Sets = None,
    name: ClusterName = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as one JSON object.")
    ] = False,
) -> None:
    """Print the DAG of steps a deploy would run, by levels, and its critical path."""
    with _user_errors():
        result = _plan(directory, set_, name)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
    else:
        console.print(describe(result))


@app.command()
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of appliance.yaml (for editors and linters)."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


def _version(value: bool) -> None:
    if value:
        print(f"crv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """crv: virtual cluster appliances, deployed as Prefect flows."""


def main() -> None:
    app()
