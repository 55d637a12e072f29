"""Recipes of the catalog: all are valid shell; the demo's run for real with only python3.

The real agent and blackboard arrive with the deploy issue; until then a file-backed
`crv-agent` (set/get/list over a directory) stands in for it, so the web farm's recipes are
run as the agent will run them: in a work directory, with the CRV_* environment, on their own
loopback addresses, and the load balancer is then checked over real HTTP.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from crv.appliance import bundle
from crv.appliance.loader import load_appliance
from tests.conftest import CATALOG

RECIPES = sorted(CATALOG.glob("*/roles/*.sh"))  # run by the agent: executable
SHELL_FILES = sorted(CATALOG.glob("*/roles/**/*.sh"))  # recipes and the libraries they source

FAKE_AGENT = """#!/bin/sh
# crv-agent stand-in: attributes are files $BOARD/<role>/<node>/<key>
set -eu
case "$1" in
  set) mkdir -p "$BOARD/$CRV_ROLE/$CRV_NODE"; printf '%s\\n' "$3" > "$BOARD/$CRV_ROLE/$CRV_NODE/$2" ;;
  get) for f in "$BOARD/$2"/*/"$3"; do cat "$f"; break; done ;;
  list) for f in "$BOARD/$2"/*/"$3"; do cat "$f"; done ;;
esac
"""


@pytest.mark.parametrize(
    "recipe", RECIPES, ids=[f"{p.parent.parent.name}/{p.name}" for p in RECIPES]
)
def test_recipe_is_executable(recipe: Path) -> None:
    assert os.access(recipe, os.X_OK), f"{recipe} is not executable"


@pytest.mark.parametrize(
    "script", SHELL_FILES, ids=[str(p.relative_to(CATALOG)) for p in SHELL_FILES]
)
def test_shell_is_valid(script: Path) -> None:
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for pidfile in tmp_path.glob("*/*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def run_role(
    base: Path, node: str, role: str, address: str, port: int
) -> subprocess.CompletedProcess[str]:
    work = base / node
    work.mkdir(exist_ok=True)
    # the recipes run from the unpacked bundle, where crv's lib/crv.sh sits next to a0/
    appliance = base / "appliance"
    if not appliance.exists():
        data = bundle.build(load_appliance(CATALOG / "webfarm")).data
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(appliance, filter="data")
    env = {
        "PATH": f"{base / 'bin'}:{os.environ['PATH']}",
        "BOARD": str(base / "board"),
        "CRV_CLUSTER": "t",
        "CRV_NODE": node,
        "CRV_GROUP": node.split("-")[1],
        "CRV_ROLE": role,
        "CRV_ADDRESS": address,
        "CRV_APPLIANCE_DIR": str(appliance / "a0"),
        "CRV_PARAM_WORKERS": "2",
        "CRV_PARAM_PORT": str(port),
        "CRV_PARAM_RATE_EVERY": "1",
    }
    recipe = appliance / "a0" / "roles" / f"{role}.sh"
    return subprocess.run(
        [str(recipe)], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )


def test_webfarm_recipes_serve_round_robin_on_loopback(nodes: Path) -> None:
    (nodes / "bin").mkdir()
    agent = nodes / "bin" / "crv-agent"
    agent.write_text(FAKE_AGENT)
    agent.chmod(0o755)
    port = free_port()
    for i, address in enumerate(("127.0.0.2", "127.0.0.3")):
        done = run_role(nodes, f"t-worker-{i}", "web", address, port)
        assert done.returncode == 0, done.stderr
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/health", timeout=5) as r:
        assert r.read() == b"ok t-worker-0\n"
    done = run_role(nodes, "t-front-0", "lb", "127.0.0.4", port)
    assert done.returncode == 0, done.stderr
    assert (nodes / "board/lb/t-front-0/url").read_text() == f"http://127.0.0.4:{port}\n"
    answers = []
    for _ in range(4):
        with urllib.request.urlopen(f"http://127.0.0.4:{port}/", timeout=5) as r:
            answers.append(r.read().decode().strip())
    assert sorted(answers) == ["hello from t-worker-0"] * 2 + ["hello from t-worker-1"] * 2
    # the autoscaling metric: the proxy publishes its request rate every rate_every seconds
    rate = nodes / "board/lb/t-front-0/requests_per_second"
    deadline = time.monotonic() + 10
    while not (rate.exists() and float(rate.read_text()) > 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert float(rate.read_text()) > 0
    # re-contextualization after a shrink: the running proxy picks up the new backend list
    (nodes / "board/web/t-worker-1/url").unlink()
    assert run_role(nodes, "t-front-0", "lb", "127.0.0.4", port).returncode == 0
    for _ in range(3):
        with urllib.request.urlopen(f"http://127.0.0.4:{port}/", timeout=5) as r:
            assert r.read() == b"hello from t-worker-0\n"
