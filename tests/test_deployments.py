"""The served deployments end to end: `crv up` registers deploy-appliance, scale-role and
destroy-cluster with typed forms, and another system drives them through Prefect's REST API.

The API calls come from a separate process using nothing but httpx, as the README shows them:
with the API's basic-auth credentials (`crv api-credentials`), look the deployment up by name,
create a flow run with parameters, poll the run until it ends.
Bad input is refused when the run is created (HTTP 409 naming the field) or, for what a schema
cannot say, the run fails at once naming it; either way no node process is started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments import forms
from tests.conftest import CATALOG, REPO, write_appliance
from tests.test_deploy_e2e import Crv, free_port

# What another system runs: only an HTTP client, the Prefect API url, its credentials and a
# deployment name.
CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import httpx

    api, deployment, parameters = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    user, _, password = sys.argv[4].partition(":")
    with httpx.Client(base_url=api, auth=(user, password), timeout=30) as http:
        found = http.get(f"/deployments/name/{deployment}")
        found.raise_for_status()
        for attempt in range(4):  # a server error (SQLite busy under load) is worth a retry
            created = http.post(
                f"/deployments/{found.json()['id']}/create_flow_run",
                json={"parameters": parameters},
            )
            if created.status_code < 500:
                break
            time.sleep(1 + attempt)
        if created.status_code >= 400:
            body = created.json()
            print(json.dumps({"http": created.status_code, "detail": body.get("detail", body)}))
            sys.exit(0)
        run_id = created.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = http.get(f"/flow_runs/{run_id}").json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(0.5)
        print(json.dumps({"http": created.status_code, "id": run_id,
                          "state": state["type"], "message": state["message"]}))
    """
)

DEPLOYMENTS = (
    "deploy-appliance/crv",
    "scale-role/crv",
    "destroy-cluster/crv",
    "repair-cluster/crv",
)


def api_url(crv: Crv) -> str:
    return str(json.loads((crv.home / "prefect" / "daemon.json").read_text())["url"])


def serve_record(crv: Crv) -> dict[str, Any]:
    return dict(json.loads((crv.home / "prefect" / "serve.json").read_text()))


def trigger(crv: Crv, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Run a deployment from another process through the REST API; its final answer."""
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT,
            api_url(crv),
            deployment,
            json.dumps(parameters),
            ":".join(crv.prefect_auth),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CRV_"))},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return dict(json.loads(p.stdout))


def deployment(crv: Crv, name: str) -> dict[str, Any]:
    r = httpx.get(f"{api_url(crv)}/deployments/name/{name}", auth=crv.prefect_auth, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def flow_run_count(crv: Crv) -> int:
    r = httpx.post(f"{api_url(crv)}/flow_runs/count", json={}, auth=crv.prefect_auth, timeout=10)
    return int(r.json())


def test_catalog_on_the_search_path_fills_the_forms(tmp_path: Path) -> None:
    """An appliance on CRV_APPLIANCE_PATH joins the form (first of a name wins); one that does
    not load is left out rather than breaking every form."""
    write_appliance(
        tmp_path,
        "tiny",
        """
        apiVersion: crv/v1
        name: tiny
        parameters:
          debug: {type: boolean, default: false, description: Verbose.}
          ratio: {type: number, default: 0.5, minimum: 0, maximum: 1}
        nodes:
          box: {count: 2, roles: [r], scale: {min: 1, max: 5}}
        roles:
          r: {recipe: r.sh}
        """,
        recipes=("r.sh",),
    )
    write_appliance(tmp_path, "broken", "apiVersion: crv/v1\nname: [\n")
    entries = forms.catalog([tmp_path, CATALOG])
    assert list(entries)[:2] == ["tiny", "ganglia"] and "broken" not in entries
    generated = {
        "properties": {
            "appliance": {"type": "string"},
            "pool": {"type": "string"},
            "name": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "parameters": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            "counts": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        }
    }
    form = forms.deploy_form(generated, entries, ["local"])
    assert form["properties"]["appliance"]["enum"][0] == "tiny"
    fields = form["properties"]["parameters"]["anyOf"][0]["properties"]
    assert fields["debug"]["enum"] == ["true", "false"]
    assert fields["ratio"]["description"] == "tiny: number 0..1, default 0.5"
    rule = form["allOf"][0]["then"]["properties"]
    assert rule["counts"]["properties"]["box"] == {"type": "integer", "minimum": 1, "maximum": 5}
    assert rule["parameters"]["properties"]["ratio"]["pattern"] == forms.NUMBER_TEXT


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    c = Crv(tmp_path_factory.mktemp("crv-home"))
    c.up()
    yield c
    for pid in c.node_processes():
        os.kill(pid, signal.SIGKILL)
    c("down")


def test_up_serves_the_deployments_with_typed_forms(crv: Crv) -> None:
    before = serve_record(crv)["pid"]
    again = crv("up")  # up again: the same process serves them
    assert again.returncode == 0 and serve_record(crv)["pid"] == before
    assert f"deployments: {', '.join(DEPLOYMENTS)} (served by pid {before})" in again.stdout
    assert "run forms:   http://127.0.0.1:" in again.stdout

    deploy = deployment(crv, "deploy-appliance/crv")
    assert deploy["status"] == "READY" and deploy["enforce_parameter_schema"] is True
    assert "crv" in deploy["tags"] and "webfarm" in deploy["description"]
    props = deploy["parameter_openapi_schema"]["properties"]
    assert props["appliance"]["enum"] == [
        "ganglia",
        "htcondor",
        "mysql-ha",
        "slurm",
        "webfarm",
        "webshop",
    ]
    assert props["pool"]["enum"] == ["local", "sim"] and props["pool"]["default"] == "local"
    fields = props["parameters"]["anyOf"][0]["properties"]
    assert "webfarm: integer 1..1000, default 3" in fields["workers"]["description"]
    assert "htcondor: string (one of 23.x, 24.x)" in fields["series"]["description"]
    assert "webshop: string, default shop" in fields["db-database"]["description"]
    groups = props["counts"]["anyOf"][0]["properties"]
    assert "webfarm: 1..1000, default 3, roles web" in groups["worker"]["description"]

    scale = deployment(crv, "scale-role/crv")["parameter_openapi_schema"]
    assert scale["required"] == ["name", "group", "count"]
    assert scale["properties"]["count"]["minimum"] == 0
    destroy = deployment(crv, "destroy-cluster/crv")["parameter_openapi_schema"]
    assert destroy["properties"]["pool"]["enum"] == ["local", "sim"]
    pools = props["pools"]["anyOf"][0]["properties"]
    assert pools["worker"]["enum"] == ["local", "sim"]
    assert "webfarm: roles web" in pools["worker"]["description"]
    repair = deployment(crv, "repair-cluster/crv")["parameter_openapi_schema"]
    assert repair["required"] == ["name"]

    # `crv serve` will not start a second one
    second = crv("serve", timeout=60)
    assert second.returncode == 2 and "already served" in second.stderr


@pytest.mark.parametrize(
    ("name", "parameters", "field"),
    [
        ("deploy-appliance/crv", {"appliance": "nosuch"}, "'appliance'"),
        ("deploy-appliance/crv", {"appliance": "webfarm", "pool": "cloud9"}, "'pool'"),
        (
            "deploy-appliance/crv",
            {"appliance": "webfarm", "parameters": {"workers": "many"}},
            "'parameters.workers'",
        ),
        (
            "deploy-appliance/crv",
            {"appliance": "webfarm", "parameters": {"workers": 2}},
            "'parameters.workers'",
        ),
        (
            "deploy-appliance/crv",
            {"appliance": "webfarm", "parameters": {"clients": "2"}},
            "'parameters'",
        ),
        (
            "deploy-appliance/crv",
            {"appliance": "webfarm", "counts": {"worker": 5000}},
            "'counts.worker'",
        ),
        ("deploy-appliance/crv", {"appliance": "webfarm", "name": "No Such"}, "'name'"),
        (
            "deploy-appliance/crv",
            {"appliance": "webfarm", "pools": {"worker": "cloud9"}},
            "'pools.worker'",
        ),
        ("deploy-appliance/crv", {"appliance": "webfarm", "pools": {"nosuch": "sim"}}, "'pools'"),
        ("repair-cluster/crv", {"name": "No Such"}, "'name'"),
        ("scale-role/crv", {"name": "apifarm", "group": "worker", "count": -1}, "'count'"),
        ("destroy-cluster/crv", {"name": "apifarm", "pool": "cloud9"}, "'pool'"),
    ],
)
def test_bad_input_is_refused_when_the_run_is_created(
    crv: Crv, name: str, parameters: dict[str, Any], field: str
) -> None:
    runs = flow_run_count(crv)
    r = httpx.post(
        f"{api_url(crv)}/deployments/{deployment(crv, name)['id']}/create_flow_run",
        json={"parameters": parameters},
        auth=crv.prefect_auth,
        timeout=10,
    )
    assert r.status_code == 409, r.text
    assert f"Validation failed for field {field}" in r.json()["detail"]
    assert flow_run_count(crv) == runs  # no run, so nothing provisioned
    assert crv.node_processes() == []


@pytest.mark.parametrize(
    "parameters, message",
    [
        # a number out of bounds inside a parameter's text
        ({"appliance": "webfarm", "parameters": {"workers": "5000"}},
         "workers: 5000 is above the maximum 1000"),
        # autoscaling asked of an appliance that cannot autoscale
        ({"appliance": "ganglia", "autoscale_every": 30},
         "autoscale_every: appliance ganglia: no node group has a scaling section"),
    ],
)  # fmt: skip
def test_bad_value_a_schema_cannot_see_fails_the_run_at_once(
    crv: Crv, parameters: dict[str, Any], message: str
) -> None:
    """The run starts and fails before any node, naming the parameter."""
    started = time.monotonic()
    result = trigger(crv, "deploy-appliance/crv", parameters)
    assert result["state"] == "FAILED", result
    assert message in result["message"]
    assert time.monotonic() - started < 60
    assert crv.node_processes() == []


def test_another_system_deploys_resizes_and_destroys_through_the_api(crv: Crv) -> None:
    port = free_port()
    deployed = trigger(
        crv,
        "deploy-appliance/crv",
        {
            "appliance": "webfarm",
            "pool": "local",
            "name": "apifarm",
            "parameters": {"workers": "2", "port": str(port)},
        },
    )
    assert deployed["http"] == 201 and deployed["state"] == "COMPLETED", deployed
    status = crv.status("apifarm")
    assert status["ready"] and status["appliance"] == "webfarm"
    assert [n["name"] for n in status["nodes"]] == [
        "apifarm-front-0", "apifarm-worker-0", "apifarm-worker-1",
    ]  # fmt: skip

    grown = trigger(crv, "scale-role/crv", {"name": "apifarm", "group": "worker", "count": 3})
    assert grown["state"] == "COMPLETED", grown
    status = crv.status("apifarm")
    assert status["ready"]
    assert sum(n["group"] == "worker" for n in status["nodes"]) == 3
    lb = next(n for n in status["nodes"] if n["group"] == "front")
    seen = set()
    for _ in range(6):
        with urllib.request.urlopen(f"http://{lb['address']}:{port}/", timeout=5) as resp:
            seen.add(resp.read().decode().strip())
    assert seen == {f"hello from apifarm-worker-{i}" for i in range(3)}

    # beyond the group's scale bounds: the run fails before touching a node
    nodes = sorted(crv.node_agents())
    refused = trigger(crv, "scale-role/crv", {"name": "apifarm", "group": "worker", "count": 1001})
    assert refused["state"] == "FAILED" and "above scale.max 1000" in refused["message"]
    assert sorted(crv.node_agents()) == nodes

    destroyed = trigger(crv, "destroy-cluster/crv", {"name": "apifarm", "pool": "local"})
    assert destroyed["state"] == "COMPLETED", destroyed
    gone = crv("status", "apifarm", "--json")
    assert gone.returncode == 2 and "no such cluster" in gone.stderr
    assert crv.node_processes() == []


def test_schedules_survive_a_restart_of_the_served_deployments(crv: Crv) -> None:
    """Serving registers the deployments again at every start; a schedule someone added (and
    a pause) stays. `crv up` restarts a served process that died."""
    api = api_url(crv)
    scale = deployment(crv, "scale-role/crv")
    r = httpx.post(
        f"{api}/deployments/{scale['id']}/schedules",
        json=[
            {
                "schedule": {"cron": "0 7 * * 1-5", "timezone": "UTC"},
                "parameters": {"name": "apifarm", "group": "worker", "count": 5},
            }
        ],
        auth=crv.prefect_auth,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    destroy = deployment(crv, "destroy-cluster/crv")
    paused = httpx.post(
        f"{api}/deployments/{destroy['id']}/pause_deployment", auth=crv.prefect_auth
    )
    assert paused.status_code < 300, paused.text

    old = serve_record(crv)["pid"]
    os.killpg(old, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{old}") and time.monotonic() < deadline:
        time.sleep(0.2)
    up = crv("up", timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    assert serve_record(crv)["pid"] != old

    scale = deployment(crv, "scale-role/crv")
    assert [(s["schedule"]["cron"], s["parameters"]) for s in scale["schedules"]] == [
        ("0 7 * * 1-5", {"name": "apifarm", "group": "worker", "count": 5})
    ]
    assert deployment(crv, "destroy-cluster/crv")["paused"] is True
