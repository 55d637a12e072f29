"""The Prefect server `crv up` starts on SQLite begins its write transactions IMMEDIATE
(crv_cli/prefect_server.py): runs created through the API at the same moment all get made,
none answered 503 "database is locked"."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_deploy_e2e import Crv, prefect_api, started_crv

AT_ONCE = 24  # concurrent requests, the runner's and the service's own traffic besides


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    yield from started_crv(tmp_path_factory)


def test_runs_created_at_the_same_moment_are_all_made_without_503(crv: Crv) -> None:
    api = prefect_api(crv)
    auth = crv.prefect_auth
    deployment = httpx.get(f"{api}/deployments/name/destroy-cluster/crv", auth=auth, timeout=30)
    deployment.raise_for_status()
    url = f"{api}/deployments/{deployment.json()['id']}/create_flow_run"
    # scheduled far ahead: the runner leaves them alone; each reads the deployment, then writes
    body = {
        "parameters": {"name": "nothing-here"},
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}},
    }

    def create(_: int) -> httpx.Response:
        return httpx.post(url, json=body, auth=auth, timeout=120)

    with ThreadPoolExecutor(AT_ONCE) as pool:
        answers = list(pool.map(create, range(AT_ONCE * 3)))
    made = [r.json()["id"] for r in answers if r.status_code == 201]
    try:
        statuses = sorted({r.status_code for r in answers})
        assert statuses == [201], (statuses, crv.prefect_errors())
        assert len(set(made)) == AT_ONCE * 3
    finally:
        for run_id in made:
            httpx.delete(f"{api}/flow_runs/{run_id}", auth=auth, timeout=30)
