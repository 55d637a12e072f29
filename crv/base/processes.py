"""Processes: starting detached ones, and reading what Linux says of them under /proc.

`spawn` starts a program in its own session (it survives whoever started it, and a Ctrl-C
there), stdin from /dev/null and stdout and stderr appended to a log file; `wait_ready` polls
it until it answers, exits or runs out of time.

A process is told apart from a later one that reuses its pid by its start time (`proc_stat`,
`start_time`); `same_process_alive` checks both. The readers return None (or nothing) for a
process that is gone or not ours to read; elsewhere than Linux there is no /proc and they know
nothing either.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# -- starting ------------------------------------------------------------------------------------


def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    umask: int = -1,  # -1: the caller's
    log_mode: int | None = None,  # None: open() as usual (0666 less the umask)
) -> subprocess.Popen[bytes]:
    """`argv` detached: its own session, stdin from /dev/null, stdout and stderr appended to
    `log`, exactly the environment `env`. `log_mode`: the log is created with that mode, and an
    older one set to it too."""
    if log_mode is None:
        out = open(log, "ab")  # noqa: SIM115  # closed below, once the child has its copy
    else:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, log_mode)
        os.fchmod(fd, log_mode)
        out = open(fd, "ab")  # noqa: SIM115
    with out:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            umask=umask,
        )


def wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], object],
    *,
    timeout: float,
    interval: float,
) -> bool:
    """Poll until `ready()` is true (True), or the process exits or `timeout` seconds pass
    (False; `proc.returncode` is set if it exited). Whether it exited is checked first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(interval)
    return False


# -- /proc -----------------------------------------------------------------------------------------


def pids() -> list[int]:
    """Every process there is now."""
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def _stat(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on: index 0 is field 3. comm (field 2) may hold
    spaces and parentheses, so the fields start after its last `)`."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return data[data.rindex(b")") + 2 :].split()
    except (OSError, ValueError):
        return None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from /proc/<pid>/stat, None when the pid is gone.
    The start time tells a recorded pid from a new process that reused the number."""
    fields = _stat(pid)
    return None if fields is None else (fields[0].decode(), int(fields[19]))  # fields 3, 22


def start_ticks(pid: int) -> int | None:
    """The start time in clock ticks, of a zombie too; None when the pid is gone."""
    stat = proc_stat(pid)
    return None if stat is None else stat[1]


def start_time(pid: int) -> str | None:
    """The start time as a string (as the daemons' records keep it); None for a zombie."""
    stat = proc_stat(pid)
    return None if stat is None or stat[0] == "Z" else str(stat[1])


def same_process_alive(pid: object, start: object) -> bool:
    """Alive and the same process: a zombie is dead, a reused pid is someone else."""
    stat = proc_stat(pid) if isinstance(pid, int) and pid > 0 else None
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == start


def parent(pid: int) -> int | None:
    """The parent's pid (field 4)."""
    fields = _stat(pid)
    try:
        return None if fields is None else int(fields[1])
    except (ValueError, IndexError):
        return None


def session(pid: int) -> int | None:
    """The session id (field 6)."""
    fields = _stat(pid)
    try:
        return None if fields is None else int(fields[3])
    except (ValueError, IndexError):
        return None


def environ(pid: int, prefix: str = "") -> dict[str, str]:
    """The variables whose names start with `prefix` that the process started with; empty if
    it is gone, a zombie (whose environ reads empty), or not ours to read (EPERM)."""
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    start = os.fsencode(prefix)
    found: dict[str, str] = {}
    for item in data.split(b"\0"):
        if item.startswith(start):
            key, _, value = item.partition(b"=")
            found[os.fsdecode(key)] = os.fsdecode(value)
    return found


def listening_sockets(port: int | None) -> set[str] | None:
    """The sockets listening on TCP (IPv4) `port`, as their fd links read (`socket:[inode]`);
    None when /proc/net/tcp cannot be read."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    return {
        f"socket:[{cols[9]}]"
        for cols in (line.split() for line in table)
        if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port  # 0A: LISTEN
    }


def session_listens(sid: int, port: int | None) -> bool:
    """Whether a process of session `sid` listens on TCP `port`. Yes when /proc cannot say."""
    sockets = listening_sockets(port)
    if sockets is None:
        return True
    for pid in pids():
        if session(pid) != sid:
            continue
        try:
            if any(os.readlink(fd) in sockets for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return True
        except OSError:
            continue
    return False
