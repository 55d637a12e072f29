"""Shared helpers: run the real CLI, and write throw-away appliances into a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crv_cli.main import app
from tests.vm_fixtures import built_image  # noqa: F401  (real guests' image, session-scoped)

# Parallel workers (pytest-xdist, `-n` in pyproject.toml) each give their local pools their own
# 127.N.0.0/16, so two tests' nodes never share a loopback address (and a port on it).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and _WORKER[2:].isdigit():
    os.environ["CRV_LOCAL_NET"] = f"127.{20 + int(_WORKER[2:])}"
LOCAL_NET = os.environ.get("CRV_LOCAL_NET", "127.0")

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "appliances"


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def crv(*args: str) -> Result:
    """Run the CLI in-process (fast; the same code path as the installed command)."""
    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return Result(r.exit_code, r.stdout, r.stderr)


def crv_process(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run `crv` as a real separate process, for what only a process can show."""
    p = subprocess.run(
        [sys.executable, "-m", "crv_cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    return Result(p.returncode, p.stdout, p.stderr)


def write_appliance(root: Path, name: str, yaml_text: str, recipes: tuple[str, ...] = ()) -> Path:
    """An appliance dir `root/name` with `appliance.yaml` and empty executable recipes."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "appliance.yaml").write_text(textwrap.dedent(yaml_text))
    for recipe in recipes:
        path = directory / recipe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    return directory


def chain(error: BaseException) -> list[BaseException]:
    """An exception and every one it was raised from or during, each once: where a secret
    could hide when the error is logged with its traceback."""
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def crl_serials(pem: bytes) -> set[int]:
    """Every serial on the service's CRLs (GET /v1/crl sends one CRL per issuer: the root's,
    then each cluster CA's, in one PEM file)."""
    from cryptography import x509

    blocks = pem.split(b"-----END X509 CRL-----")
    found: set[int] = set()
    for block in blocks:
        if b"-----BEGIN X509 CRL-----" in block:
            crl = x509.load_pem_x509_crl(block.strip() + b"\n-----END X509 CRL-----\n")
            found.update(entry.serial_number for entry in crl)
    return found


@pytest.fixture
def catalog() -> Path:
    return CATALOG


# The bare-metal tests run OpenIPMI's ipmi_sim (Debian openipmi; `./dev test` installs it as
# root). Skipped where it is missing, except in CI (CI=true), where a missing simulator fails.
needs_ipmi_sim = pytest.mark.skipif(
    not os.access("/usr/bin/ipmi_sim", os.X_OK) and os.environ.get("CI") != "true",
    reason="OpenIPMI's ipmi_sim (Debian package openipmi) is not installed",
)


# A real PostgreSQL (issue 21), from Debian's package: one per test session and xdist worker, a
# database of its own per test that asks for `fresh_database`.
from collections.abc import Iterator  # noqa: E402

from crv_cli.postgres import LocalPostgres, PostgresError, postgres_binaries  # noqa: E402


@pytest.fixture(scope="session")
def local_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """The session's PostgreSQL, started; skips when Debian's postgresql is absent."""
    try:
        postgres_binaries()
    except PostgresError as e:
        pytest.skip(str(e))
    server = LocalPostgres(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_url(local_postgres: LocalPostgres) -> str:
    """A real PostgreSQL for this test session (per xdist worker): its URL (database `crv`,
    role `crv`); skips when Debian's postgresql is absent."""
    return local_postgres.url


@pytest.fixture
def fresh_database(local_postgres: LocalPostgres) -> Iterator[str]:
    """A new empty database of the session's PostgreSQL (owner crv, with pg_trgm): its URL.
    Dropped afterwards, its connections ended first."""
    import secrets

    name = f"t_{secrets.token_hex(6)}"
    url = local_postgres.create_database(name)
    try:
        yield url
    finally:
        local_postgres.drop_database(name)


STORE_ROLES = {
    "web": {"recipe": "roles/web.sh", "appdir": "a0", "env": {}, "depends_on": []},
    "mon": {"recipe": "roles/mon.sh", "appdir": "a1", "env": {}, "depends_on": []},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """crv's store with a cluster "c" (roles STORE_ROLES), on both databases: SQLite in a file,
    a fresh PostgreSQL database."""
    from crv.service.database import open_engine
    from crv.service.store import Store

    if request.param == "sqlite":
        s = Store(open_engine(tmp_path / "crv.sqlite"))
    else:
        s = Store(open_engine(request.getfixturevalue("fresh_database")))
    request.addfinalizer(s.engine.dispose)
    s.put_cluster("c", appliance="x", source="dir", pool="local", parameters={},
                  roles=STORE_ROLES, bundle=b"b")  # fmt: skip
    return s


def cluster_events(
    api: Any, cluster: str, event: str, count: int = 0, deadline: float = 20.0
) -> list[Any]:
    """Prefect's `event` events on cluster `cluster` (`api`: an httpx client on Prefect's API),
    oldest first; waits up to `deadline` s for `count` of them (they reach the server a moment
    after the flow emitted them)."""
    import time

    body = {
        "filter": {
            "event": {"name": [event]},
            "resource": {"id": [f"crv.cluster.{cluster}"]},
            "order": "ASC",
        },
        "limit": 50,
    }
    end = time.monotonic() + deadline
    while True:
        r = api.post("/events/filter", json=body)
        assert r.status_code == 200, r.text
        found = list(r.json()["events"])
        if len(found) >= count or time.monotonic() > end:
            return found
        time.sleep(0.5)
