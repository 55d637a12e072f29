"""One change per cluster at a time (flows.locks) against a real Prefect server, no mocks.

Every holder is a separate process (Prefect reads its settings at import), started with the
env a Prefect client of this crv home gets. Each holder appends `enter`/`exit` lines with its
pid and the wall-clock time to a log, so the test sees whether two changes ever overlapped.

One `crv up` serves the module. Its server runs the lease repossessor every second (default
15 s) so the crash test waits for the lease (60 s, the server's floor) and little else; the
killed holder is started and killed while the server fixture is set up, so that minute passes
while the other tests run, and the crash test comes last.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crv.base.home import Home
from crv.base.running import PREFECT_SERVER_SETTINGS as SERVER_SETTINGS
from crv_cli import daemons
from flows.locks import LEASE_SECONDS as LEASE
from tests.conftest import REPO

HOLDER = r"""
import asyncio, os, sys, time
from pathlib import Path

from flows.locks import ClusterBusy, cluster_change

cluster, wait_arg, hold, log, mode = sys.argv[1:6]
wait = None if wait_arg == "none" else float(wait_arg)
started = time.time()


def say(what):
    with open(log, "a") as f:  # one short append per line: lines do not mix
        f.write(f"{what} {cluster} {os.getpid()} {time.time():.3f}\n")
    print(what, flush=True)


async def change():
    say("waiting")
    async with cluster_change(cluster, wait=wait):
        say("enter")
        try:
            await asyncio.sleep(float(hold))
        except ValueError:  # hold until the test creates this file
            while not Path(hold).exists():
                await asyncio.sleep(0.05)
        say("exit")


if mode == "flow":
    from prefect import flow

    @flow(name="crv-lock-test")
    async def locked_change():
        await change()

    state = asyncio.run(locked_change(return_state=True))
    print(f"state {state.type.value}: {state.message}", flush=True)
    sys.exit(0 if state.is_completed() else 3)
try:
    asyncio.run(change())
except ClusterBusy as e:
    print(f"ClusterBusy after {time.time() - started:.1f} s: {e}", flush=True)
    sys.exit(3)
"""


class Holder:
    """One holder process; its stdout lines are collected as they come."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        cluster: str,
        *,
        wait: float | None,
        hold: float | Path,
        flow: bool = False,
    ) -> None:
        wait_arg = "none" if wait is None else str(wait)
        argv = [sys.executable, "-c", HOLDER, cluster, wait_arg, str(hold), str(log)]
        self._err = log.with_name(f"{uuid.uuid4().hex}.err")  # a file: never blocks the holder
        with self._err.open("w") as err:
            self.proc = subprocess.Popen(
                [*argv, "flow" if flow else "plain"],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO,
                env=env,
            )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, start: str, timeout: float = 60) -> str:
        with self._changed:
            found = self._changed.wait_for(
                lambda: (
                    any(x.startswith(start) for x in self.lines) or self.proc.poll() is not None
                ),
                timeout,
            )
            hit = [x for x in self.lines if x.startswith(start)]
        assert found and hit, f"no {start!r} from the holder: {self.lines} {self.stderr()}"
        return hit[0]

    def finish(self, timeout: float = 90) -> int:
        code = self.proc.wait(timeout)
        time.sleep(0.1)  # the reader thread takes the last lines
        return code

    def stderr(self) -> str:
        return self._err.read_text()


def intervals(log: Path, cluster: str) -> list[tuple[float, float]]:
    """(enter, exit) of every holder of `cluster` in the log, in order of entry."""
    enter: dict[str, float] = {}
    done: dict[str, float] = {}
    for line in log.read_text().splitlines():
        what, c, pid, t = line.split()
        if c == cluster and what in ("enter", "exit"):
            (enter if what == "enter" else done)[pid] = float(t)
    assert enter.keys() == done.keys(), log.read_text()
    return sorted((enter[p], done[p]) for p in enter)


def assert_no_overlap(spans: list[tuple[float, float]]) -> None:
    for (_, first_exit), (second_enter, _) in itertools.pairwise(spans):
        assert second_enter >= first_exit, f"two changes overlapped: {spans}"


def when(log: Path, what: str, cluster: str, pid: int | None = None) -> float:
    """When the only (or process `pid`'s) `what` line of `cluster` was written."""
    times = [
        float(t)
        for w, c, p, t in (line.split() for line in log.read_text().splitlines())
        if (w, c) == (what, cluster) and pid in (None, int(p))
    ]
    assert len(times) == 1, log.read_text()
    return times[0]


@dataclass
class Crash:
    cluster: str
    acquired: float
    killed: float


@dataclass
class Server:
    home: Path
    env: dict[str, str]
    log: Path
    crash: Crash

    def holder(
        self, cluster: str, *, wait: float | None, hold: float | Path, flow: bool = False
    ) -> Holder:
        return Holder(self.env, self.log, cluster, wait=wait, hold=hold, flow=flow)


def unique(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("crv-home")
    base = {**os.environ, "CRV_HOME": str(home), "PYTHONUNBUFFERED": "1"}

    def crv(*args: str) -> subprocess.CompletedProcess[str]:
        # reaches the server through `crv up`'s environment: the settings flows.locks asks for,
        # with a repossessor loop of 1 s so the crash test waits for the lease and little else
        env = {**base, **SERVER_SETTINGS, "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"}
        return subprocess.run([sys.executable, "-m", "crv_cli", *args], capture_output=True,
                              text=True, cwd=REPO, env=env, timeout=300)  # fmt: skip

    up = crv("up")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        endpoints = daemons.running(Home(home))
        assert endpoints is not None
        env = {**base, **daemons.prefect_env(Home(home), endpoints.prefect_api_url)}
        env["PYTHONPATH"] = str(REPO)
        env["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "ERROR"  # Prefect's errors show
        log = tmp_path_factory.mktemp("locks") / "holders.log"
        log.touch()
        # the crash test's holder: takes the slot and is killed (see the module docstring)
        cluster = unique("crashed")
        victim = Holder(env, log, cluster, wait=None, hold=log.with_name("never"))
        victim.wait_for("enter")
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.time()
        victim.finish()
        crash = Crash(cluster, when(log, "enter", cluster), killed)
        # the kill alone frees nothing: the lease still holds the slot
        late = Holder(env, log, cluster, wait=0, hold=0)
        assert late.finish() == 3, late.lines
        yield Server(home, env, log, crash)
    finally:
        crv("down")


def test_a_second_change_waits_until_the_first_has_finished(server: Server, tmp_path: Path) -> None:
    cluster, release = unique("farm"), tmp_path / "release"
    first = server.holder(cluster, wait=None, hold=release)
    first.wait_for("enter")
    second = server.holder(cluster, wait=None, hold=0)
    second.wait_for("waiting")
    time.sleep(3)  # the second is asking for the slot now
    assert not any(x == "enter" for x in second.lines)
    release.touch()
    assert first.finish() == 0
    assert second.finish() == 0, second.stderr()
    (_, first_exit), (second_enter, _) = intervals(server.log, cluster)
    second_waiting = when(server.log, "waiting", cluster, second.proc.pid)
    assert second_waiting < first_exit <= second_enter  # it asked while held, and waited


def test_changes_started_together_take_turns(server: Server) -> None:
    cluster = unique("farm")
    holders = [server.holder(cluster, wait=None, hold=1.5) for _ in range(3)]
    for h in holders:
        assert h.finish() == 0, h.stderr()
    spans = intervals(server.log, cluster)
    assert len(spans) == 3
    assert_no_overlap(spans)


def test_wait_zero_is_refused_at_once_and_a_bounded_wait_gives_up(server: Server, tmp_path: Path) -> None:  # fmt: skip
    cluster, release = unique("farm"), tmp_path / "release"
    owner = server.holder(cluster, wait=None, hold=release)
    owner.wait_for("enter")

    refused = server.holder(cluster, wait=0, hold=0)
    assert refused.finish() == 3
    line = refused.wait_for("ClusterBusy")
    assert f"cluster {cluster} is busy: another change to it is running" in line
    assert float(line.split()[2]) < 10  # at once, not after the owner (who never lets go)
    err = refused.stderr()
    assert "Traceback" not in err and "failed to process item" not in err, err

    patient = server.holder(cluster, wait=2, hold=0)
    assert patient.finish() == 3
    line = patient.wait_for("ClusterBusy")
    assert f"cluster {cluster} is busy" in line and "(waited 2 s)" in line
    assert float(line.split()[2]) >= 2

    release.touch()
    assert owner.finish() == 0
    assert len(intervals(server.log, cluster)) == 1


def test_different_clusters_do_not_block_each_other(server: Server, tmp_path: Path) -> None:
    release = tmp_path / "release"
    one, other = unique("farm"), unique("farm")
    owner = server.holder(one, wait=None, hold=release)
    owner.wait_for("enter")
    beside = server.holder(other, wait=0, hold=0)
    assert beside.finish() == 0, [*beside.lines, beside.stderr()]
    assert beside.lines[-2:] == ["enter", "exit"]
    release.touch()
    assert owner.finish() == 0
    assert intervals(server.log, other)[0][1] < intervals(server.log, one)[0][1]


def test_flow_runs_take_turns_and_a_refused_run_fails_with_cluster_busy(server: Server, tmp_path: Path) -> None:  # fmt: skip
    cluster, release = unique("farm"), tmp_path / "release"
    first = server.holder(cluster, wait=None, hold=release, flow=True)
    first.wait_for("enter")
    second = server.holder(cluster, wait=None, hold=0, flow=True)
    refused = server.holder(cluster, wait=0, hold=0, flow=True)

    assert refused.finish() == 3
    state = refused.wait_for("state")
    assert state.startswith("state FAILED:"), state
    assert "ClusterBusy" in state and f"cluster {cluster} is busy" in state
    assert "enter" not in refused.lines

    second.wait_for("waiting")
    time.sleep(3)
    assert "enter" not in second.lines
    release.touch()
    assert first.finish() == 0
    assert first.wait_for("state").startswith("state COMPLETED")
    assert second.finish() == 0, second.stderr()
    assert second.wait_for("state").startswith("state COMPLETED")
    spans = intervals(server.log, cluster)
    assert len(spans) == 2
    assert_no_overlap(spans)


def test_a_killed_holder_frees_the_slot_when_its_lease_expires(server: Server) -> None:
    # last in the module: most of the lease has run out while the other tests ran
    crash = server.crash
    heir = server.holder(crash.cluster, wait=None, hold=0)
    assert heir.finish(timeout=LEASE + 90) == 0, heir.stderr()
    got = when(server.log, "enter", crash.cluster, heir.proc.pid)
    # not before the lease ran out (the renewal at entry is the last one) ...
    assert got - crash.acquired >= LEASE - 5
    # ... and soon after: the lease, a repossessor loop, one Retry-After (loose: 2 shared cores)
    assert got - crash.acquired < LEASE + 40, got - crash.acquired
