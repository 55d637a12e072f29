"""The house's rules that a refactor can break without any other test noticing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from crv.base.processes import start_time
from crv.base.running import running_url
from tests.conftest import REPO


def test_the_cli_imports_prefect_only_once_it_has_pointed_it_at_crvs_server() -> None:
    """Prefect reads its settings when first imported: a CLI that imported it before
    `ensure_up` set PREFECT_API_URL would run its flows on an ephemeral server instead."""
    probe = (
        "import sys, crv_cli.main; print(sorted(m for m in sys.modules if m.startswith('prefect')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def _record(tmp_path: Path) -> Path:
    record = tmp_path / "daemon.json"
    pid = os.getpid()
    record.write_text(json.dumps({"pid": pid, "started": start_time(pid), "url": "http://x"}))
    return record


def test_a_live_daemon_that_is_busy_is_asked_again_not_taken_for_dead(tmp_path: Path) -> None:
    answers = [None, None, True]  # no answer within the probe's timeout twice, then ok
    began = time.monotonic()
    assert running_url(_record(tmp_path), lambda url: answers.pop(0), patience=10) == "http://x"
    assert answers == [] and time.monotonic() - began < 5


def test_a_daemon_that_answers_as_someone_else_is_not_waited_for(tmp_path: Path) -> None:
    calls: list[str] = []
    began = time.monotonic()
    assert (
        running_url(_record(tmp_path), lambda url: calls.append(url) or False, patience=10) is None
    )
    assert calls == ["http://x"] and time.monotonic() - began < 1


def test_patience_runs_out(tmp_path: Path) -> None:
    began = time.monotonic()
    assert running_url(_record(tmp_path), lambda url: None, patience=1.0) is None
    assert 1.0 <= time.monotonic() - began < 3


def test_a_dead_daemons_record_is_not_waited_for(tmp_path: Path) -> None:
    record = tmp_path / "daemon.json"
    record.write_text(json.dumps({"pid": 2**22 + 7, "started": 1, "url": "http://x"}))
    assert running_url(record, lambda url: None, patience=10) is None
