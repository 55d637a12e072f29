"""Serving the deployments: register them with the Prefect server and run their flow runs.

`crv up` runs this as its third background process (`python -m deployments`), `crv serve` in
the foreground. Both need `PREFECT_API_URL` (and `CRV_HOME`) in the environment before Prefect is
imported; every flow run is a child process that inherits that environment, so a run started
from the UI, a schedule or the API finds the same crv home as the CLI.

A deployment registered again (each start) keeps what people set on the server: its schedules
(`prefect deployment schedule create`, the UI) and whether it is paused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deployments import build

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

POLL_SECONDS = 2.0  # how soon a run created through the UI or the API starts


def keep_server_settings(deployments: list[RunnerDeployment]) -> None:
    """Registering replaces a deployment's schedules and its paused flag with the ones given:
    leave the schedules out of the update and carry the paused flag over."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(d.full_name)
            except ObjectNotFound:
                continue
            d.paused = existing.paused
            # an update sends the fields that were set: `schedules` (set to [] by
            # to_deployment) would replace the server's with none
            d.model_fields_set.discard("schedules")


def serve() -> None:
    """Register the deployments and run their flow runs until SIGTERM or Ctrl-C."""
    from prefect import serve as prefect_serve

    deployments = build()
    keep_server_settings(deployments)
    prefect_serve(
        *deployments,
        pause_on_shutdown=False,  # a schedule should survive `crv down` / `crv up`
        print_starting_message=True,
        query_seconds=POLL_SECONDS,
    )
