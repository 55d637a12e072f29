"""Prefect deployments: schedules, typed run forms and entry points for the flows; no logic.

`build()` returns the deployments `crv up` serves (`crv serve` in the foreground):
`deploy-appliance/crv`, `scale-role/crv`, `destroy-cluster/crv` and `repair-cluster/crv`.
`autoscale_deployment()` builds the per-cluster `autoscale/<cluster>` ones that the serve process
adds while it runs, for the clusters with autoscaling enabled (deployments.serve).

With a work pool (CRV_WORK_POOL, `build(work_pool=...)`) the same deployments are registered to
that Prefect work pool instead, for `crv worker` / `prefect worker start --pool NAME` to run on
any machine where crv is installed: their entry points are module paths (`flows.deploy.
deploy_appliance`, imported from the installed package; no code storage, no pull steps), they
carry the tag `crv-worker`, and their runs send a heartbeat every HEARTBEAT_SECONDS (a job
variable, so a bare `prefect worker start` gives it too), by which the server marks Crashed a
run whose worker died (deployments.serve.ensure_crash_detection).
Each enforces its parameter schema, completed by `deployments.forms` from the catalog and the
pools, so the Prefect UI renders a real form and the API refuses bad input when a run is
created. `DEPLOYMENTS` is the list to extend.

Importing this package does not import Prefect: Prefect reads its settings when first
imported, so the caller sets `PREFECT_API_URL` and `PREFECT_HOME` first (`crv_cli.daemons`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployments import forms

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

NAME = "crv"  # every deployment is <flow name>/crv
TAGS = ["crv"]
WORKER_TAG = "crv-worker"  # the deployments of a work pool, and so their runs (module doc)

Form = Callable[[forms.Schema, Mapping[str, forms.CatalogEntry], list[str]], forms.Schema]


@dataclass(frozen=True)
class Spec:
    """One deployment: its flow's name, where the flow is, what the UI says about it and how
    its run form is completed."""

    flow_name: str
    flow: str  # "module:attribute"
    description: str
    form: Form
    catalog_in_description: bool = True

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{NAME}"


DEPLOYMENTS: list[Spec] = [
    Spec(
        "deploy-appliance",
        "flows.deploy:deploy_appliance",
        "Deploy an appliance from the catalog onto a resource pool: provision, certify, "
        "contextualize and verify every node. Run again for the same cluster name, it "
        "converges: finishes what is missing, keeps a resized cluster's counts.",
        lambda schema, entries, pools: forms.deploy_form(schema, entries, pools),
    ),
    Spec(
        "scale-role",
        "flows.scale:scale_role",
        "Resize one node group of a running cluster: new nodes go through every step, the "
        "roles that read the group run again, removed nodes (newest first) are destroyed and "
        "their certificates revoked.",
        lambda schema, entries, pools: forms.scale_form(schema, entries),
    ),
    Spec(
        "destroy-cluster",
        "flows.destroy:destroy_cluster",
        "Remove every node of a cluster and revoke all its certificates.",
        lambda schema, entries, pools: forms.destroy_form(schema, pools),
        catalog_in_description=False,
    ),
    Spec(
        "repair-cluster",
        "flows.repair:repair_cluster",
        "Bring a cluster back to its records: destroy the nodes its pools hold for it that crv "
        "has no record of, make again the nodes missing from their pools (through every step), "
        "and re-run the roles that read them.",
        lambda schema, entries, pools: forms.repair_form(schema),
        catalog_in_description=False,
    ),
]


def names() -> list[str]:
    """`<flow name>/<deployment name>` of every deployment (without importing Prefect)."""
    return [spec.full_name for spec in DEPLOYMENTS]


def on_work_pool(work_pool: str | None) -> dict[str, Any]:
    """What `to_deployment` takes to put a deployment on `work_pool` (module doc); nothing for a
    served one."""
    if work_pool is None:
        return {}
    from prefect.types.entrypoint import EntrypointType

    from crv.base.running import HEARTBEAT_SECONDS

    return {
        "work_pool_name": work_pool,
        "entrypoint_type": EntrypointType.MODULE_PATH,
        "job_variables": {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}},
    }


def build(
    catalog: Mapping[str, forms.CatalogEntry] | None = None, *, work_pool: str | None = None
) -> list[RunnerDeployment]:
    """The RunnerDeployments, their forms completed from the catalog and the known pools;
    served, or on `work_pool` (module doc)."""
    from prefect.utilities.callables import ParameterSchema
    from pydantic import ConfigDict

    from crv.base.home import Home
    from pools import pool_names

    class FormSchema(ParameterSchema):
        # Prefect's model keeps only properties/required/definitions: the per-appliance
        # rules (`allOf`) must reach the server too
        model_config = ConfigDict(extra="allow")

    entries = forms.catalog() if catalog is None else catalog
    pools = pool_names(Home.from_env().root)  # the configured pools are the form's choices
    out = []
    for spec in DEPLOYMENTS:
        module, attribute = spec.flow.split(":")
        flow: Any = getattr(importlib.import_module(module), attribute)
        if flow.name != spec.flow_name:
            raise RuntimeError(f"{spec.flow} is the flow {flow.name!r}, not {spec.flow_name!r}")
        description = spec.description
        if spec.catalog_in_description:
            description += f"\n\nThe catalog:\n\n{forms.appliance_table(entries)}"
        deployment: RunnerDeployment = flow.to_deployment(
            name=NAME,
            description=description,
            tags=TAGS if work_pool is None else [*TAGS, WORKER_TAG],
            enforce_parameter_schema=True,
            **on_work_pool(work_pool),
        )
        generated = deployment._parameter_openapi_schema.model_dump()
        form = spec.form(generated, entries, pools)
        deployment._parameter_openapi_schema = FormSchema(**form)
        out.append(deployment)
    return out


AUTOSCALE_FLOW = "autoscale"


async def autoscale_deployment(
    cluster: str, every: float, work_pool: str | None = None
) -> RunnerDeployment:
    """The scheduled `autoscale/<cluster>` deployment: one autoscale run every `every` s;
    served, or on `work_pool` like the others."""
    from flows.autoscale import autoscale

    deployment: RunnerDeployment = await autoscale.ato_deployment(
        name=cluster,
        interval=every,
        parameters={"name": cluster},
        description=f"Autoscale cluster {cluster} every {every:g} s: read each scaled group's "
        "metric, decide, resize; every decision is in the `autoscale-<cluster>` artifact and "
        f"`crv autoscale status {cluster}`. Pause it here to stop autoscaling for a while; "
        f"`crv autoscale disable {cluster}` removes it.",
        tags=[*TAGS, "autoscale"] + ([] if work_pool is None else [WORKER_TAG]),
        enforce_parameter_schema=True,
        **on_work_pool(work_pool),
    )
    return deployment


def ready(api_url: str, since: float, auth: str | None, work_pool: str | None) -> bool:
    """Whether the process started at `since` has done its part (without importing Prefect):
    served, every deployment was polled for runs by it (Prefect keeps a deployment `READY` for
    a while after its last poll, so an older poll does not count); on a work pool, every
    deployment is registered to that pool by it (the workers poll, whenever they run)."""
    import json
    import urllib.request
    from datetime import datetime

    from crv.base.running import request_with_auth

    def when(iso: str) -> float:  # "Z": Python < 3.11
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

    for full_name in names():
        request = request_with_auth(f"{api_url}/deployments/name/{full_name}", auth)
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                found = json.load(r)
            if work_pool is None:
                stamp = found.get("last_polled")
            elif found.get("work_pool_name") == work_pool:
                stamp = found.get("updated")
            else:
                return False
            if not stamp or when(stamp) < since:
                return False
        except (OSError, ValueError):
            return False
    return True
