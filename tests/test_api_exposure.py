"""The Prefect API as an attacker with the credentials, or a careless script, meets it; and the
secrets a deploy handles, looked for wherever Prefect and crv keep anything (FAULTS-AND-ATTACKS:
"Prefect API exposure"), against a real `crv up`.

Parameters. Every deployment's run form (deployments.forms) is closed and bounded: a parameter
the flow does not have, text over its length, a map over its keys, a value of the wrong type or
nested where a string belongs is refused when the run is created, HTTP 409 naming the field, and
no flow run exists afterwards (nothing can be provisioned). Prefect itself refuses parameters
over 512 KiB in all (422 naming `parameters`) and a body nested too deep to parse (400). Two
things the schema cannot do are written down here: a caller may ask for a run without the
schema (`enforce_parameter_schema: false`), and then the flow's own checks stop the run before
any node; and Prefect bounds nothing of a run request but its parameters (a 20 MiB `labels` is
stored), which only a proxy in front of the API could stop.

Secrets. After a deploy on the local pool (in the CLI's process) and a resize through the API
(in the served process), the real values (each node's enrolment token, caught in its
bootstrap.json before the agent scrubs it; the API password; the private keys of the service,
its CA, the admin client and every node) are in none of: the files under CRV_HOME (Prefect's
database with its WAL, crv's and Prefect's logs, the nodes' logs) but each one's own file,
anything Prefect's API gives back (flow and task runs, logs, artifacts, events, variables,
deployments, blocks), any process's command line, a node process's environment. Each search is
shown to work first: a canary written through each API channel is found by it and in the
database's bytes, each secret is found in its own file.

The end-to-end tests (one `crv up` for the module) are marked `faults` (`./dev test -m faults`);
the check of the forms themselves runs in the default suite.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets as random
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from deployments import forms
from tests.conftest import CATALOG, REPO
from tests.test_deploy_e2e import Crv, free_port, started_crv

DEPLOYMENTS = (
    "deploy-appliance/crv",
    "scale-role/crv",
    "destroy-cluster/crv",
    "repair-cluster/crv",
)
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# a valid run of each deployment, to which a case adds its bad part (never run: refused)
VALID: dict[str, dict[str, Any]] = {
    "deploy-appliance/crv": {"appliance": "webfarm"},
    "scale-role/crv": {"name": "apx", "group": "worker", "count": 1},
    "destroy-cluster/crv": {"name": "apx"},
    "repair-cluster/crv": {"name": "apx"},
}
KIB_64 = "a" * 65_536  # under Prefect's 512 KiB: the form must refuse it
MIB = "a" * (1 << 20)  # over it: Prefect refuses it before the form is read
WIDE = 10_000  # keys of a map


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    yield from started_crv(tmp_path_factory)


def api_url(crv: Crv) -> str:
    return str(json.loads((crv.home / "prefect" / "daemon.json").read_text())["url"])


@pytest.fixture(scope="module")
def api(crv: Crv) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url(crv), auth=crv.prefect_auth, timeout=120) as client:
        yield client


def deployment_id(api: httpx.Client, name: str) -> str:
    r = api.get(f"/deployments/name/{name}")
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def run_ids(api: httpx.Client) -> set[str]:
    """Every flow run the server has (`/flow_runs/filter`, page by page)."""
    found: set[str] = set()
    while True:
        r = api.post("/flow_runs/filter", json={"limit": 200, "offset": len(found)})
        assert r.status_code == 200, r.text
        page = {run["id"] for run in r.json()}
        found |= page
        if len(page) < 200:
            return found


def create_run(api: httpx.Client, name: str, body: dict[str, Any] | str) -> httpx.Response:
    """POST create_flow_run; `body` as JSON, or as the raw text when a str."""
    url = f"/deployments/{deployment_id(api, name)}/create_flow_run"
    if isinstance(body, str):
        return api.post(url, content=body, headers={"content-type": "application/json"})
    return api.post(url, json=body)


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


# -- parameters ------------------------------------------------------------------------------


def open_fields(schema: dict[str, Any]) -> list[str]:
    """The fields (or options of a field) of a form without a size bound of their own."""
    bound = {"string": "maxLength", "object": "maxProperties", "array": "maxItems"}
    found = []
    for name, prop in schema["properties"].items():
        for option in [prop, *prop.get("anyOf", [])]:
            types = option.get("type", [])
            for kind in [types] if isinstance(types, str) else types:
                keyword = bound.get(kind)
                if keyword and keyword not in option and keyword not in prop:
                    found.append(f"{name}: {kind}")
    return found


def test_every_form_is_closed_and_bounded() -> None:
    """No form takes a parameter its flow lacks, and none has a field of text, map or list
    without a size bound: those the forms shape are bounded by what they hold (a name by 63,
    an enum by its longest value, parameters by the catalog's), a field a flow gains later by
    `bounded`'s defaults. (Prefect's generated schema, as for these flows today, plus such a
    new field of each kind.)"""
    entries = forms.catalog([CATALOG])
    new = {
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "labels": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "hosts": {"type": "array", "items": {"type": "string"}},
    }

    def text() -> dict[str, Any]:  # each field its own (a copy keeps shared ones shared)
        return {"type": "string"}

    def nullable() -> dict[str, Any]:
        return {"anyOf": [{"type": "object"}, {"type": "null"}]}

    built = {
        "deploy": forms.deploy_form(
            {
                "type": "object",
                "properties": {
                    "appliance": text(),
                    "pool": {**text(), "default": "local"},
                    "name": {"anyOf": [text(), {"type": "null"}]},
                    "parameters": nullable(),
                    "counts": nullable(),
                    "pools": nullable(),
                    "boot_timeout": {"type": "number"},
                    "on_failure": {
                        "anyOf": [{**text(), "enum": ["keep", "rollback"]}, {"type": "null"}]
                    },
                    **new,
                },
            },
            entries,
            ["local", "sim"],
        ),
        "scale": forms.scale_form(
            {"properties": {"name": text(), "group": text(), "count": {"type": "integer"}, **new}},
            entries,
        ),
        "destroy": forms.destroy_form(
            {"properties": {"name": text(), "pool": text(), **new}}, ["local"]
        ),
        "repair": forms.repair_form({"properties": {"name": text(), **new}}),
    }
    for which, schema in built.items():
        assert schema["additionalProperties"] is False, which
        assert open_fields(schema) == [], which
        props = schema["properties"]
        assert props["note"]["anyOf"][0]["maxLength"] == forms.TEXT_MAX
        assert props["labels"]["anyOf"][0]["maxProperties"] == forms.KEYS_MAX
        assert props["hosts"]["maxItems"] == forms.ITEMS_MAX
    deploy = built["deploy"]["properties"]
    assert deploy["appliance"]["maxLength"] == max(map(len, entries))
    assert deploy["pool"]["maxLength"] == len("local")
    most = max(len(e.appliance.parameter_specs) for e in entries.values())
    assert deploy["parameters"]["maxProperties"] >= most
    assert deploy["counts"]["maxProperties"] >= max(
        len(e.appliance.groups) for e in entries.values()
    )
    # the chosen appliance's parameters: integer text no longer than the loader reads
    rule = next(
        r["then"]
        for r in built["deploy"]["allOf"]
        if r.get("if", {}).get("properties", {}).get("appliance", {}).get("const") == "webfarm"
    )
    assert rule["properties"]["parameters"]["properties"]["workers"]["maxLength"] == 19


Says = str | tuple[str, ...]


def assert_refused(
    crv: Crv, api: httpx.Client, name: str, body: dict[str, Any] | str, status: int, says: Says
) -> None:
    """`body` refused with `status`, the answer saying each of `says`; no run made, no node."""
    runs, agents = run_ids(api), sorted(crv.node_agents())
    r = create_run(api, name, body)
    assert r.status_code == status, r.text[:500]
    answer = r.json()
    detail = answer.get("detail")
    said = detail if isinstance(detail, str) else json.dumps(answer, separators=(",", ":"))
    for text in (says,) if isinstance(says, str) else says:
        assert text in said, (text, said[:500])
    assert run_ids(api) == runs  # no run: nothing can be provisioned
    assert sorted(crv.node_agents()) == agents


@pytest.mark.faults
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_an_unexpected_parameter_is_refused_by_every_deployment(
    crv: Crv, api: httpx.Client, name: str
) -> None:
    """Before: 201 and a run, which crashed binding `shell` to the flow."""
    body = {"parameters": {**VALID[name], "shell": "rm -rf /"}}
    assert_refused(crv, api, name, body, 409, ("Validation failed.", "('shell' was unexpected)"))


def failed_for(name: str) -> str:
    return f"Validation failed for field {name}."


DEPLOY = "deploy-appliance/crv"
# Prefect's own limit, before the form is read: names the body's field
TOO_BIG = ('"loc":["body","parameters"]', "Flow run parameters must be less than 524,288 bytes")

CASES: list[tuple[str, str, dict[str, Any], int, Says]] = [
    # oversized text: the form's maxLength names the field; over 512 KiB, Prefect's own limit
    ("name-64k", DEPLOY, {"appliance": "webfarm", "name": KIB_64}, 409, failed_for("'name'")),
    ("name-1m", DEPLOY, {"appliance": "webfarm", "name": MIB}, 422, TOO_BIG),
    ("appliance-64k", DEPLOY, {"appliance": KIB_64}, 409, failed_for("'appliance'")),
    ("pool-64k", DEPLOY, {"appliance": "webfarm", "pool": KIB_64}, 409, failed_for("'pool'")),
    ("pool-1m", DEPLOY, {"appliance": "webfarm", "pool": MIB}, 422, TOO_BIG),
    # before: 201 (digits match the integer pattern) and a run that failed in the flow
    (
        "integer-text-64k",
        DEPLOY,
        {"appliance": "webfarm", "parameters": {"workers": "9" * 65_536}},
        409,
        failed_for("'parameters.workers'"),
    ),
    (
        "string-parameter-64k",
        DEPLOY,
        {"appliance": "webshop", "parameters": {"db-database": KIB_64}},
        409,
        failed_for("\"parameters['db-database']\""),
    ),
    (
        "parameter-value-1m",
        DEPLOY,
        {"appliance": "webshop", "parameters": {"db-database": MIB}},
        422,
        TOO_BIG,
    ),
    (
        "scale-group-64k",
        "scale-role/crv",
        {"name": "apx", "group": KIB_64, "count": 1},
        409,
        failed_for("'group'"),
    ),
    ("repair-name-64k", "repair-cluster/crv", {"name": KIB_64}, 409, failed_for("'name'")),
    (
        "destroy-pool-64k",
        "destroy-cluster/crv",
        {"name": "apx", "pool": KIB_64},
        409,
        failed_for("'pool'"),
    ),
    # maps of 10,000 keys: refused by their size, before any key is read
    (
        "parameters-10k-keys",
        DEPLOY,
        {"appliance": "webfarm", "parameters": {f"k{i}": "1" for i in range(WIDE)}},
        409,
        (failed_for("'parameters'"), "has too many properties"),
    ),
    (
        "counts-10k-keys",
        DEPLOY,
        {"appliance": "webfarm", "counts": {f"k{i}": 1 for i in range(WIDE)}},
        409,
        (failed_for("'counts'"), "has too many properties"),
    ),
    (
        "pools-10k-keys",
        DEPLOY,
        {"appliance": "webfarm", "pools": {f"k{i}": "local" for i in range(WIDE)}},
        409,
        (failed_for("'pools'"), "has too many properties"),
    ),
    # deep nesting: where a string or a number belongs, or under a key the flow lacks
    (
        "nested-parameter",
        DEPLOY,
        {"appliance": "webfarm", "parameters": {"workers": nested(200)}},
        409,
        failed_for("'parameters.workers'"),
    ),
    (
        "nested-count",
        DEPLOY,
        {"appliance": "webfarm", "counts": {"worker": nested(200)}},
        409,
        failed_for("'counts.worker'"),
    ),
    (  # before: 201
        "nested-unexpected",
        DEPLOY,
        {"appliance": "webfarm", "deep": nested(200)},
        409,
        "('deep' was unexpected)",
    ),
    # wrong types
    ("appliance-list", DEPLOY, {"appliance": ["webfarm"]}, 409, failed_for("'appliance'")),
    (
        "parameters-list",
        DEPLOY,
        {"appliance": "webfarm", "parameters": ["workers=2"]},
        409,
        failed_for("'parameters'"),
    ),
    (
        "parameter-number",
        DEPLOY,
        {"appliance": "webfarm", "parameters": {"workers": 2}},
        409,
        failed_for("'parameters.workers'"),
    ),
    (
        "count-text",
        DEPLOY,
        {"appliance": "webfarm", "counts": {"worker": "2"}},
        409,
        failed_for("'counts.worker'"),
    ),
    ("name-number", DEPLOY, {"appliance": "webfarm", "name": 42}, 409, failed_for("'name'")),
    (
        "retries-text",
        DEPLOY,
        {"appliance": "webfarm", "retries": "two"},
        409,
        failed_for("'retries'"),
    ),
    (
        "timeout-text",
        DEPLOY,
        {"appliance": "webfarm", "boot_timeout": "300"},
        409,
        failed_for("'boot_timeout'"),
    ),
    (
        "on-failure-unknown",
        DEPLOY,
        {"appliance": "webfarm", "on_failure": "explode"},
        409,
        failed_for("'on_failure'"),
    ),
    (
        "scale-count-text",
        "scale-role/crv",
        {"name": "apx", "group": "worker", "count": "1"},
        409,
        failed_for("'count'"),
    ),
    (
        "scale-count-fraction",
        "scale-role/crv",
        {"name": "apx", "group": "worker", "count": 1.5},
        409,
        failed_for("'count'"),
    ),
    ("destroy-wait-text", "destroy-cluster/crv", {"name": "apx", "wait": "soon"}, 409, "'wait'"),
    ("repair-name-null", "repair-cluster/crv", {"name": None}, 409, failed_for("'name'")),
]


@pytest.mark.faults
@pytest.mark.parametrize(
    ("name", "parameters", "status", "says"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_hostile_parameters_are_refused_when_the_run_is_created(
    crv: Crv, api: httpx.Client, name: str, parameters: dict[str, Any], status: int, says: Says
) -> None:
    assert_refused(crv, api, name, {"parameters": parameters}, status, says)


@pytest.mark.faults
def test_a_body_prefect_cannot_parse_or_type_is_refused(crv: Crv, api: httpx.Client) -> None:
    """Nested 100,000 deep the JSON does not parse (400); parameters that are not a map are
    not a run request (422 naming `parameters`)."""
    deep = "[" * 100_000 + "]" * 100_000
    body = '{"parameters": {"appliance": "webfarm", "parameters": {"workers": ' + deep + "}}}"
    assert_refused(crv, api, DEPLOY, body, 400, "There was an error parsing the body")
    assert_refused(crv, api, DEPLOY, {"parameters": "appliance=webfarm"}, 422, '"parameters"')


@pytest.mark.faults
@pytest.mark.parametrize(
    ("parameters", "ends", "says"),
    [
        ({"appliance": "webfarm", "shell": "rm -rf /"}, "CRASHED", ""),
        ({"appliance": "webfarm", "pool": "cloud9"}, "FAILED", "cloud9: unknown pool"),
        (
            {"appliance": "webfarm", "parameters": {"workers": "9" * 65_536}},
            "FAILED",
            "workers: '99999",
        ),
        (
            {"appliance": str(REPO / "appliances" / "webfarm")},
            "FAILED",
            "takes an appliance of the catalog by its name, not a path",
        ),
    ],
    ids=["unexpected", "unknown-pool", "integer-text-64k", "a-path"],
)
def test_a_run_asked_without_the_schema_still_fails_before_any_node(
    crv: Crv, api: httpx.Client, parameters: dict[str, Any], ends: str, says: str
) -> None:
    """The request may turn the schema off for its run (Prefect's `enforce_parameter_schema`,
    which whoever has the credentials may also change on the deployment): the run is made, and
    the flow's own checks end it before anything is provisioned."""
    agents = sorted(crv.node_agents())
    r = create_run(api, DEPLOY, {"parameters": parameters, "enforce_parameter_schema": False})
    assert r.status_code == 201, r.text[:500]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = api.get(f"/flow_runs/{r.json()['id']}").json()["state"]
        if state["type"] in FINAL:
            break
        time.sleep(0.5)
    assert state["type"] == ends, state
    assert says in (state["message"] or ""), state
    assert sorted(crv.node_agents()) == agents


@pytest.mark.faults
def test_a_20_mib_parameters_body_is_refused(crv: Crv, api: httpx.Client) -> None:
    parameters = {"name": "apx", "pool": "local", "note": "a" * (20 << 20)}
    assert_refused(crv, api, "destroy-cluster/crv", {"parameters": parameters}, 422, TOO_BIG)


# -- secrets ---------------------------------------------------------------------------------


def key_needles(pem: bytes) -> list[bytes]:
    """What of a private key PEM is secret, in the forms it could be copied in: the private
    value (raw, hex) and each PEM line that holds part of it (a line is 48 bytes of the DER;
    the lines of the public key alone are left out, they are in certificates too)."""
    key = load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), type(key)
    size = (key.curve.key_size + 7) // 8
    scalar = key.private_numbers().private_value.to_bytes(size, "big")
    body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    assert all(len(line) == 64 for line in body[:-1]), pem  # the usual wrapping
    at = base64.b64decode(b"".join(body)).index(scalar)
    lines = [line for i, line in enumerate(body) if 48 * i < at + size and at < 48 * (i + 1)]
    return [scalar, scalar.hex().encode(), *lines]


@dataclass
class Secrets:
    """Each secret by what it is: its needles (any of them found is a leak), and the files
    under CRV_HOME where it belongs."""

    needles: dict[str, list[bytes]] = field(default_factory=dict)
    homes: dict[str, set[Path]] = field(default_factory=dict)
    bootstraps: dict[str, bytes] = field(default_factory=dict)  # node -> its file, with token
    canaries: dict[str, str] = field(default_factory=dict)  # API channel -> canary value

    def add(self, what: str, needles: list[bytes], *homes: Path) -> None:
        assert all(len(n) >= 16 for n in needles), f"{what}: too short to search for"
        self.needles[what] = needles
        self.homes[what] = set(homes)

    def found_in(self, data: bytes) -> set[str]:
        return {what for what, needles in self.needles.items() if any(n in data for n in needles)}


class BootstrapWatch:
    """Copies every bootstrap.json of the local pool that holds a token, while it does (the
    agent scrubs the token once enrolled)."""

    def __init__(self, pools: Path) -> None:
        self.pools = pools
        self.seen: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BootstrapWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.pools.glob("*/*/bootstrap.json"):
                try:
                    data = path.read_bytes()
                    token = json.loads(data).get("token")
                except (OSError, ValueError):
                    continue
                if token:
                    self.seen.setdefault(path.parent.name, data)
            time.sleep(0.005)


def wait_run(api: httpx.Client, run_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state: dict[str, Any] = api.get(f"/flow_runs/{run_id}").json()["state"]
        if state["type"] in FINAL:
            return state
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not end in {timeout} s")


@pytest.fixture(scope="module")
def deployed(crv: Crv, api: httpx.Client) -> Secrets:
    """A web farm of one worker deployed by the CLI (the flow in its process), resized to two
    workers through the API (the flow in the served process); its secrets, and a canary
    written through each channel of Prefect's API."""
    found = Secrets()
    with BootstrapWatch(crv.home / "pools") as watch:
        r = crv("deploy", "webfarm", "--pool", "local", "--name", "vault",
                "--set", "workers=1", "--set", f"port={free_port()}")  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        body = {"parameters": {"name": "vault", "group": "worker", "count": 2}}
        created = create_run(api, "scale-role/crv", body)
        assert created.status_code == 201, created.text
        state = wait_run(api, created.json()["id"])
        assert state["type"] == "COMPLETED", state
    nodes = ["vault-front-0", "vault-worker-0", "vault-worker-1"]
    assert sorted(watch.seen) == nodes, f"tokens seen for {sorted(watch.seen)} only"
    found.bootstraps = watch.seen
    for node, data in watch.seen.items():
        found.add(f"enrolment token of {node}", [json.loads(data)["token"].encode()])

    credentials = crv("api-credentials", "--json")
    assert credentials.returncode == 0, credentials.stderr
    auth = json.loads(credentials.stdout)["auth_string"]
    password = auth.partition(":")[2]
    basic = base64.b64encode(auth.encode())  # as an Authorization header carries it
    found.add("API password", [password.encode(), basic], crv.home / "prefect" / "api-auth")

    for key in ("service/admin.key", "service/server.key", "ca/ca.key"):
        path = crv.home / key
        found.add(f"private key {key}", key_needles(path.read_bytes()), path)
    for node in nodes:
        path = crv.home / "pools" / "local" / node / "node.key"
        found.add(f"private key of {node}", key_needles(path.read_bytes()), path)

    found.canaries = write_canaries(crv, api)
    return found


def write_canaries(crv: Crv, api: httpx.Client) -> dict[str, str]:
    """One value per channel of Prefect's API, written through it (the search of that channel
    and of the database must find it)."""
    now = datetime.now(timezone.utc).isoformat()
    canaries = {c: f"canary-{random.token_hex(12)}" for c in ("log", "artifact", "variable")}
    canaries |= {
        "event": f"canary-{random.token_hex(12)}",
        "parameter": f"canary-{random.token_hex(12)}",
    }
    log = {"name": "canary", "level": 20, "message": canaries["log"], "timestamp": now}
    assert api.post("/logs/", json=[log]).status_code == 201
    artifact = {"key": "canary", "type": "markdown", "data": canaries["artifact"]}
    assert api.post("/artifacts/", json=artifact).status_code == 201
    variable = {"name": "canary", "value": canaries["variable"]}
    assert api.post("/variables/", json=variable).status_code == 201
    event = {
        "id": str(uuid.uuid4()),
        "occurred": now,
        "event": "crv.canary",
        "resource": {"prefect.resource.id": "crv.canary"},
        "payload": {"value": canaries["event"]},
    }
    assert api.post("/events", json=[event]).status_code == 204
    # a run made cancelled: its parameters are stored, it never runs
    body = {"parameters": {"name": canaries["parameter"]}, "state": {"type": "CANCELLED"}}
    assert create_run(api, "destroy-cluster/crv", body).status_code == 201
    return canaries


def files_under(root: Path) -> Iterator[tuple[Path, bytes]]:
    """Every regular file under `root` with its bytes (symlinks: their target; a FIFO or a
    device would be a finding, so it is given as its path)."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            try:
                st = path.lstat()
                if stat.S_ISSOCK(st.st_mode):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    yield path, os.readlink(path).encode()
                elif stat.S_ISREG(st.st_mode):
                    yield path, path.read_bytes()
                else:
                    yield path, str(path).encode()
            except FileNotFoundError:  # gone meanwhile (a lock, a journal)
                continue


@pytest.mark.faults
def test_each_secret_is_found_where_it_belongs(crv: Crv, deployed: Secrets) -> None:
    """The searches below can find what they look for: each secret in its own file, each
    token in its node's bootstrap.json as the pool wrote it."""
    for what, homes in deployed.homes.items():
        for path in homes:
            assert what in deployed.found_in(path.read_bytes()), (what, path)
    for node, data in deployed.bootstraps.items():
        assert deployed.found_in(data) == {f"enrolment token of {node}"}
        # and the agent did scrub it once enrolled
        now = (crv.home / "pools" / "local" / node / "bootstrap.json").read_bytes()
        assert b'"token"' not in now and deployed.found_in(now) == set()


@pytest.mark.faults
def test_no_secret_in_any_file_under_the_crv_home(
    crv: Crv, api: httpx.Client, deployed: Secrets
) -> None:
    """Prefect's database (with its WAL, as bytes: rows deleted but not yet overwritten too),
    crv's service and serve logs, Prefect's log, the nodes' logs and records: a secret only in
    its own file. The canaries written through the API are in the database's bytes."""
    canaries = {c: v.encode() for c, v in deployed.canaries.items() if c != "event"}
    wait_for_event(api, deployed.canaries["event"])
    canaries["event"] = deployed.canaries["event"].encode()
    leaks, scanned, database = [], [], b""
    for path, data in files_under(crv.home):
        scanned.append(path)
        for what in deployed.found_in(data):
            if path not in deployed.homes[what]:
                leaks.append(f"{what} in {path}")
        if path.name.startswith("prefect.db"):
            database += data
    assert leaks == []
    prefect = crv.home / "prefect"
    assert {prefect / "prefect.db", prefect / "prefect.db-wal"} <= set(scanned)
    assert {p for p in scanned if p.suffix == ".log"} >= {
        crv.home / "service" / "service.log",
        prefect / "prefect.log",
        prefect / "deployments.log",  # the served process
        crv.home / "pools" / "local" / "vault-worker-1" / "agent.log",
    }
    assert [c for c, v in canaries.items() if v not in database] == []


def wait_for_event(api: httpx.Client, value: str) -> None:
    """Events are stored a few seconds after they are sent."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if value in json.dumps(read_events(api, {"event": {"name": ["crv.canary"]}})):
            return
        time.sleep(1)
    raise AssertionError("the canary event was not stored in 60 s")


def read_events(api: httpx.Client, extra: dict[str, Any] | None = None) -> list[Any]:
    since = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    r = api.post(
        "/events/filter",
        json={"filter": {"occurred": {"since": since}, **(extra or {})}, "limit": 50},
    )
    assert r.status_code == 200, r.text
    page = r.json()
    events = list(page["events"])
    while page.get("next_page"):
        r = api.get(page["next_page"])
        assert r.status_code == 200, r.text
        page = r.json()
        events += page["events"]
    return events


def read_all(api: httpx.Client, path: str, body: dict[str, Any] | None = None) -> list[Any]:
    """Every object of a `/…/filter` route, page by page."""
    found: list[Any] = []
    while True:
        r = api.post(path, json={**(body or {}), "limit": 200, "offset": len(found)})
        assert r.status_code == 200, (path, r.text)
        page = r.json()
        found += page
        if len(page) < 200:
            return found


@pytest.mark.faults
def test_no_secret_through_the_prefect_api(api: httpx.Client, deployed: Secrets) -> None:
    """What Prefect's API gives back of the deploy, the resize and everything else: flow runs
    (their parameters and states), task runs, logs, artifacts, events, variables, deployments
    and block documents (secrets included) hold no secret; each canary is found in its
    channel, so the channel was read."""
    wait_for_event(api, deployed.canaries["event"])
    channels = {
        "flow runs": read_all(api, "/flow_runs/filter"),
        "task runs": read_all(api, "/task_runs/filter"),
        "logs": read_all(api, "/logs/filter"),
        "artifacts": read_all(api, "/artifacts/filter"),
        "events": read_events(api),
        "variables": read_all(api, "/variables/filter"),
        "deployments": read_all(api, "/deployments/filter"),
        "blocks": read_all(api, "/block_documents/filter", {"include_secrets": True}),
    }
    text = {c: json.dumps(objects).encode() for c, objects in channels.items()}
    canary_in = {
        "parameter": "flow runs", "log": "logs", "artifact": "artifacts",
        "event": "events", "variable": "variables",
    }  # fmt: skip
    for canary, channel in canary_in.items():
        assert deployed.canaries[canary].encode() in text[channel], canary
    # the deploy and the resize are there to search
    vault = [r for r in channels["flow runs"] if r["parameters"].get("name") == "vault"]
    assert len(vault) == 2, vault  # the deploy and the resize
    assert b"cluster vault" in text["logs"] and b"provision[worker]" in text["task runs"]
    assert b"vault" in text["events"]
    leaks = [f"{what} in {c}" for c, data in text.items() for what in deployed.found_in(data)]
    assert leaks == []


def command_lines() -> dict[int, bytes]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                continue
    return found


@pytest.mark.faults
def test_no_secret_on_a_command_line_or_in_a_node_environment(crv: Crv, deployed: Secrets) -> None:
    """No process of the host has a secret among its arguments (the daemons of this home
    included); the nodes' processes (an appliance's recipes run there) have none in their
    environment either. A process started here with a canary argument is seen."""
    canary = f"canary-{random.token_hex(12)}"
    witness = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)", canary],
        stdout=subprocess.PIPE,
    )
    try:
        # read /proc once the witness runs: during its exec its command line reads empty
        assert witness.stdout is not None and witness.stdout.readline() == b"up\n"
        lines = command_lines()
        assert canary.encode() in lines[witness.pid]
    finally:
        os.kill(witness.pid, signal.SIGKILL)
        witness.wait()
    daemons = {
        json.loads((crv.home / d / f).read_text())["pid"]
        for d, f in (
            ("service", "daemon.json"),
            ("prefect", "daemon.json"),
            ("prefect", "serve.json"),
        )
    }
    assert daemons <= set(lines), daemons
    leaks = [f"{what} on the command line of {pid}: {line[:80]!r}"
             for pid, line in lines.items() for what in deployed.found_in(line)]  # fmt: skip
    nodes = crv.node_processes()
    assert len(nodes) >= 3
    for pid in nodes:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        assert re.search(rb"(^|\0)CRV_LOCAL_NODE=vault-", environ)
        leaks += [f"{what} in the environment of node process {pid}"
                  for what in deployed.found_in(environ)]  # fmt: skip
    assert leaks == []


# -- what only a proxy could do --------------------------------------------------------------


@pytest.mark.faults
@pytest.mark.xfail(
    strict=True,
    reason="Prefect bounds only a run request's parameters (512 KiB): 20 MiB in its labels, "
    "context, name, tags, job_variables or idempotency_key is stored (HTTP 201); a body limit "
    "needs a proxy in front of the API",
)
def test_a_20_mib_body_outside_the_parameters_is_refused(crv: Crv, api: httpx.Client) -> None:
    runs = run_ids(api)
    body = {
        "parameters": {"name": "apx"},
        "labels": {"note": "a" * (20 << 20)},
        "state": {"type": "CANCELLED"},  # if stored, never run
    }
    r = create_run(api, "destroy-cluster/crv", body)
    for new in run_ids(api) - runs:
        api.delete(f"/flow_runs/{new}")
    assert r.status_code in (413, 422), r.status_code
