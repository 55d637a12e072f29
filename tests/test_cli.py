"""The CLI surface beyond plan/validate: schema export, version, robustness to mangled input."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from crv.appliance.loader import load_appliance
from crv.base.errors import SpecError
from tests.conftest import CATALOG, REPO, crv


def current_schema() -> dict[str, object]:
    result = crv("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert isinstance(schema, dict)
    return schema


def test_schema_is_a_valid_json_schema_that_accepts_the_catalog() -> None:
    schema = current_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(CATALOG.glob("*/appliance.yaml")):
        document = yaml.safe_load(path.read_text())
        errors = [e.message for e in validator.iter_errors(document)]
        assert errors == [], path


@pytest.mark.parametrize(
    "mutation",
    [
        {"nodes": {"front": {"count": 1, "roles": ["lb"], "colour": "red"}}},
        {"apiVersion": "crv/v2"},
        {"name": "Bad_Name"},
        {"nodes": {"front": {"count": -1, "roles": ["lb"]}}},
        {"roles": {"lb": {"recipe": "lb.sh", "verify": {"http": "x", "tcp": 1}}}},
    ],
)
def test_schema_refuses_what_the_loader_refuses(mutation: dict[str, object]) -> None:
    document = yaml.safe_load((CATALOG / "webfarm" / "appliance.yaml").read_text())
    document.update(mutation)
    validator = jsonschema.Draft202012Validator(current_schema())
    assert list(validator.iter_errors(document)), mutation


def test_committed_schema_is_current() -> None:
    committed = json.loads((REPO / "docs" / "appliance.schema.json").read_text())
    assert committed == current_schema(), "run: crv schema -o docs/appliance.schema.json"


def test_schema_to_a_file(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    assert crv("schema", "--output", str(out)).exit_code == 0
    assert json.loads(out.read_text()) == current_schema()


def test_version() -> None:
    result = crv("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("crv ")


def test_mangled_appliances_give_spec_errors_never_crashes(tmp_path: Path) -> None:
    """Seeded random edits of a real appliance: each one loads or fails with a SpecError."""
    source = CATALOG / "webfarm"
    original = (source / "appliance.yaml").read_text()
    alphabet = [*"{}[]:,-&*!|>'\"#%@` \n\t0123456789abcxyz", "{{", "}}", "\x00", "é"]
    rng = random.Random(20261121)
    directory = tmp_path / "webfarm"
    directory.mkdir()
    (directory / "roles").mkdir()
    for recipe in ("web.sh", "lb.sh"):
        (directory / "roles" / recipe).write_text((source / "roles" / recipe).read_text())
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(400):
        text = list(original)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(text))
            action = rng.choice(("replace", "insert", "delete"))
            if action == "delete":
                del text[at]
            elif action == "insert":
                text.insert(at, rng.choice(alphabet))
            else:
                text[at] = rng.choice(alphabet)
        (directory / "appliance.yaml").write_text("".join(text), encoding="utf-8", errors="replace")
        try:
            load_appliance(directory)
            outcomes["ok"] += 1
        except SpecError as exc:
            assert "\n" not in str(exc)
            assert str(exc).startswith(str(directory))
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100  # the mutations really did break things


def test_dev_script_usage() -> None:
    help_ = subprocess.run([str(REPO / "dev"), "help"], capture_output=True, text=True)
    assert help_.returncode == 0
    assert "./dev test" in help_.stdout
    wrong = subprocess.run([str(REPO / "dev"), "nonsense"], capture_output=True, text=True)
    assert wrong.returncode == 2


@pytest.fixture
def no_daemons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty CRV_HOME; starting the daemons fails the test (the checks come first)."""
    from crv_cli import daemons

    home = tmp_path / "home"
    monkeypatch.setenv("CRV_HOME", str(home))

    def refuse(*_: object, **__: object) -> None:
        pytest.fail("the daemons were started before the input was checked")

    monkeypatch.setattr(daemons, "up", refuse)
    return home


@pytest.mark.parametrize("every", ["1s", "4.9", "banana", "0", "-5m", "2d"])
def test_autoscale_enable_with_a_bad_every_is_exit_2_before_anything_starts(
    no_daemons: Path, every: str
) -> None:
    r = crv("autoscale", "enable", "x", "--every", every)
    assert r.exit_code == 2, r.stdout
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: --every: {every}: "), line
    assert not no_daemons.exists()


def test_deploy_autoscale_needs_a_scaling_section_and_starts_nothing(no_daemons: Path) -> None:
    r = crv("deploy", str(CATALOG / "ganglia"), "--autoscale")
    assert r.exit_code == 2, r.stdout
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {CATALOG / 'ganglia'}"), line
    assert line.endswith(": nodes: --autoscale: no node group has a scaling section"), line
    assert r.stdout == "" and not (no_daemons / "service").exists()
    assert not (no_daemons / "prefect").exists()
    r = crv("deploy", str(CATALOG / "webfarm"), "--autoscale", "--autoscale-every", "1s")
    assert r.exit_code == 2 and "--autoscale-every: 1s: " in r.stderr and r.stderr.count("\n") == 1


def test_a_failed_prefect_request_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `crv` prints (exit 1) when the Prefect client gives up: the server's answer or why
    there was none, the request, and the server's log. (The end-to-end case, a locked Prefect
    database, is tests/test_deploy_e2e.py.)"""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    from crv_cli.main import _prefect_failure

    monkeypatch.setenv("CRV_HOME", str(tmp_path))
    log = tmp_path / "prefect" / "prefect.log"
    request = httpx.Request("POST", "http://127.0.0.1:4200/api/flow_runs/")
    error = httpx.HTTPStatusError("", request=request, response=httpx.Response(503))
    assert _prefect_failure(PrefectHTTPStatusError.from_httpx_error(error)) == (
        "the Prefect server answered 503 Service Unavailable to POST "
        "http://127.0.0.1:4200/api/flow_runs/; run the command again once it is back; "
        f"its log: {log}"
    )
    refused = httpx.ConnectError("[Errno 111] Connection refused", request=request)
    assert _prefect_failure(refused) == (
        "the Prefect server did not answer (ConnectError: [Errno 111] Connection refused) to "
        "POST http://127.0.0.1:4200/api/flow_runs/; run the command again once it is back; "
        f"its log: {log}"
    )
    assert _prefect_failure(ValueError("not ours")) is None
