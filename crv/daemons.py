"""`crv up` / `crv down`: the Prefect server and the crv service as background processes.

Each daemon leaves `<dir>/daemon.json` (pid, its start time, url). "Running" means that pid is
alive with the same start time (pids are reused) and answers its health check, so `up` is
idempotent and a stale file after a reboot or a kill is simply replaced.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crv.errors import CrvError
from crv.home import Home

SERVICE_PORT = 8443
PREFECT_PORT = 4200
START_TIMEOUT = 120.0


class DaemonError(CrvError):
    temporary = True


@dataclass(frozen=True)
class Endpoints:
    service_url: str
    prefect_api_url: str

    @property
    def prefect_ui_url(self) -> str:
        return self.prefect_api_url.removesuffix("/api")


def prefect_env(home: Home, api_url: str | None = None) -> dict[str, str]:
    """Settings for the Prefect server and for every Prefect client crv runs: the state under
    CRV_HOME, no telemetry (there is no internet here, and nothing should phone home)."""
    env = {
        "PREFECT_HOME": str(home.prefect_dir),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        # flow and task logs go to the Prefect UI; the terminal shows crv's own progress
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DaemonError("no free TCP port on 127.0.0.1")


def _read(record: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or _start_time(int(data["pid"])) != data.get("started"):
        return None
    return data


def _service_healthy(home: Home, url: str) -> bool:
    try:
        ctx = ssl.create_default_context(cafile=str(home.ca_file))
        with urllib.request.urlopen(f"{url}/v1/health", timeout=2, context=ctx) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


def _prefect_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


def _running(record: Path, healthy: Callable[[str], bool]) -> str | None:
    data = _read(record)
    if data is None:
        return None
    url = str(data["url"])
    return url if healthy(url) else None


def _start(
    name: str,
    record: Path,
    argv: list[str],
    env: dict[str, str],
    url: str,
    healthy: Callable[[str], bool],
) -> str:
    log = record.parent / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI that started it, and Ctrl-C in it
            env={**os.environ, **env},
            close_fds=True,
        )
    started = _start_time(proc.pid)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "started": started, "url": url}))
    os.replace(tmp, record)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise DaemonError(f"{name} exited at start ({'; '.join(tail)}); see {log}")
        if healthy(url):
            return url
        time.sleep(0.2)
    _stop(record)
    raise DaemonError(f"{name} did not answer within {START_TIMEOUT:.0f} s; see {log}")


def _stop(record: Path) -> bool:
    data = _read(record)
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
    if data is None:
        return False
    pid = int(data["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def _service_record(home: Home) -> Path:
    return home.service_dir / "daemon.json"


def _prefect_record(home: Home) -> Path:
    return home.prefect_dir / "daemon.json"


def running(home: Home) -> Endpoints | None:
    service = _running(_service_record(home), lambda u: _service_healthy(home, u))
    prefect = _running(_prefect_record(home), _prefect_healthy)
    return Endpoints(service, prefect) if service and prefect else None


def up(home: Home) -> Endpoints:
    """Start what is not running (both start in parallel; Prefect takes ~10 s here)."""
    home.ensure()
    service = _running(_service_record(home), lambda u: _service_healthy(home, u))
    prefect = _running(_prefect_record(home), _prefect_healthy)
    pending: list[Callable[[], str]] = []
    if prefect is None:
        port = _free_port(PREFECT_PORT)
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        pending.append(
            functools.partial(
                _start,
                "prefect",
                _prefect_record(home),
                [*argv, "--port", str(port)],
                prefect_env(home),
                f"http://127.0.0.1:{port}/api",
                _prefect_healthy,
            )
        )
    if service is None:
        port = _free_port(SERVICE_PORT)
        pending.append(
            functools.partial(
                _start,
                "service",
                _service_record(home),
                [sys.executable, "-m", "crv.service", "--port", str(port)],
                {"CRV_HOME": str(home.root)},
                f"https://127.0.0.1:{port}",
                functools.partial(_service_healthy, home),
            )
        )
    results = _in_parallel(pending)
    ep = running(home)
    if ep is None:
        raise DaemonError(f"crv did not come up: {results}")
    return ep


def _in_parallel(calls: list[Callable[[], str]]) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    if not calls:
        return []
    with ThreadPoolExecutor(len(calls)) as ex:
        return list(ex.map(lambda f: f(), calls))


def down(home: Home) -> list[str]:
    stopped = []
    if _stop(_service_record(home)):
        stopped.append("service")
    if _stop(_prefect_record(home)):
        stopped.append("prefect")
    return stopped
