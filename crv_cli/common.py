"""What the `crv` commands share: the consoles, bad input as one line and exit code 2, the
CRV_HOME in use, and starting the daemons a command needs."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from crv.base.errors import CrvError
from crv.base.home import Home
from crv.service.pki import node_ttl_from_env
from crv_cli import daemons

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

EXIT_BAD_INPUT = 2
console = Console()
err_console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input becomes one line on stderr and exit code 2."""
    try:
        yield
    except CrvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def home() -> Home:
    return Home.from_env()


def ensure_up(home: Home, *, quiet: bool = False) -> daemons.Endpoints:
    """Start the Prefect server and the service if they are not running, and point this
    process's Prefect client at them (before the first Prefect import)."""
    daemons.prefect_settings()  # a refused CRV_PREFECT_HOST/AUTH: one line, before anything
    node_ttl_from_env()  # a bad CRV_NODE_CERT_TTL is bad input, before anything starts
    endpoints = daemons.running(home)
    if endpoints is None:
        if not quiet:
            err_console.print(f"starting the crv service and a Prefect server in {home.root} ...")
        endpoints = daemons.up(home)
    else:
        daemons.ensure_boot_services(home)  # a bare-metal pool added since `crv up`
    os.environ.update(daemons.prefect_env(home, endpoints.prefect_api_url))
    return endpoints


def reason(state: State[Any]) -> str:
    """A flow run's own one-line error, without Prefect's "Flow run encountered..." wrapping."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:
        error = None
    if isinstance(error, CrvError):
        return str(error)
    # a run followed from here (--idempotency-key) has Prefect's message only
    message = re.sub(r"^Flow run encountered an exception: \w+: ", "", state.message or "")
    return message or state.name or "failed"
