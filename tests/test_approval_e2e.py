"""The approval gate end to end (flows.approval, crv_cli.approval): a real Prefect server, the
real service, the local pool and the real agent.

A cluster of 3 web nodes whose appliance says `approval: {remove_more_than: 1}`:
- `crv approve` / `crv reject` with nothing waiting: one line, exit 2;
- `crv scale gated worker 1` pauses its flow run (Paused in Prefect, with the typed form) and
  says how to answer; `crv reject` -> the scale fails in one line, the 3 nodes are all there and
  answer; recorded as events;
- no answer within the appliance's timeout (a few seconds here) -> rejected the same way, and the
  run fails with crv's line, not Prefect's "paused and never resumed";
- `crv approve` -> 1 node left, the approval recorded;
- a run of the served `scale-role/crv` deployment resumed through Prefect's API with run_input,
  as the UI's form does (an input the form does not allow is refused and the run stays Paused);
- removing 1 node (not more than the limit) does not wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import cluster_events, write_appliance
from tests.test_deploy_e2e import Crv, free_port

pytestmark = pytest.mark.scaling  # .ci/run: ./dev test -m scaling

APPLIANCE = """\
apiVersion: crv/v1
name: gated
approval: {{remove_more_than: 1, timeout: {timeout}}}
parameters:
  port: {{type: integer, default: 8080, minimum: 1024, maximum: 65535}}
nodes:
  worker: {{count: 3, roles: [web], scale: {{min: 0, max: 5}}}}
roles:
  web: {{recipe: web.sh, publishes: [url], verify: {{http: "{{{{ self.url }}}}/health"}}}}
"""
# a static HTTP server on the node's own address, answering /health with the node's name
WEB = """#!/bin/sh
set -eu
mkdir -p www
echo "ok $CRV_NODE" > www/health
if [ -f server.pid ]; then kill "$(cat server.pid)" 2>/dev/null || true; fi
nohup python3 -m http.server --bind "$CRV_ADDRESS" --directory www "$CRV_PARAM_PORT" \\
  >/dev/null 2>&1 &
echo $! > server.pid
crv-agent set url "http://$CRV_ADDRESS:$CRV_PARAM_PORT"
"""


class Gated:
    def __init__(self, crv: Crv, directory: Path, port: int) -> None:
        self.crv, self.directory, self.port = crv, directory, port
        record = json.loads((crv.home / "prefect" / "daemon.json").read_text())
        self.api = httpx.Client(base_url=record["url"], auth=crv.prefect_auth, timeout=30)

    def set_timeout(self, timeout: str) -> None:
        """The gate reads the appliance again at each resize (load_recorded): a new timeout."""
        (self.directory / "appliance.yaml").write_text(APPLIANCE.format(timeout=timeout))

    def workers(self) -> list[str]:
        status = self.crv.status("gated")
        assert all(set(n["roles"].values()) == {"verified"} for n in status["nodes"]), status
        return sorted(n["name"] for n in status["nodes"])

    def answers(self) -> set[str]:
        """What every node's server answers on /health, asked directly."""
        seen = set()
        for n in self.crv.status("gated")["nodes"]:
            url = f"http://{n['address']}:{self.port}/health"
            with urllib.request.urlopen(url, timeout=5) as resp:
                seen.add(resp.read().decode().strip())
        return seen

    def paused_run(self, process: subprocess.Popen[str] | None = None) -> dict[str, Any]:
        """The Paused flow run of the gate (waits for it; fails if `process` ended first)."""
        body = {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "limit": 10}
        end = time.monotonic() + 180
        while time.monotonic() < end:
            runs = self.api.post("/flow_runs/filter", json=body).json()
            if runs:
                assert len(runs) == 1, runs
                return dict(runs[0])
            if process is not None and process.poll() is not None:
                pytest.fail(f"ended before pausing: {process.communicate()[0]}")
            time.sleep(0.5)
        pytest.fail("no flow run paused within 180 s")

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self.api.get(f"/flow_runs/{run_id}").json())

    def events(self, name: str, count: int, deadline: float = 30.0) -> list[dict[str, Any]]:
        """crv's `name` events on the cluster, once there are `count` of them (they reach the
        server a moment after the flow emitted them), oldest first."""
        return cluster_events(self.api, "gated", name, count, deadline)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gated]:
    root = tmp_path_factory.mktemp("approval")
    crv = Crv(root / "home")
    crv.up()
    directory = write_appliance(root, "gated", APPLIANCE.format(timeout="10m"), ("web.sh",))
    (directory / "web.sh").write_text(WEB)
    port = free_port()
    try:
        r = crv("deploy", str(directory), "--name", "gated", "--set", f"port={port}")
        assert r.returncode == 0, r.stdout + r.stderr
        g = Gated(crv, directory, port)
        yield g
        g.api.close()
        crv("destroy", "gated")
    finally:
        for pid in crv.node_processes():
            os.kill(pid, signal.SIGKILL)
        crv("down")


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_an_answer_with_nothing_waiting_exits_2(gated: Gated) -> None:
    for command in ("approve", "reject"):
        r = gated.crv(command, "gated", "--reason", "why not")
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.splitlines() == ["error: no change of cluster gated waits for approval"]
    r = gated.crv("approve", "nosuch")
    assert r.returncode == 2 and errors(r.stderr) == [
        "error: no change of cluster nosuch waits for approval"
    ]


def test_a_rejected_shrink_changes_nothing(gated: Gated) -> None:
    three = ["gated-worker-0", "gated-worker-1", "gated-worker-2"]
    assert gated.workers() == three
    scale = gated.crv.popen("scale", "gated", "worker", "1")
    try:
        run = gated.paused_run(scale)
        details = run["state"]["state_details"]
        assert details["pause_key"].startswith("crv-approval-")
        # the typed form the UI shows, with the change described
        key = details["pause_key"]
        schema = gated.api.get(f"/flow_runs/{run['id']}/input/paused-{key}-schema").json()
        schema = json.loads(schema) if isinstance(schema, str) else schema
        assert schema["properties"]["decision"]["enum"] == ["approve", "reject"]
        described = gated.api.get(f"/flow_runs/{run['id']}/input/paused-{key}-description")
        assert "shrinking worker from 3 to 1 nodes" in described.text
        assert gated.workers() == three  # nothing removed while it waits

        r = gated.crv("reject", "gated", "--reason", "not now")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines() == [
            "rejected: cluster gated: shrinking worker from 3 to 1 nodes (removing "
            "gated-worker-2, gated-worker-1), asked by crv scale; reason: not now"
        ]
        out, _ = scale.communicate(timeout=120)
    finally:
        if scale.poll() is None:
            scale.kill()
    assert scale.returncode == 1, out
    assert "waits for approval (up to 10m): `crv approve gated` or `crv reject gated`" in out
    (line,) = errors(out)
    assert line.startswith(
        "error: scale of gated failed: shrinking worker from 3 to 1 nodes rejected by crv reject ("
    ), out
    assert line.endswith("): not now"), out
    assert gated.run(run["id"])["state"]["type"] == "FAILED"
    assert gated.workers() == three
    assert gated.answers() == {f"ok {n}" for n in three}
    (asked,) = gated.events("crv.change.approval-requested", 1)
    assert asked["payload"]["victims"] == ["gated-worker-2", "gated-worker-1"]
    assert (asked["payload"]["before"], asked["payload"]["after"]) == (3, 1)
    assert asked["payload"]["by"] == "crv scale"
    (rejected,) = gated.events("crv.change.rejected", 1)
    assert rejected["payload"]["decision"] == "reject"
    assert rejected["payload"]["reason"] == "not now"
    assert rejected["payload"]["answered_by"].startswith("by crv reject (")
    # the slot was released: the next change goes on at once
    assert gated.crv("scale", "gated", "worker", "3", "--wait", "0").returncode == 0


def test_no_answer_in_time_is_a_rejection(gated: Gated) -> None:
    three = ["gated-worker-0", "gated-worker-1", "gated-worker-2"]
    gated.set_timeout("3s")
    try:
        started = time.monotonic()
        r = gated.crv("scale", "gated", "worker", "1", timeout=180)
        took = time.monotonic() - started
    finally:
        gated.set_timeout("10m")
    assert r.returncode == 1, r.stdout + r.stderr
    assert errors(r.stderr) == [
        "error: scale of gated failed: shrinking worker from 3 to 1 nodes: no answer within 3s: "
        "rejected"
    ]
    assert took < 90
    assert gated.workers() == three
    assert gated.answers() == {f"ok {n}" for n in three}
    rejected = gated.events("crv.change.rejected", 2)
    assert len(rejected) == 2, rejected
    assert rejected[-1]["payload"]["decision"] == "timeout"
    # the run ends with crv's line, not Prefect's "paused and never resumed"
    flow_run = next(
        r["prefect.resource.id"]
        for r in rejected[-1]["related"]
        if r["prefect.resource.role"] == "flow-run"
    )
    state = gated.run(flow_run.removeprefix("prefect.flow-run."))["state"]
    assert state["type"] == "FAILED"
    assert "no answer within 3s: rejected" in state["message"], state


def test_an_approved_shrink_goes_on(gated: Gated) -> None:
    scale = gated.crv.popen("scale", "gated", "worker", "1")
    try:
        gated.paused_run(scale)
        r = gated.crv("approve", "gated", "--reason", "load is gone", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        answer = json.loads(r.stdout)
        assert answer["decision"] == "approve" and answer["victims"] == [
            "gated-worker-2", "gated-worker-1"
        ]  # fmt: skip
        out, _ = scale.communicate(timeout=180)
    finally:
        if scale.poll() is None:
            scale.kill()
    assert scale.returncode == 0, out
    assert "cluster gated is ready (1 nodes)" in out
    assert gated.workers() == ["gated-worker-0"]
    assert gated.answers() == {"ok gated-worker-0"}
    (approved,) = gated.events("crv.change.approved", 1)
    assert approved["payload"]["decision"] == "approve"
    assert approved["payload"]["reason"] == "load is gone"
    assert approved["payload"]["answered_by"].startswith("by crv approve (")
    # and in the flow run's log
    flow_run = next(
        r["prefect.resource.id"]
        for r in approved["related"]
        if r["prefect.resource.role"] == "flow-run"
    ).removeprefix("prefect.flow-run.")
    logs = gated.api.post(
        "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run]}}, "limit": 200}
    ).json()
    assert any(
        "shrinking worker from 3 to 1 nodes approved by crv approve (" in log["message"]
        for log in logs
    ), [log["message"] for log in logs]


def test_a_served_run_resumed_through_the_api_as_the_ui_does(gated: Gated) -> None:
    r = gated.crv("scale", "gated", "worker", "3")  # growth never waits
    assert r.returncode == 0, r.stdout + r.stderr
    assert "waits for approval" not in r.stderr
    deployment = gated.api.get("/deployments/name/scale-role/crv").json()
    created = gated.api.post(
        f"/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"name": "gated", "group": "worker", "count": 1}},
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    run = gated.paused_run()
    assert run["id"] == run_id
    # an input the form does not allow is refused, and the run keeps waiting
    refused = gated.api.post(
        f"/flow_runs/{run_id}/resume", json={"run_input": {"decision": "maybe"}}
    ).json()
    assert refused["status"] == "REJECT", refused
    assert gated.run(run_id)["state"]["type"] == "PAUSED"
    resumed = gated.api.post(
        f"/flow_runs/{run_id}/resume",
        json={"run_input": {"decision": "approve", "reason": "from the form"}},
    ).json()
    assert resumed["status"] == "ACCEPT", resumed
    end = time.monotonic() + 180
    while (state := gated.run(run_id)["state"])["type"] not in ("COMPLETED", "FAILED", "CRASHED"):
        assert time.monotonic() < end, state
        time.sleep(1)
    assert state["type"] == "COMPLETED", state
    assert gated.workers() == ["gated-worker-0"]
    approved = gated.events("crv.change.approved", 2)
    assert approved[-1]["payload"]["answered_by"] == "in the Prefect UI"
    assert approved[-1]["payload"]["reason"] == "from the form"


def test_removing_no_more_than_the_limit_does_not_wait(gated: Gated) -> None:
    assert gated.crv("scale", "gated", "worker", "2").returncode == 0
    asked = len(gated.events("crv.change.approval-requested", 100, deadline=0))
    # (not to 0 nodes: a change that leaves no node fails in flows.converge's progress today)
    r = gated.crv("scale", "gated", "worker", "1", "--wait", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "waits for approval" not in r.stderr
    assert gated.workers() == ["gated-worker-0"]
    time.sleep(2)  # an event would have reached the server by now
    assert len(gated.events("crv.change.approval-requested", 100, deadline=0)) == asked
