"""`crv up` / `crv down`: the Prefect server, the crv service and the served deployments as
background processes.

Each daemon leaves `<dir>/daemon.json` (pid, its start time, url). "Running" means that pid is
alive with the same start time (pids are reused) and answers its health check, so `up` is
idempotent and a stale file after a reboot or a kill is simply replaced.

The third process serves the Prefect deployments (`python -m deployments`: deploy-appliance,
scale-role, destroy-cluster): it registers them with the Prefect server and runs the flow runs
created from the UI, a schedule or the API, each as a child with this CRV_HOME in its
environment. Its record is `prefect/serve.json`; its url is the Prefect API it serves against,
and it counts as running while its process lives and that API is still the one `crv up` runs
(`crv serve` in the foreground writes the same record, so `crv up` does not start a second).

Strangers are kept out. Whoever can create a flow run of these deployments acts with crv's admin
certificate, so the Prefect server requires HTTP basic auth (`PREFECT_SERVER_API_AUTH_STRING`):
`user:password` generated once into `prefect/api-auth` (0600) and handed to every Prefect client
crv runs (`PREFECT_API_AUTH_STRING`, `prefect_env`); `crv api-credentials` prints it for other
systems. The server listens on 127.0.0.1 unless `CRV_PREFECT_HOST` names another address;
`CRV_PREFECT_AUTH=off` drops the auth and is refused beyond loopback. A server of this home that
answers but guards its API otherwise (one started before crv had auth) is restarted by `up`.
The Prefect server and the service run with umask 077: their databases and logs are 0600.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import secrets
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from crv.base.home import Home
from crv.base.processes import session_listens, spawn, start_time, wait_ready
from crv.base.running import (
    PREFECT_SERVER_SETTINGS,
    prefect_guard,
    prefect_healthy,
    prefect_record,
    read_auth,
    read_record,
    running_url,
    serve_record,
    service_healthy,
    service_record,
    work_pool,
)
from crv.base.running import (  # and what `crv_cli.daemons` users read from it
    PREFECT_USER as PREFECT_USER,
)
from crv.base.running import (
    DaemonError as DaemonError,
)
from crv.base.running import (
    Endpoints as Endpoints,
)
from crv.base.running import (
    api_auth as api_auth,
)
from crv.base.running import (
    prefect_auth_enabled as prefect_auth_enabled,
)
from crv.base.running import (
    prefect_env as prefect_env,
)
from crv.base.running import (
    running as running,
)
from crv.service.database import SCHEMA as DB_SCHEMA
from crv.service.database import database_url
from crv.service.database import prefect_url as prefect_database_url
from crv.service.database import prepare as prepare_database
from crv.service.database import redact as redact_url
from crv.service.database import remember_url as remember_database
from crv.service.settings import service_processes
from lab import control as lab

SERVICE_PORT = 8443
if TYPE_CHECKING:
    from crv_cli.postgres import LocalPostgres

PREFECT_PORT = 4200
ENV_PREFECT_SERVICES = "CRV_PREFECT_SERVICES"
ENV_PREFECT_WORKERS = "CRV_PREFECT_WORKERS"
START_TIMEOUT = 120.0


def prefect_host() -> str:
    """The address the Prefect server listens on: loopback, unless CRV_PREFECT_HOST names
    another (an address of this host, or 0.0.0.0 / :: for all of them)."""
    host = os.environ.get("CRV_PREFECT_HOST", "").strip() or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise DaemonError(f"CRV_PREFECT_HOST={host!r} is not an IP address") from None
    return host


def prefect_settings() -> tuple[str, bool]:
    """CRV_PREFECT_HOST and whether the API has auth, checked: an API open to anyone who
    reaches it beyond this host is refused."""
    host, auth = prefect_host(), prefect_auth_enabled()
    if not auth and not ipaddress.ip_address(host).is_loopback:
        raise DaemonError(
            f"CRV_PREFECT_HOST={host} with CRV_PREFECT_AUTH=off: refusing to open the Prefect "
            "API beyond loopback without authentication (its runs act with crv's admin "
            "certificate); keep CRV_PREFECT_AUTH on, or listen on 127.0.0.1"
        )
    return host, auth


def _dial_address(host: str) -> str:
    """Where crv's own clients reach a server listening on `host`."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return host


def ensure_api_auth(home: Home) -> str:
    """The auth string, generated the first time (mode 0600, never overwritten: two `crv up`
    at once agree on the first one written)."""
    path = home.prefect_auth_file
    with contextlib.suppress(FileNotFoundError):
        return read_auth(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".api-auth.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{PREFECT_USER}:{secrets.token_urlsafe(32)}\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return read_auth(path)


class ExitedAtStart(DaemonError):
    """The daemon stopped before it answered (its port taken in the meantime, bad settings)."""


def _free_port(preferred: int, address: str = "127.0.0.1") -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
            # as the daemons bind (uvicorn sets it too): the port of a daemon that was killed
            # is free again at once, though its last connections linger in TIME_WAIT; without
            # it a restarted service moved to another port, and its nodes' agents lost it (F7)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DaemonError(f"no free TCP port on {address}")


def service_address() -> str:
    """Where the service listens and what machines dial: loopback, unless CRV_SERVICE_ADDRESS
    names an address of this host that real machines (a rack, VMs on a bridge) can reach."""
    address = os.environ.get("CRV_SERVICE_ADDRESS", "").strip() or "127.0.0.1"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise DaemonError(f"CRV_SERVICE_ADDRESS={address!r} is not an IP address") from None
    return address


def _start(
    name: str,
    record: Path,
    argv: list[str],
    env: dict[str, str],
    url: str,
    healthy: Callable[[str], bool | None],
    *,
    listens: bool = False,  # `url` is its own listener: check that it is ours that answers
    umask: int = -1,  # -1: the caller's
) -> str:
    log = record.parent / f"{name}.log"
    # its own session: survives the CLI that started it, and Ctrl-C in it; the log 0600 (one
    # from before too: a umask's 0644)
    proc = spawn(argv, log=log, env={**os.environ, **env}, umask=umask, log_mode=0o600)
    started = start_time(proc.pid)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "started": started, "url": url}))
    os.replace(tmp, record)

    def answers() -> bool:
        return bool(healthy(url)) and (not listens or _serves(proc.pid, url))

    if wait_ready(proc, answers, timeout=START_TIMEOUT, interval=0.2):
        return url
    if proc.returncode is not None:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise ExitedAtStart(f"{name} exited at start ({'; '.join(tail)}); see {log}")
    _stop(record)
    raise DaemonError(f"{name} did not answer within {START_TIMEOUT:.0f} s; see {log}")


def _serves(session: int, url: str) -> bool:
    """Whether a process of `session` (the daemon we started) listens on the url's port, and not
    another crv home's daemon that took the port first (two `crv up` at once both find it
    free; ours then fails to bind while the other one answers). Linux /proc; elsewhere: yes."""
    port = urllib.parse.urlsplit(url).port
    return session_listens(session, port)


def _stop(record: Path) -> bool:
    data = read_record(record)
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
    if data is None:
        return False
    pid = int(data["pid"])
    # a daemon leads its own process group (its children go with it); a foreground
    # `crv serve` does not, and only the process itself is asked to stop
    kill = os.killpg if data.get("group", True) else os.kill
    with contextlib.suppress(ProcessLookupError):
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        kill(pid, signal.SIGKILL)
    return True


def _stop_unguarded_prefect(home: Home, auth: str | None) -> bool:
    """Stop this home's Prefect server if it answers but does not guard its API as wanted (a
    home from before crv had auth: its API open to any local user), with the process serving
    the deployments against it (which lacks the auth string)."""
    data = read_record(prefect_record(home))
    if data is None or prefect_guard(str(data["url"]), auth) != "mismatch":
        return False
    _stop(serve_record(home))
    _stop(prefect_record(home))
    return True


def up(home: Home, *, serve: bool = True) -> Endpoints:
    """Start what is not running: the service and Prefect in parallel (Prefect takes ~10 s
    here), then, unless `serve` is false, the process serving the deployments (~5 s).
    On PostgreSQL the database is checked (and migrated) first: one line if it is not usable,
    before anything starts."""
    host, with_auth = prefect_settings()
    home.ensure()
    url = database_url(home)
    service_processes(url is not None)  # a refused CRV_SERVICE_PROCESSES: one line, first
    prefect_workers(url is not None)
    work_pool()  # a refused CRV_WORK_POOL: one line, before anything starts
    starting = (
        read_record(service_record(home)) is None or read_record(prefect_record(home)) is None
    )
    if url is not None and starting:
        if _has_local_postgres(home) and local_postgres(home).url == url:  # `crv down` since
            local_postgres(home).start()
        prepare_database(url)
    auth = ensure_api_auth(home) if with_auth else None
    _stop_unguarded_prefect(home, auth)
    service = running_url(service_record(home), lambda u: service_healthy(home, u))
    prefect = running_url(prefect_record(home), functools.partial(prefect_healthy, home))
    pending: list[Callable[[], str]] = []
    if prefect is None:
        start = functools.partial(_start_prefect, home, host, auth)
        pending.append((lambda: _start_serving(home, start())) if serve else start)
    elif serve and served(home, prefect) is None:
        pending.append(functools.partial(_start_serving, home, prefect))
    if service is None:
        pending.append(functools.partial(_start_service, home))
    results = _in_parallel(pending)
    ep = running(home)
    if ep is None:
        raise DaemonError(f"crv did not come up: {results}")
    home.tighten()  # files a home from before the daemons' umask 077 left open
    ensure_boot_services(home)
    return ep


def local_postgres(home: Home) -> LocalPostgres:
    """The PostgreSQL of this home's own (`crv up --postgres`)."""
    from crv_cli.postgres import LocalPostgres

    return LocalPostgres(home.root / "postgres")


def _has_local_postgres(home: Home) -> bool:
    return (home.root / "postgres" / "password").is_file()


def choose_database(home: Home, given: str | None, *, postgres: bool = False) -> None:
    """`crv up --database URL | sqlite` or `--postgres`: check the database (reachable, crv's
    schema migrated, pg_trgm for Prefect) and record it for this home's daemons. Refused while
    they run on another one: they would go on with the old one."""
    if given is not None and postgres:
        raise DaemonError("--database and --postgres: give one of them")
    if given is None and not postgres:
        return
    if given is not None and given.strip().lower() == "sqlite":
        url = None
    elif postgres:
        url = local_postgres(home).start()
    else:
        url = given
    running_on = database_url(home)
    up_now = read_record(service_record(home)) or read_record(prefect_record(home))
    if up_now is not None and url != running_on:
        now = "SQLite" if running_on is None else redact_url(running_on)
        raise DaemonError(f"crv runs on {now} in {home.root}: `crv down` first, then change it")
    if url is not None:
        prepare_database(url)
    remember_database(home, url)


def database_description(home: Home) -> str:
    url = database_url(home)
    if url is None:
        return f"SQLite in {home.root} (`crv up --database URL` or `--postgres` for PostgreSQL)"
    return f"{redact_url(url)} (crv's tables in schema {DB_SCHEMA}, Prefect's in public)"


def prefect_services_apart() -> bool:
    """CRV_PREFECT_SERVICES=apart: the Prefect server's API (`--no-services`) and its background
    services (`prefect server services start`: scheduler, repossessor, ...) run as two daemons,
    Prefect's scale-out recipe; `together` (the default) is one process."""
    value = os.environ.get(ENV_PREFECT_SERVICES, "").strip().lower() or "together"
    if value not in ("together", "apart"):
        raise DaemonError(
            f"{ENV_PREFECT_SERVICES}={value!r}: it is together (the default) or apart"
        )
    return value == "apart"


# Prefect's CLI, its SQLite write transactions begun IMMEDIATE (crv_cli/prefect_server.py)
PREFECT_SERVER = [sys.executable, "-m", "crv_cli.prefect_server", "server"]


def prefect_workers(postgres: bool) -> int:
    """CRV_PREFECT_WORKERS=N: the Prefect API in N processes (PostgreSQL only; default 1)."""
    raw = os.environ.get(ENV_PREFECT_WORKERS, "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise DaemonError(f"{ENV_PREFECT_WORKERS}={raw!r}: give a whole number, 1 or more")
    if int(raw) > 1 and not postgres:
        raise DaemonError(
            f"{ENV_PREFECT_WORKERS}={raw}: several Prefect API processes need PostgreSQL "
            "(CRV_DATABASE_URL or `crv up --database`)"
        )
    return int(raw)


def _start_prefect(home: Home, host: str, auth: str | None) -> str:
    """A Prefect server for `home` on `host` (its database: SQLite under the home, or the
    PostgreSQL crv's store uses, in its `public` schema): its API URL."""
    argv = [*PREFECT_SERVER, "start", "--host", host]
    dial = _dial_address(host)
    dial_host = f"[{dial}]" if ":" in dial else dial
    server_env = {**prefect_env(home), **PREFECT_SERVER_SETTINGS}
    url = database_url(home)
    if url is not None:  # in the environment, never on a command line
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_database_url(url)
    workers = prefect_workers(url is not None)
    if workers > 1:
        argv += ["--workers", str(workers)]
    apart = prefect_services_apart()
    if apart:
        argv.append("--no-services")
    if auth is not None:
        server_env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    for preferred in (PREFECT_PORT, 0):  # 4200, or any port if another took it first
        port = _free_port(preferred, host)
        api_url = f"http://{dial_host}:{port}/api"
        try:
            started = _start(
                "prefect",
                prefect_record(home),
                [*argv, "--port", str(port)],
                # the UI asks the server where the API is: this port, not 4200
                {**server_env, "PREFECT_UI_API_URL": api_url},
                api_url,
                functools.partial(prefect_healthy, home),
                listens=True,
                umask=0o077,
            )
            if apart:
                _start_prefect_services(home, {**server_env, "PREFECT_API_URL": api_url})
            return started
        except ExitedAtStart:
            if preferred == 0:
                raise
    raise AssertionError("unreachable")


def prefect_services_record(home: Home) -> Path:
    return home.prefect_dir / "services.json"


def _start_prefect_services(home: Home, env: dict[str, str]) -> str:
    """Prefect's background services in a process of their own (CRV_PREFECT_SERVICES=apart)."""
    _stop(prefect_services_record(home))
    started = time.monotonic()
    log = home.prefect_dir / "prefect-services.log"

    def running(_: str) -> bool:  # it has no port: alive for a few seconds, and said so
        text = log.read_text(errors="replace") if log.exists() else ""
        return time.monotonic() - started > 3 and "Starting" in text

    return _start(
        "prefect-services",
        prefect_services_record(home),
        [*PREFECT_SERVER, "services", "start"],
        env,
        "",
        running,
        umask=0o077,
    )


def _start_service(home: Home) -> str:
    """The crv service for `home`: its URL. On the port it had before (running nodes' agents
    call that address), else 8443, or any port if another home's service took it between the
    check and the bind (parallel `crv up`s, as the test-suite's workers run them)."""
    address = service_address()
    host = f"[{address}]" if ":" in address else address
    last = home.service_dir / "port"
    try:
        before = int(last.read_text())
    except (OSError, ValueError):
        before = SERVICE_PORT
    argv = [sys.executable, "-m", "crv.service", "--host", address]
    for netns, lab_address in lab.service_listeners(home):  # where the lab's guests dial
        argv += ["--netns-listen", f"{netns}={lab_address}"]
    for preferred in (before, 0):
        port = _free_port(preferred, address)
        try:
            url = _start(
                "service",
                service_record(home),
                [*argv, "--port", str(port)],
                {"CRV_HOME": str(home.root), "CRV_SERVICE_ADDRESS": address},
                f"https://{host}:{port}",
                functools.partial(service_healthy, home),  # our CA: ours answers
                umask=0o077,
            )
            last.write_text(f"{urllib.parse.urlsplit(url).port}\n")
            return url
        except ExitedAtStart:
            if preferred == 0:
                raise
    raise AssertionError("unreachable")


def restart_service(home: Home) -> str | None:
    """Stop this home's service and start it again (its listeners changed: the lab came up or
    went); its new URL, None when it was not running (the next command starts it as it is)."""
    if read_record(service_record(home)) is None:
        return None
    _stop(service_record(home))
    return _start_service(home)


# -- the boot services of bare-metal pools ---------------------------------------------------


def _boot_record(home: Home, pool: str) -> Path:
    return home.pool_dir(pool) / "boot-service.json"


def _boot_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


def ensure_boot_services(home: Home) -> list[str]:
    """Start the boot service (TFTP + HTTP, pools/baremetal/boot.py) of every bare-metal pool
    in pools.yaml that lacks one; the pools whose service was started. Cheap when all run: one
    health request per bare-metal pool."""
    from pools import config

    started = []
    for pool in config.load(config.config_file(home.root)).values():
        if pool.driver != "baremetal":
            continue
        from pools.baremetal.pool import BaremetalPool

        url = BaremetalPool(pool.name, home.pool_dir(pool.name), pool.options).http_url
        record = _boot_record(home, pool.name)
        data = read_record(record)
        if data is not None and data.get("url") == url and _boot_healthy(url):
            continue
        _stop(record)
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {"CRV_HOME": str(home.root)}
        argv = [sys.executable, "-m", "pools.baremetal.serve_boot", "--pool", pool.name]
        _start(f"boot-{pool.name}", record, argv, env, url, _boot_healthy)
        started.append(pool.name)
    return started


def stop_boot_service(home: Home, pool: str) -> bool:
    """Stop one pool's boot service (its pool goes: `crv lab rack --remove`, `crv lab down`)."""
    return _stop(_boot_record(home, pool))


def _stop_boot_services(home: Home) -> list[str]:
    stopped = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted((home.root / "pools").iterdir()):
            if entry.is_dir() and _stop(entry / "boot-service.json"):
                stopped.append(f"boot service of {entry.name}")
    return stopped


def _in_parallel(calls: list[Callable[[], str]]) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    if not calls:
        return []
    with ThreadPoolExecutor(len(calls)) as ex:
        return list(ex.map(lambda f: f(), calls))


def down(home: Home) -> list[str]:
    stopped = []
    if _stop(serve_record(home)):  # first: it runs flows against the other two
        stopped.append("deployments")
    if _stop(service_record(home)):
        stopped.append("service")
    if _stop(prefect_record(home)):
        stopped.append("prefect")
    if _stop(prefect_services_record(home)):
        stopped.append("prefect-services")
    if _has_local_postgres(home) and local_postgres(home).running():
        local_postgres(home).stop()
        stopped.append("postgresql")
    stopped += _stop_boot_services(home)
    from pools.baremetal import simrack

    stopped += simrack.stop_all(home)
    return stopped


# -- the served deployments -----------------------------------------------------------------


def deployment_names() -> list[str]:
    from deployments import names

    return names()


def _deployments_ready(api_url: str, since: float, auth: str | None) -> bool:
    """Served: every deployment polled by the process just started; on a work pool
    (CRV_WORK_POOL): every deployment registered to it by that process (deployments.ready)."""
    from deployments import ready

    return ready(api_url, since, auth, work_pool())


def served(home: Home, api_url: str) -> int | None:
    """The pid serving the deployments against `api_url`, if one does."""
    data = read_record(serve_record(home))
    if data is None or data.get("url") != api_url:
        return None
    return int(data["pid"])


def serve_env(home: Home, api_url: str) -> dict[str, str]:
    """What the serving process and every flow run it starts see: this CRV_HOME, this Prefect
    API; flow and runner logs at INFO on its console (the daemon's log file)."""
    return {
        **prefect_env(home, api_url),
        "CRV_HOME": str(home.root),
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",
    }


def _start_serving(home: Home, api_url: str) -> str:
    _stop(serve_record(home))  # one that serves a Prefect server that is gone
    since = time.time()
    return _start(
        "deployments",
        serve_record(home),
        [sys.executable, "-m", "deployments"],
        serve_env(home, api_url),
        api_url,
        lambda url: _deployments_ready(url, since, api_auth(home)),
    )


def ensure_served(home: Home, endpoints: Endpoints) -> int:
    """Serve the deployments in the background unless something already does; the pid."""
    pid = served(home, endpoints.prefect_api_url)
    if pid is None:
        _start_serving(home, endpoints.prefect_api_url)
        pid = served(home, endpoints.prefect_api_url)
    if pid is None:
        raise DaemonError("the deployments are not served; see " + str(home.prefect_dir))
    return pid


def serve_foreground(home: Home) -> None:
    """`crv serve`: the service and Prefect in the background if they are not running, the
    deployments served by this process until Ctrl-C or `crv down`."""
    endpoints = running(home) or up(home, serve=False)
    pid = served(home, endpoints.prefect_api_url)
    if pid is not None:
        raise DaemonError(
            f"the deployments are already served (pid {pid}, started by `crv up` or another "
            "`crv serve`); `crv down` stops everything"
        )
    os.environ.update(serve_env(home, endpoints.prefect_api_url))
    record = serve_record(home)
    me = os.getpid()
    entry = {"pid": me, "started": start_time(me), "url": endpoints.prefect_api_url}
    record.write_text(json.dumps({**entry, "group": False}))
    try:
        from deployments.serve import serve

        serve()
    finally:
        data = read_record(record)
        if data is not None and int(data["pid"]) == me:
            with contextlib.suppress(FileNotFoundError):
                record.unlink()
