"""The wire models (crv/service/models.py): the cluster status the admin route sends is exactly
the JSON the store builds, key for key and in the same order — `crv status --json` prints this
shape."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from crv.service.app import create_app
from crv.service.database import open_engine
from crv.service.models import CLUSTER_STATUS
from crv.service.pki import CertificateAuthority
from crv.service.store import Store

ROLES = {
    "web": {"recipe": "roles/web.sh", "appdir": "a0", "env": {}, "depends_on": []},
    "mon": {"recipe": "roles/mon.sh", "appdir": "a1", "env": {}, "depends_on": []},
}


@pytest.fixture()
def served(tmp_path: Path) -> tuple[Store, Any]:
    store = Store(open_engine(tmp_path / "crv.sqlite"))
    store.put_cluster(
        "c", appliance="x", source="dir", pool="local", parameters={"n": 2}, roles=ROLES,
        bundle=b"b", counts={"g": 2},
    )  # fmt: skip
    store.put_nodes(
        "c",
        [
            {"name": "c-g-0", "group": "g", "roles": ["web", "mon"], "pool": "local"},
            {"name": "c-g-1", "group": "g", "roles": ["web"], "pool": "local"},
        ],
    )
    store.update_roles("c", [{"node": "c-g-0", "role": "web", "op": "release"}])
    store.report_status("c", "c-g-0", "web", release=1, state="done", exit_code=0, output="ok")
    store.set_attribute("c", "c-g-0", "web", "url", "http://10.0.0.1")
    ca = CertificateAuthority.create_or_load(tmp_path / "ca")
    _, cert = ca.issue_admin_certificate()
    app = create_app(store, ca)
    der = cert.public_bytes(Encoding.DER)

    async def with_admin_certificate(scope: Any, receive: Any, send: Any) -> None:
        scope["state"] = {**scope.get("state", {}), "tls_peer_cert": der}  # as server.py does
        await app(scope, receive, send)

    return store, with_admin_certificate


def get(asgi: Any, path: str) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(call())


def test_the_status_route_sends_exactly_what_the_store_builds(served: tuple[Store, Any]) -> None:
    store, asgi = served
    raw = store.status("c")
    answer = get(asgi, "/v1/admin/clusters/c")
    assert answer.status_code == 200, answer.text
    assert list(answer.json()) == list(raw)  # the same keys in the same order
    assert json.dumps(answer.json()) == json.dumps(raw)
    roles = {n["name"]: n["roles"] for n in answer.json()["nodes"]}
    assert roles["c-g-1"]["web"]["state"] == "pending"
    web = roles["c-g-0"]["web"]
    assert list(web) == ["state", "release", "exit_code", "output", "attributes"]
    assert web["attributes"] == {"url": "http://10.0.0.1"}


def test_a_role_without_a_recorded_state_is_its_state_alone() -> None:
    status = {
        "name": "c", "appliance": "x", "source": "dir", "pool": "local", "parameters": {},
        "counts": {}, "pools": {}, "ready": False,
        "nodes": [{"name": "c-g-0", "group": "g", "pool": "local", "address": None,
                   "state": "planned", "last_seen": None, "roles": {"web": {"state": "pending"}}}],
    }  # fmt: skip
    assert json.loads(CLUSTER_STATUS.dump_json(CLUSTER_STATUS.validate_python(status))) == status


def test_parameters_keep_their_json_type_through_the_status_model() -> None:
    params = {"on": True, "n": 2, "ratio": 0.5, "name": "x", "zero": 0, "off": False}
    status = {
        "name": "c", "appliance": "x", "source": "dir", "pool": "local", "parameters": params,
        "counts": {}, "pools": {}, "ready": True, "nodes": [],
    }  # fmt: skip
    checked = CLUSTER_STATUS.validate_python(status)
    assert {k: type(v) for k, v in checked["parameters"].items()} == {
        k: type(v) for k, v in params.items()
    }
    assert CLUSTER_STATUS.dump_json(checked) == json.dumps(status, separators=(",", ":")).encode()
    with pytest.raises(ValueError, match="parameters"):
        CLUSTER_STATUS.validate_python({**status, "parameters": {"bad": [1]}})


def test_the_status_model_refuses_a_status_missing_a_field(served: tuple[Store, Any]) -> None:
    store, _ = served
    broken: dict[str, Any] = dict(store.status("c"))
    del broken["ready"]
    with pytest.raises(ValueError, match="ready"):
        CLUSTER_STATUS.validate_python(broken)


def test_an_unknown_cluster_is_404_with_the_stores_message(served: tuple[Store, Any]) -> None:
    _, asgi = served
    answer = get(asgi, "/v1/admin/clusters/nope")
    assert answer.status_code == 404
    assert answer.json() == {"detail": "no cluster 'nope'"}


def test_admin_routes_refuse_a_caller_without_the_admin_certificate(tmp_path: Path) -> None:
    store = Store(open_engine(tmp_path / "crv.sqlite"))
    app = create_app(store, CertificateAuthority.create_or_load(tmp_path / "ca"))
    answer = get(app, "/v1/admin/clusters")
    assert answer.status_code == 401
    assert get(app, "/v1/health").json()["status"] == "ok"
