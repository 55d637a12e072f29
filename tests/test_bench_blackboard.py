"""The blackboard benchmark runs (smoke size, as CI runs it), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_blackboard_benchmark_measures_real_requests() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_blackboard", "--smoke", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["agents"] == 20 and result["database"] == "sqlite", result
    assert result["requests"] > 0, result
    assert result["errors"] == {}, result
    # every health check on a new connection answered; its latency is the benchmark's to judge
    health = result["health_ms"]
    assert health["checks"] > 0 and health["failures"] == {}, result
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["max"], result
    assert result["service_cpu_ms_per_request"] > 0, result
    # the temporary CRV_HOME went with the service
    home = run.stderr.split("CRV_HOME ", 1)[1].split()[0]
    assert not Path(home).exists(), run.stderr
