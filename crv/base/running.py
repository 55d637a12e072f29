"""What `crv up` left running, for whoever needs it: the service's and the Prefect server's
records under CRV_HOME, their health, and the environment a Prefect client of them needs.

Each daemon leaves `<dir>/daemon.json` (pid, its start time, url). "Running" means that pid is
alive with the same start time (pids are reused) and answers its health check. The Prefect API
requires HTTP basic auth (`user:password` in `prefect/api-auth`, made by `crv up`) unless
CRV_PREFECT_AUTH=off. Read by the CLI, the deployments, the flows and the tasks; started and
stopped by `crv_cli.daemons`.

Flows find the service through a `Site` (`find_site`): on the crv machine, CRV_HOME's records
(exactly as above); on a Prefect worker elsewhere, the worker configuration directory that
`crv worker-config DIR` wrote (CRV_WORKER_CONFIG=DIR): the same files laid out as a CRV_HOME
(the CA certificate, the admin certificate and key, pools.yaml, the pools' state) and the
service's URL in `worker.json`. docs/workers.md says what runs where."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crv.base.errors import CrvError
from crv.base.home import Home
from crv.base.processes import start_time


class DaemonError(CrvError):
    temporary = True


PREFECT_USER = "crv"  # the user name of the Prefect API's basic auth


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
        # a request answered 503 (the server's SQLite database locked by a burst of writes,
        # as 7 parallel deploys on a loaded 2-CPU machine caused for over 2 minutes) is tried
        # again 7 times, backing off 2, 4, ... 128 s (Prefect's default: 5 times, about 1 min)
        # (a setting of the caller's own wins)
        "PREFECT_CLIENT_MAX_RETRIES": os.environ.get("PREFECT_CLIENT_MAX_RETRIES", "7"),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
        auth = api_auth(home)
        if auth is not None:
            env["PREFECT_API_AUTH_STRING"] = auth
    return env


# what the Prefect server crv starts runs with: the change lock's leases on files, reclaimed
# every 5 s (flows/locks.py says why), and the cause of any 503 left in prefect.log
PREFECT_SERVER_SETTINGS: dict[str, str] = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
        "prefect.server.concurrency.lease_storage.filesystem"
    ),
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
    # a request answered 503 (the database busy) leaves its cause in prefect.log
    "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
}


def prefect_auth_enabled() -> bool:
    """Whether the Prefect API requires the auth string: yes, unless CRV_PREFECT_AUTH=off."""
    value = os.environ.get("CRV_PREFECT_AUTH", "").strip().lower() or "on"
    if value not in ("on", "off"):
        raise DaemonError(f"CRV_PREFECT_AUTH={value!r}: it is on (the default) or off")
    return value == "on"


def read_auth(path: Path) -> str:
    value = path.read_text().strip()
    user, sep, password = value.partition(":")
    if not (sep and user and password) or any(c.isspace() for c in value):
        raise DaemonError(
            f"{path}: not a user:password line; remove it and run `crv down` then `crv up` "
            "(a new one is made, and given to crv's clients)"
        )
    return value


def api_auth(home: Home) -> str | None:
    """The auth string (`user:password`) crv's Prefect clients send; None when the Prefect API
    has no auth (CRV_PREFECT_AUTH=off) or `crv up` has not made one yet."""
    if not prefect_auth_enabled():
        return None
    try:
        return read_auth(home.prefect_auth_file)
    except FileNotFoundError:
        return None


def request_with_auth(url: str, auth: str | None) -> urllib.request.Request:
    """A GET of `url` that carries the auth string, if given, as HTTP basic auth."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(auth.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _prefect_get(url: str, auth: str | None) -> int:
    """The HTTP status of GET `url` (sending the auth string if given); 0: no answer."""
    try:
        with urllib.request.urlopen(request_with_auth(url, auth), timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):
        return 0


def prefect_guard(url: str, auth: str | None) -> str:
    """How the Prefect server at `url` (its /api) answers: "ok" as wanted (with `auth`: only
    to a request that carries it; without: to anyone), "down" (no answer, or a server error),
    or "mismatch" (it answers, but guards its API otherwise: started before crv had auth,
    with another password, or with auth where none is wanted)."""
    probe = f"{url}/admin/version"  # behind the auth (/health is not)
    anonymous = _prefect_get(probe, None)
    if anonymous == 0 or anonymous >= 500:
        return "down"
    if auth is None:
        return "ok" if anonymous == 200 else "mismatch"
    if anonymous != 401:
        return "mismatch"
    signed = _prefect_get(probe, auth)
    if signed == 0 or signed >= 500:  # busy, not refusing: never a reason to restart it
        return "down"
    return "ok" if signed == 200 else "mismatch"


def wanted_auth(home: Home) -> str | None:
    """The auth string the server should require, "" if one is wanted but none exists yet."""
    if not prefect_auth_enabled():
        return None
    return api_auth(home) or ""


def read_record(record: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or start_time(int(data["pid"])) != data.get("started"):
        return None
    return data


def service_healthy(home: Home, url: str) -> bool | None:
    """True: our service answers; False: something else answers there (another CA, an
    error); None: no answer yet (starting, or too busy to answer within 2 s)."""
    try:
        ctx = ssl.create_default_context(cafile=str(home.ca_file))
        with urllib.request.urlopen(f"{url}/v1/health", timeout=2, context=ctx) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError as e:
        return None if e.code >= 500 else False
    except ssl.SSLCertVerificationError:
        return False
    except (OSError, ValueError):
        return None


def prefect_healthy(home: Home, url: str) -> bool | None:
    """True: it answers, and requires the auth string crv's clients send (or none, with auth
    off); False: it guards its API otherwise; None: no answer yet (starting, or busy)."""
    auth = wanted_auth(home)
    if auth == "":
        return False
    guard = prefect_guard(url, auth)
    return None if guard == "down" else guard == "ok"


# how long a daemon whose process is alive may take to answer before it counts as not running:
# a Prefect server under load (the kill tests run seven clusters at once) can miss a 2 s probe,
# and taking it for dead would start a second server beside it
BUSY_PATIENCE = 30.0


def running_url(
    record: Path, healthy: Callable[[str], bool | None], patience: float = BUSY_PATIENCE
) -> str | None:
    """The recorded daemon's URL if its process is alive and it answers as ours; while it is
    alive but does not answer, ask again for up to `patience` seconds."""
    data = read_record(record)
    if data is None:
        return None
    url = str(data["url"])
    deadline = time.monotonic() + patience
    while True:
        answer = healthy(url)
        if answer:
            return url
        if answer is False or time.monotonic() >= deadline or read_record(record) != data:
            return None
        time.sleep(0.5)


def service_record(home: Home) -> Path:
    return home.service_dir / "daemon.json"


def prefect_record(home: Home) -> Path:
    return home.prefect_dir / "daemon.json"


def serve_record(home: Home) -> Path:
    return home.prefect_dir / "serve.json"


def work_pool_record(home: Home) -> Path:
    """The work pool the deployments process registered the deployments to (its name, one
    line); absent while it serves them (deployments.serve writes or removes it at start)."""
    return home.prefect_dir / "work-pool"


def registered_work_pool(home: Home) -> str | None:
    """The work pool of the running deployments process, None when it serves them (or none
    runs)."""
    if read_record(serve_record(home)) is None:
        return None
    try:
        return work_pool_record(home).read_text().strip() or None
    except OSError:
        return None


def running(home: Home, patience: float = BUSY_PATIENCE) -> Endpoints | None:
    service = running_url(service_record(home), lambda u: service_healthy(home, u), patience)
    if service is None:
        return None
    prefect = running_url(prefect_record(home), functools.partial(prefect_healthy, home), patience)
    return Endpoints(service, prefect) if service and prefect else None


# -- the deployments on a Prefect work pool, and the workers that run them -----------------------

ENV_WORK_POOL = "CRV_WORK_POOL"
ENV_WORKER_CONFIG = "CRV_WORKER_CONFIG"
WORKER_FILE = "worker.json"  # in a worker configuration directory: the service's URL, ...
WORKER_ENV_FILE = "worker.env"  # ... and what Prefect's clients need (the auth string: 0600)
# Prefect's shortest heartbeat (it refuses less than 30 s): runs on a work pool send one every
# 30 s, and the server marks a run whose heartbeats stopped for HEARTBEAT_GRACE Crashed
# (deployments.serve makes that automation)
HEARTBEAT_SECONDS = 30
HEARTBEAT_GRACE = 90
_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def work_pool() -> str | None:
    """CRV_WORK_POOL: the Prefect work pool (process type) the deployments are registered to
    instead of being served, run by `crv worker` / `prefect worker start --pool NAME` anywhere;
    unset or empty: served by `crv up`'s own process (the default)."""
    value = os.environ.get(ENV_WORK_POOL, "").strip()
    return checked_work_pool(value, ENV_WORK_POOL) if value else None


def checked_work_pool(value: str, source: str) -> str:
    """`value` if it is a work pool name crv uses; else one DaemonError naming `source`."""
    if not _POOL_NAME.fullmatch(value):
        raise DaemonError(
            f"{source}={value!r}: a work pool name is letters, digits, '.', '_' and '-' "
            "(up to 63, starting with a letter or digit)"
        )
    return value


@dataclass(frozen=True)
class Site:
    """Where a flow run (or the process that registers the deployments) finds crv: the files its
    service client and its pools use, laid out as a CRV_HOME (`home`: the home itself, or a
    worker configuration directory), and the running service's and Prefect's URLs."""

    home: Home
    endpoints: Endpoints
    worker_config: Path | None = None  # None: this machine's CRV_HOME

    @property
    def remote(self) -> bool:
        """Read from a worker configuration: pools whose state is this CRV_HOME's (the local
        pool) cannot be used from here."""
        return self.worker_config is not None

    def describe(self) -> str:
        if self.worker_config is None:
            return f"CRV_HOME {self.home.root}"
        return f"worker configuration {self.worker_config}"


def worker_files(root: Path) -> list[Path]:
    """What a worker configuration directory holds (mode 0600 each, the directory 0700)."""
    home = Home(root)
    return [
        root / WORKER_FILE, root / WORKER_ENV_FILE, home.ca_file, home.admin_cert, home.admin_key
    ]  # fmt: skip


def read_worker_config(root: Path) -> tuple[str, str, str | None]:
    """(service URL, Prefect API URL, work pool) of a worker configuration directory; a missing
    or unreadable part is one DaemonError naming the file and the field."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise DaemonError(f"{root}: not a directory (`crv worker-config DIR` on the crv machine "
                          "writes one)")  # fmt: skip
    for path in worker_files(root):
        if not path.is_file():
            raise DaemonError(f"{path}: missing; copy the whole directory `crv worker-config` "
                              "wrote")  # fmt: skip
    path = root / WORKER_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DaemonError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise DaemonError(f"{path}: not a JSON object")
    found = []
    for field in ("service_url", "prefect_api_url"):
        value = data.get(field)
        if not isinstance(value, str) or not re.fullmatch(r"https?://\S+", value):
            raise DaemonError(f"{path}: {field}: missing or not an http(s) URL")
        found.append(value)
    pool = data.get("work_pool")
    if pool is not None and not (isinstance(pool, str) and _POOL_NAME.fullmatch(pool)):
        raise DaemonError(f"{path}: work_pool: not a work pool name")
    return found[0], found[1], pool


def find_site(patience: float = BUSY_PATIENCE) -> Site:
    """The site of this process: the worker configuration CRV_WORKER_CONFIG names, else
    CRV_HOME's running daemons (as `running`). A DaemonError says what is missing."""
    given = os.environ.get(ENV_WORKER_CONFIG, "").strip()
    if not given:
        home = Home.from_env()
        endpoints = running(home, patience)
        if endpoints is None:
            raise DaemonError(f"the crv service is not running for {home.root}: run `crv up`")
        return Site(home, endpoints)
    root = Path(given).expanduser().resolve()
    service_url, prefect_url, _ = read_worker_config(root)
    home = Home(root)
    # the API this process talks to (PREFECT_API_URL), if it was given another address
    prefect_url = os.environ.get("PREFECT_API_URL") or prefect_url
    deadline = time.monotonic() + patience
    while True:
        answer = service_healthy(home, service_url)
        if answer:
            return Site(home, Endpoints(service_url, prefect_url), root)
        if answer is False:
            raise DaemonError(
                f"the crv service at {service_url} ({root / WORKER_FILE}) does not answer as the "
                f"one whose CA is {home.ca_file}: run `crv worker-config` again on the crv machine"
            )
        if time.monotonic() >= deadline:
            raise DaemonError(
                f"the crv service at {service_url} ({root / WORKER_FILE}) does not answer from "
                "this machine: is it running (`crv up`), and listening where workers reach it "
                "(CRV_SERVICE_ADDRESS)?"
            )
        time.sleep(0.5)
