"""F15: crv's own state, not the machines': its database locked by another process, and the
filesystem under CRV_HOME full (docs/reliability.md). The change fails in one line that says
why, exit 1, leaves no partial cluster record and no node, and converges once the fault is
gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_deploy_e2e import Crv, free_port, home_up

pytestmark = pytest.mark.faults

# another process takes SQLite's write lock on crv's state database and holds it
LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    with home_up(tmp_path_factory.mktemp("crv-home")) as c:
        yield c


def one_line_failure(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


def no_cluster(crv: Crv, name: str) -> None:
    gone = crv("status", name)
    assert gone.returncode == 2 and f"{name}: no such cluster" in gone.stderr, gone.stderr
    assert crv.node_processes() == []


def test_the_state_database_locked_by_another_process(crv: Crv) -> None:
    port = str(free_port())
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(crv.home / "service" / "state.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        began = time.monotonic()
        r = crv(
            "deploy", "webfarm", "--name", "locked", "--set", "workers=1", "--set", f"port={port}"
        )
        took = time.monotonic() - began
        line = one_line_failure(r)
        assert "database is locked" in line, line
        assert took < 120, took
    finally:
        locker.kill()
        locker.wait()
    no_cluster(crv, "locked")

    r = crv("deploy", "webfarm", "--name", "locked", "--set", "workers=1", "--set", f"port={port}")
    assert r.returncode == 0, r.stderr
    assert crv("destroy", "locked").returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem for CRV_HOME needs root")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_filesystem_under_crv_home(small_disk: Path) -> None:
    crv = Crv(small_disk / "home")
    (crv.home / "service").mkdir(parents=True)
    (crv.home / "service" / "port").write_text(f"{free_port()}\n")
    crv.up()
    try:
        port = str(free_port())
        filler = fill(small_disk)
        assert shutil.disk_usage(small_disk).free < 1 << 20
        r = crv(
            "deploy", "webfarm", "--name", "full", "--set", "workers=1", "--set", f"port={port}"
        )
        line = one_line_failure(r)
        assert f"the disk under {crv.home} is full" in line, line
        filler.unlink()
        no_cluster(crv, "full")

        r = crv(
            "deploy", "webfarm", "--name", "full", "--set", "workers=1", "--set", f"port={port}"
        )
        assert r.returncode == 0, r.stderr
        assert crv("destroy", "full").returncode == 0
    finally:
        for pid in crv.node_processes():
            os.kill(pid, signal.SIGKILL)
        crv("down")
