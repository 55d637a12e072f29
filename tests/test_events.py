"""flows.events against a real Prefect server: what a flow emits is what the server stores (names,
the cluster as resource, the node and the flow run as related resources, the payload), and
emitting never raises, whatever state the Prefect API is in.

Prefect reads its settings at import, so everything that emits runs in a subprocess with the
environment of the case. One `crv up` serves the module (the Prefect server takes ~10 s).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crv.base.home import Home
from crv_cli.daemons import prefect_env, running
from flows import events
from tests.conftest import REPO
from tests.test_deploy_e2e import prefect_auth

PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from prefect import flow
    from flows import events

    cluster = sys.argv[1]

    @flow(name="crv-events-probe")
    async def probe() -> str:
        from prefect.runtime import flow_run

        sent = [
            events.cluster_event(cluster, "webfarm", "local", "deploying", nodes=2),
            events.node_event(cluster, "webfarm", "local", f"{cluster}-worker-0", "verified",
                              seconds=1.5, attempts=1),
            events.node_event(cluster, "webfarm", "local", f"{cluster}-worker-1", events.NODE_FAILED,
                              error="recipe install.sh exited 3"),
            events.cluster_event(cluster, "webfarm", "local", "ready", nodes=2, failed=1,
                                 seconds=12.25),
        ]
        assert all(e is not None for e in sent), sent
        return str(flow_run.id)

    print(json.dumps({"flow_run": asyncio.run(probe())}))
    """
)

# outside any flow (a flow cannot even start without its API): every call must return
UNREACHABLE = textwrap.dedent(
    """
    import json
    from pathlib import Path
    from flows import events

    huge = "x" * 2_000_000  # over Prefect's 1.5 MB event limit unless cut
    results = [
        events.cluster_event("gone", "webfarm", "local", "failed", error=huge, where=Path("/x")),
        events.node_event("gone", "webfarm", "local", "gone-worker-0", "failed", error=huge),
    ]
    results += [events.node_event("gone", "webfarm", "local", f"gone-worker-{i}", "destroyed")
                for i in range(50)]
    print(json.dumps({"returned": len(results),
                      "error_len": len(results[0].payload["error"]) if results[0] else None}),
          flush=True)
    """
)

# a thread with no run context (run_in_executor does not copy contextvars) of a process a
# Prefect worker started for one flow run: crv relates the run from PREFECT__FLOW_RUN_ID
NO_CONTEXT = textwrap.dedent(
    """
    import json, sys, threading
    from flows import events

    out = []
    t = threading.Thread(target=lambda: out.append(
        events.node_event(sys.argv[1], "webfarm", "sim", f"{sys.argv[1]}-lb-0", "enrolled")))
    t.start(); t.join()
    print(json.dumps({"event": out[0] is not None}))
    """
)

NO_API = textwrap.dedent(
    """
    import json, time
    from flows import events

    t = time.monotonic()
    e = events.cluster_event("offline", "webfarm", "local", "ready")
    print(json.dumps({"event": e is not None, "seconds": time.monotonic() - t}))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _python(code: str, *args: str, env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Home, str]]:
    home = Home(tmp_path_factory.mktemp("crv-home"))
    crv_env = {**os.environ, "CRV_HOME": str(home.root)}
    up = subprocess.run([sys.executable, "-m", "crv_cli", "up"], capture_output=True, text=True,
                        cwd=REPO, env=crv_env, timeout=300)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        endpoints = running(home)
        assert endpoints is not None
        yield home, endpoints.prefect_api_url
    finally:
        subprocess.run([sys.executable, "-m", "crv_cli", "down"], capture_output=True, cwd=REPO,
                       env=crv_env, timeout=120)  # fmt: skip


def _read_events(
    home: Home, api: str, cluster: str, want: int, deadline: float = 30
) -> list[dict[str, Any]]:
    """The server's events about this cluster, oldest first, once `want` are stored."""
    body = {
        "filter": {
            "event": {"prefix": ["crv."]},
            "resource": {"id": [f"crv.cluster.{cluster}"]},
            "order": "ASC",
        },
        "limit": 50,
    }
    found: list[dict[str, Any]] = []
    end = time.monotonic() + deadline
    with httpx.Client(timeout=10, auth=prefect_auth(home.root)) as client:
        while time.monotonic() < end:
            r = client.post(f"{api}/events/filter", json=body)
            r.raise_for_status()
            found = r.json()["events"]
            if len(found) >= want:
                return found
            time.sleep(0.5)
    raise AssertionError(f"{len(found)} of {want} events reached the server: {found}")


def _related(event: dict[str, Any], role: str) -> list[dict[str, str]]:
    return [r for r in event["related"] if r["prefect.resource.role"] == role]


def test_flow_events_reach_the_server_with_cluster_node_and_flow_run(
    prefect_api: tuple[Home, str],
) -> None:
    home, api = prefect_api
    cluster = f"ev{uuid.uuid4().hex[:8]}"
    out = _python(PROBE, cluster, env=_env(prefect_env(home, api)))
    flow_run = out["flow_run"]

    stored = _read_events(home, api, cluster, want=4)
    assert [e["event"] for e in stored] == [
        "crv.cluster.deploying",
        "crv.node.verified",
        "crv.node.failed",
        "crv.cluster.ready",
    ]
    for e in stored:
        assert e["resource"] == {
            "prefect.resource.id": f"crv.cluster.{cluster}",
            "prefect.resource.name": cluster,
            "crv.appliance": "webfarm",
            "crv.pool": "local",
        }
        # related by Prefect's EventsWorker from the run context, not by crv
        [run] = _related(e, "flow-run")
        assert run["prefect.resource.id"] == f"prefect.flow-run.{flow_run}"
        [flow] = _related(e, "flow")
        assert flow["prefect.resource.name"] == "crv-events-probe"

    deploying, verified, failed, ready = stored
    assert _related(deploying, "node") == [] and _related(ready, "node") == []
    assert _related(verified, "node") == [
        {
            "prefect.resource.id": f"crv.node.{cluster}-worker-0",
            "prefect.resource.role": "node",
            "prefect.resource.name": f"{cluster}-worker-0",
        }
    ]
    assert _related(failed, "node")[0]["prefect.resource.id"] == f"crv.node.{cluster}-worker-1"
    assert deploying["payload"] == {"nodes": 2}
    assert verified["payload"] == {"seconds": 1.5, "attempts": 1}
    assert failed["payload"] == {"error": "recipe install.sh exited 3"}
    assert ready["payload"] == {"nodes": 2, "failed": 1, "seconds": 12.25}


def test_unknown_event_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown node event 'booted'.*verified"):
        events.node_event("c", "a", "p", "c-n-0", "booted")
    with pytest.raises(ValueError, match=r"unknown cluster event 'crv\.cluster\.exploded'"):
        events.cluster_event("c", "a", "p", "crv.cluster.exploded")
    with pytest.raises(ValueError, match="unknown cluster event 'verified'"):
        events.cluster_event("c", "a", "p", "verified")  # a node name is not a cluster one
    with pytest.raises(ValueError, match=r"unknown node event 'crv\.cluster\.ready'"):
        events.node_event("c", "a", "p", "c-n-0", events.CLUSTER_READY)
    assert events.CLUSTER_ROLLED_BACK in events.CLUSTER_EVENTS
    assert {n.rsplit(".", 1)[1] for n in events.NODE_EVENTS} == {
        "provisioned", "enrolled", "verified", "failed", "destroyed", "quarantined"
    }  # fmt: skip
    assert events.CLUSTER_HALTED in events.CLUSTER_EVENTS


def test_emitting_with_the_api_unreachable_returns_normally(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/api"
    home = Home(tmp_path)
    out = _python(UNREACHABLE, env=_env(prefect_env(home, closed)), timeout=90)
    assert out["returned"] == 52
    # the queued event carries the cut message, so it could never exceed Prefect's limit
    assert out["error_len"] is not None and out["error_len"] <= events.MAX_TEXT + 20


def test_no_api_outside_a_run_skips_instead_of_starting_a_server(tmp_path: Path) -> None:
    out = _python(NO_API, env=_env(prefect_env(Home(tmp_path))))
    assert out["event"] is False


def test_a_thread_without_run_context_still_relates_the_flow_run(
    prefect_api: tuple[Home, str],
) -> None:
    home, api = prefect_api
    cluster, run_id = f"ev{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    env = _env({**prefect_env(home, api), "PREFECT__FLOW_RUN_ID": run_id})
    assert _python(NO_CONTEXT, cluster, env=env) == {"event": True}
    [stored] = _read_events(home, api, cluster, want=1)
    assert stored["event"] == "crv.node.enrolled"
    assert stored["resource"]["crv.pool"] == "sim"
    [run] = _related(stored, "flow-run")
    assert run["prefect.resource.id"] == f"prefect.flow-run.{run_id}"
    assert _related(stored, "node")[0]["prefect.resource.id"] == f"crv.node.{cluster}-lb-0"
