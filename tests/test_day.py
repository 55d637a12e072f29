"""A smaller 10-cluster day (issue 21): 2 web farms deployed at once through Prefect's API on
`crv up --postgres` with 2 service processes, each autoscaled on a schedule, resized and
destroyed; every flow run ends COMPLETED, no client sees a 5xx, nothing is left.

The day is `python -m benchmarks.bench_day` in a process of its own (Prefect's client reads its
server's address at import, and this one is the day's temporary CRV_HOME's), with its figures
handed back as JSON. The same day on SQLite runs in CI as that benchmark's smoke mode (`./dev
bench --smoke`), which fails on a run not COMPLETED, a 5xx, or anything left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not Path("/usr/lib/postgresql").is_dir(), reason="Debian's postgresql is not installed"
    ),
]

CLUSTERS = 2
DAY_TIMEOUT = 600.0  # seconds; the day takes about 2-3 minutes on 2 loaded cores


def run_day(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """The benchmark's day with `args`: its figures and its output. Stopped with SIGTERM if it
    overruns, so that it takes down what it started (its `finally`)."""
    out = tmp_path / "day.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_day", *args, "--json", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    day = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = day.communicate(timeout=DAY_TIMEOUT)
    except subprocess.TimeoutExpired:
        day.send_signal(signal.SIGTERM)
        output, _ = day.communicate(timeout=300)
        pytest.fail(f"the day did not end within {DAY_TIMEOUT:g} s:\n{output}")
    assert out.exists(), f"exit code {day.returncode}:\n{output}"
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures, output


def test_a_day_on_postgresql_ends_completed_without_5xx_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    figures, output = run_day(
        tmp_path, "--database", "postgresql", "--processes", "2", "--clusters", str(CLUSTERS),
        "--workers", "1", "--every", "10", "--hold", "12",
    )  # fmt: skip
    runs = figures["runs"]
    states = {flow: kind["states"] for flow, kind in runs.items()}
    assert figures["failures"] == [], output
    for flow in ("deploy-appliance", "scale-role", "destroy-cluster"):
        assert states.get(flow) == {"COMPLETED": CLUSTERS}, output
    # the schedules ran while the clusters lived, and every one of their runs completed too
    assert set(states["autoscale"]) == {"COMPLETED"}, output
    assert states["autoscale"]["COMPLETED"] >= CLUSTERS, output
    assert sum(figures["errors_5xx"].values()) == 0, output
    assert set(figures["errors_5xx"]) >= {"client", "prefect 503", "prefect 500", "service 500"}
    assert figures["left"] == [], output
    assert figures["database"] == "postgresql" and figures["db_bytes"] > 0
    assert "every run COMPLETED, 0 5xx, nothing left" in output
