"""F2: the same deploy request submitted twice makes one run (docs/reliability.md).

`crv deploy --idempotency-key KEY` creates the run through the served deploy-appliance
deployment with Prefect's idempotency key and follows it; the same command again, while the
first runs or after it ended, follows the same run. Another system does the same through the
REST API (`"idempotency_key"` in the create_flow_run body): the second call answers 200 with the
first run. A key reused for other parameters is refused in one line, exit 2.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_deploy_e2e import Crv, free_port, home_up
from tests.test_deployments import api_url

pytestmark = pytest.mark.faults

RUN_LINE = re.compile(
    r"(new run|the run of key \S+ \((\w+)\)): (\S+); watch it: \S+/flow-run/(\S+)"
)


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    with home_up(tmp_path_factory.mktemp("crv-home")) as c:
        yield c


def runs_of_key(crv: Crv, key: str) -> list[dict]:
    with httpx.Client(base_url=api_url(crv), auth=crv.prefect_auth, timeout=30) as http:
        found = http.post(
            "/flow_runs/filter", json={"flow_runs": {"idempotency_key": {"any_": [key]}}}
        )
        found.raise_for_status()
        return list(found.json())


def run_line(output: str) -> re.Match[str]:
    found = RUN_LINE.search(output)
    assert found, output
    return found


def test_the_same_deploy_twice_is_one_run_while_it_runs_and_after(crv: Crv) -> None:
    port = str(free_port())
    command = ("deploy", "webfarm", "--name", "idem", "--set", "workers=1", "--set", f"port={port}")
    key = "ticket-4711"
    # two submissions at once (a request retried by another system while the first runs)
    both = [crv.popen(*command, "--idempotency-key", key) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in both]
    finally:
        for p in both:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in both] == [0, 0], outs
    lines = sorted((run_line(o) for o in outs), key=lambda m: m.group(1) != "new run")
    made, followed = lines
    assert made.group(1) == "new run", outs
    assert followed.group(2) in ("Scheduled", "Pending", "Running"), outs
    assert followed.group(4) == made.group(4)
    assert all("cluster idem is ready (2 nodes)" in o for o in outs), outs
    assert len(runs_of_key(crv, key)) == 1
    assert len(crv.status("idem")["nodes"]) == 2
    agents = sorted(crv.node_agents())
    assert len(agents) == 2

    # after it ended: answered with the same (completed) run at once, nothing made again
    later = crv(*command, "--idempotency-key", key)
    assert later.returncode == 0, later.stderr
    assert run_line(later.stderr).group(2) == "Completed"
    assert run_line(later.stderr).group(4) == made.group(4)
    assert sorted(crv.node_agents()) == agents and len(runs_of_key(crv, key)) == 1

    # the key with other parameters: refused in one line, nothing runs
    other = crv("deploy", "webfarm", "--name", "idem", "--set", "workers=2", "--set", f"port={port}",
                "--idempotency-key", key)  # fmt: skip
    assert other.returncode == 2, other.stderr
    assert (
        other.stderr.strip().splitlines() == [other.stderr.strip()]
        and "error: --idempotency-key: ticket-4711: already names run" in other.stderr
    )
    assert "(parameters)" in other.stderr
    assert sorted(crv.node_agents()) == agents and len(runs_of_key(crv, key)) == 1

    # another system through the REST API: the same key twice answers the same run
    with httpx.Client(base_url=api_url(crv), auth=crv.prefect_auth, timeout=30) as http:
        deployment = http.get("/deployments/name/destroy-cluster/crv").json()["id"]
        body = {"parameters": {"name": "idem"}, "idempotency_key": "destroy-idem-1"}
        created = http.post(f"/deployments/{deployment}/create_flow_run", json=body)
        again_api = http.post(f"/deployments/{deployment}/create_flow_run", json=body)
    assert (created.status_code, again_api.status_code) == (201, 200)
    assert created.json()["id"] == again_api.json()["id"]
    deadline = time.monotonic() + 120
    while crv("status", "idem", "--json").returncode == 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert len(runs_of_key(crv, "destroy-idem-1")) == 1


def test_bad_keys_and_appliances_outside_the_catalog_are_refused(crv: Crv, tmp_path: Path) -> None:
    bad = crv("deploy", "webfarm", "--idempotency-key", "two words")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --idempotency-key: "), bad.stderr
    outside = tmp_path / "mine"
    shutil.copytree(Path(__file__).parents[1] / "appliances" / "webfarm", outside)
    assert crv("validate", str(outside)).returncode == 0  # a good appliance, not in the catalog
    refused = crv("deploy", str(outside), "--idempotency-key", "k1")
    assert refused.returncode == 2, refused.stderr
    assert "is not an appliance of the catalog" in refused.stderr
    assert runs_of_key(crv, "k1") == []
