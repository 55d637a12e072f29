"""F5 and F6 end to end on the local pool (docs/reliability.md): a new node whose first
contextualize fails for good is quarantined (its certificate on the CRL, what it published
purged, its agent refused) while the others go on; when more of a change's new nodes fail than
the appliance's max_unhealthy (40 % by default), crv starts nothing more, fails the change with
one line saying so, and emits `crv.cluster.halted`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crv.base.home import Home
from crv.base.running import running
from crv.service.client import AsyncService
from tests.conftest import write_appliance
from tests.test_deploy_e2e import Crv, home_up

pytestmark = pytest.mark.faults

# five new nodes: 0, 1 and 2 publish an attribute and then fail their recipe at once; 3 and 4
# take a few seconds to succeed, so the brake trips while they still run (their verifies are
# never started)
SHAKY = """\
apiVersion: crv/v1
name: shaky
nodes:
  node: {count: 5, roles: [svc]}
roles:
  svc: {recipe: svc.sh, verify: {command: "true"}}
"""
RECIPE = """\
#!/bin/sh
crv-agent set note "published by $CRV_NODE"
case "$CRV_NODE" in
  *-0|*-1|*-2) echo "image is broken" >&2; exit 1 ;;
esac
sleep 6
"""


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    with home_up(tmp_path_factory.mktemp("crv-home")) as c:
        yield c


def cluster_events(crv: Crv, cluster: str, want: set[str], deadline: float = 30.0) -> list[dict]:
    endpoints = running(Home(crv.home))
    assert endpoints is not None
    body = {
        "filter": {
            "event": {"prefix": ["crv."]},
            "any_resource": {"id_prefix": [f"crv.cluster.{cluster}", f"crv.node.{cluster}-"]},
            "order": "ASC",
        },
        "limit": 50,
    }
    end = time.monotonic() + deadline
    while True:
        r = httpx.post(
            f"{endpoints.prefect_api_url}/events/filter",
            json=body,
            auth=crv.prefect_auth,
            timeout=10,
        )
        assert r.status_code == 200, r.text
        found = list(r.json()["events"])
        if want <= {e["event"] for e in found} or time.monotonic() > end:
            return found
        time.sleep(0.5)


def readings(crv: Crv, cluster: str, role: str, key: str) -> list[dict]:
    endpoints = running(Home(crv.home))
    assert endpoints is not None

    async def read() -> list[dict]:
        service = AsyncService(Home(crv.home), endpoints.service_url)
        try:
            return await service.attribute_readings(cluster, role, key)
        finally:
            await service.close()

    return asyncio.run(read())


def test_more_failed_new_nodes_than_max_unhealthy_stop_the_change(crv: Crv, tmp_path: Path) -> None:
    app = write_appliance(tmp_path, "shaky", SHAKY, ("svc.sh",))
    (app / "svc.sh").write_text(RECIPE)
    revoked_before = crv.revoked_serials()
    r = crv("deploy", str(app), "--retries", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error: deploy of shaky failed: stopped: 3 of 5 new nodes failed, more than "
        "max_unhealthy 40% (2); crv makes no more nodes in this change; first failure: "
        "shaky-node-"
    ), r.stderr
    assert "image is broken" in line and "Traceback" not in r.stderr

    status = crv.status("shaky")
    nodes = {n["name"]: n for n in status["nodes"]}
    failed = {f"shaky-node-{i}" for i in range(3)}
    assert {n for n, v in nodes.items() if v["state"] == "quarantined"} == failed
    for name in ("shaky-node-3", "shaky-node-4"):  # went on, then the brake kept their verify
        assert nodes[name]["state"] == "enrolled"
        assert nodes[name]["roles"]["svc"] == "done", nodes[name]
    # what the quarantined ones published before failing is purged; the others' stays
    assert {r["node"] for r in readings(crv, "shaky", "svc", "note")} == {
        "shaky-node-3", "shaky-node-4"
    }  # fmt: skip
    assert len(crv.revoked_serials() - revoked_before) == 3  # the quarantined nodes' on the CRL

    found = cluster_events(crv, "shaky", {"crv.cluster.halted", "crv.node.quarantined"})
    names = [e["event"] for e in found]
    assert names.count("crv.node.quarantined") == 3, names
    halted = next(e for e in found if e["event"] == "crv.cluster.halted")
    assert halted["payload"]["failed"] == sorted(failed)
    assert "max_unhealthy" in halted["payload"]["error"]

    d = crv("destroy", "shaky")
    assert d.returncode == 0, d.stderr
    assert "5 nodes removed" in d.stdout
