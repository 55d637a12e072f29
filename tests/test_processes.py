"""crv.base.processes with real processes: spawning detached, waiting for readiness, and what
/proc says of a process (stat, environment, listening sockets)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crv.base import processes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_spawn_detaches_logs_and_sets_exactly_the_environment(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"before\n")
    script = "import os, sys; print(os.getcwd(), os.environ.get('A'), 'B' in os.environ); "
    script += "print('err', file=sys.stderr); print(sys.stdin.read() == '', flush=True)"
    proc = processes.spawn(
        [sys.executable, "-c", script], log=log, env={"A": "1", "PATH": "/usr/bin"}, cwd=tmp_path
    )
    started.append(proc)
    assert proc.wait(30) == 0
    lines = log.read_text().splitlines()
    assert lines[0] == "before"  # appended, not truncated
    assert f"{tmp_path} 1 False" in lines and "err" in lines and "True" in lines

    sleeper = processes.spawn(["sleep", "30"], log=log, env={})
    started.append(sleeper)
    assert os.getsid(sleeper.pid) == sleeper.pid != os.getsid(0)  # its own session
    assert processes.session(sleeper.pid) == sleeper.pid
    assert processes.parent(sleeper.pid) == os.getpid()


def test_spawn_log_mode_and_umask(tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    log = tmp_path / "d.log"
    log.write_bytes(b"")
    log.chmod(0o644)
    script = "import os; open('made', 'w').close()"
    proc = processes.spawn(
        [sys.executable, "-c", script], log=log, env={}, cwd=tmp_path, umask=0o077, log_mode=0o600
    )
    started.append(proc)
    assert proc.wait(30) == 0
    assert stat.S_IMODE(log.stat().st_mode) == 0o600  # an older log is made private too
    assert stat.S_IMODE((tmp_path / "made").stat().st_mode) == 0o600
    fresh = tmp_path / "fresh.log"
    started.append(processes.spawn(["true"], log=fresh, env={}, log_mode=0o600))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


def test_wait_ready(tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    flag = tmp_path / "ready"
    script = f"import time, pathlib; time.sleep(0.3); pathlib.Path({str(flag)!r}).touch(); "
    script += "time.sleep(30)"
    proc = processes.spawn([sys.executable, "-c", script], log=tmp_path / "l", env={})
    started.append(proc)
    assert processes.wait_ready(proc, flag.exists, timeout=20, interval=0.02)
    assert proc.returncode is None

    dies = processes.spawn(["sh", "-c", "exit 3"], log=tmp_path / "l", env={})
    started.append(dies)
    assert not processes.wait_ready(dies, lambda: False, timeout=20, interval=0.02)
    assert dies.returncode == 3  # exited: the caller can tell it from a timeout

    slow = processes.spawn(["sleep", "30"], log=tmp_path / "l", env={})
    started.append(slow)
    began = time.monotonic()
    assert not processes.wait_ready(slow, lambda: False, timeout=0.3, interval=0.05)
    assert slow.returncode is None and 0.3 <= time.monotonic() - began < 10


def test_stat_readers_tell_a_process_from_a_reused_pid_and_a_zombie(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        stat_now = processes.proc_stat(proc.pid)
        assert stat_now is not None and stat_now[0] in "RSD"
        ticks = processes.start_ticks(proc.pid)
        assert ticks == stat_now[1]
        assert processes.start_time(proc.pid) == str(ticks)
        assert processes.same_process_alive(proc.pid, ticks)
        assert not processes.same_process_alive(proc.pid, (ticks or 0) + 1)
        assert not processes.same_process_alive(str(proc.pid), ticks)
        assert not processes.same_process_alive(0, ticks)
        assert proc.pid in processes.pids() and os.getpid() in processes.pids()
        proc.kill()
        deadline = time.monotonic() + 10
        while (processes.proc_stat(proc.pid) or ("?",))[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes.proc_stat(proc.pid) == ("Z", ticks)  # a zombie still has its stat
        assert processes.start_ticks(proc.pid) == ticks
        assert processes.start_time(proc.pid) is None  # but is no running process
        assert not processes.same_process_alive(proc.pid, ticks)
    finally:
        proc.kill()
        proc.wait()
    assert processes.proc_stat(proc.pid) is None
    assert processes.start_time(proc.pid) is None and processes.parent(proc.pid) is None


def test_a_comm_with_spaces_and_parentheses(tmp_path: Path) -> None:
    odd = tmp_path / "a) (b c"
    odd.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(odd), "30"])
    try:
        assert processes.parent(proc.pid) == os.getpid()
        assert processes.session(proc.pid) == os.getsid(0)
        assert processes.start_ticks(proc.pid) is not None
    finally:
        proc.kill()
        proc.wait()


def test_environ_by_prefix(tmp_path: Path) -> None:
    env = {"CRV_T_ONE": "1", "CRV_T_TWO": "a=b", "OTHER": "x", "PATH": os.defpath}
    proc = subprocess.Popen(["sleep", "30"], env=env)
    try:
        # Popen returns once the child's execve closed its close-on-exec pipe, which the
        # kernel does before it lays out the new environment: read in between, the environ is
        # pytest's (the forked copy's) or empty (seen in CI). Wait for sleep's own, then check.
        deadline = time.monotonic() + 10
        while processes.environ(proc.pid).get("OTHER") != "x":
            assert time.monotonic() < deadline, "sleep's environment never appeared"
            time.sleep(0.01)
        assert processes.environ(proc.pid, "CRV_T_") == {"CRV_T_ONE": "1", "CRV_T_TWO": "a=b"}
        assert processes.environ(proc.pid)["OTHER"] == "x"
    finally:
        proc.kill()
        proc.wait()
    assert processes.environ(proc.pid) == {}
    assert processes.environ(1 << 22) == {}


def test_listening_sockets_and_session_listens(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = "import socket, sys, time; s = socket.socket(); "
    script += f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(30)"
    log = tmp_path / "srv.log"
    proc = processes.spawn([sys.executable, "-c", script], log=log, env={})
    started.append(proc)
    assert processes.wait_ready(proc, lambda: b"up" in log.read_bytes(), timeout=20, interval=0.02)
    sockets = processes.listening_sockets(port)
    assert sockets and all(s.startswith("socket:[") for s in sockets)
    assert processes.session_listens(proc.pid, port)
    assert not processes.session_listens(os.getsid(0), port)  # not ours: another session's
    assert not processes.session_listens(proc.pid, port + 1 if port < 65535 else port - 1)
    assert not processes.session_listens(proc.pid, None)
