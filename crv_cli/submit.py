"""Changes requested once: a run created through a served deployment with an idempotency key,
then followed from this terminal until it ends (`crv deploy --idempotency-key KEY`).

Prefect keeps one flow run per flow and idempotency key (`create_flow_run_from_deployment`
answers 201 for a new run, 200 with the run already made), so a request that is submitted twice
(a retried command, a script run again, another system's retried API call) gives the same run
and the same cluster, whether the first is still running or has ended. As Stripe's API does,
the same key with other parameters is refused instead of silently answered with the first
request's run. Without a key `crv deploy` runs the flow in its own process (crv_cli.main).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from crv.appliance.loader import locate
from crv.base.errors import SpecError
from crv_cli.common import err_console

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

OPTION = "--idempotency-key"
KEY = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, no spaces: it is shown and logged
POLL_SECONDS = 1.0


def checked_key(key: str) -> str:
    if not KEY.fullmatch(key):
        raise SpecError(OPTION, "", "1 to 200 printable ASCII characters without spaces")
    return key


def catalog_name(directory: str) -> str:
    """The catalog name the served deployment knows `directory` by; the deployment runs only
    appliances of the catalog (its form's choices)."""
    path = locate(directory).resolve()
    if path.name and locate(path.name).resolve() == path:
        return path.name
    raise SpecError(
        OPTION,
        "",
        f"{directory} is not an appliance of the catalog: a run through the deploy-appliance "
        "deployment takes a catalog name (add its folder to CRV_APPLIANCE_PATH)",
    )


@dataclass(frozen=True)
class Submitted:
    run: FlowRun
    new: bool  # False: the key's run existed already (still running, or ended)


async def submit(deployment: str, parameters: Mapping[str, Any], key: str) -> Submitted:
    """Create (or find) the run of `deployment` for `key`; a refused request (a parameter the
    deployment's schema rejects, the key used for other parameters) is a SpecError."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.client.schemas.objects import FlowRun
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            found = await client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise SpecError(
                OPTION, "", f"the deployment {deployment} is not served (run `crv up`)"
            ) from None
        body = DeploymentFlowRunCreate(parameters=dict(parameters), idempotency_key=key)
        answer = await client.request(
            "POST",
            "/deployments/{id}/create_flow_run",
            path_params={"id": found.id},
            json=body.model_dump(mode="json", exclude_unset=True),
        )
    if answer.status_code >= 400:
        detail = (
            answer.json().get("detail", answer.text) if answer.content else answer.reason_phrase
        )
        raise SpecError(deployment, "parameters", str(detail))
    run = FlowRun.model_validate(answer.json())
    other = sorted(k for k, v in parameters.items() if run.parameters.get(k) != v)
    if other:
        raise SpecError(
            OPTION,
            key,
            f"already names run {run.name} ({run.id}) of other parameters ({', '.join(other)}); "
            "a new request needs a new key",
        )
    return Submitted(run, new=answer.status_code == 201)


async def follow(run: FlowRun, label: str) -> FlowRun:
    """Wait for `run` to end, showing its state; the ended run."""
    from prefect import get_client

    async with get_client() as client:
        with err_console.status(f"{label}: {run.state_name}") as shown:
            while True:
                run = await client.read_flow_run(run.id)
                state = run.state
                if state is not None and state.is_final():
                    return run
                shown.update(f"{label}: {run.state_name}")
                await asyncio.sleep(POLL_SECONDS)
