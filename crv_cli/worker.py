"""`crv worker-config DIR` and `crv worker`: Prefect workers that run crv's flows on other
machines (docs/workers.md).

`CRV_WORK_POOL=crv crv up` registers the deployments to the Prefect work pool `crv` instead of
serving them (deployments.serve). Any machine where crv is installed then runs their flow runs
with Prefect's own process worker, given what the crv machine shares: the service's URL, its CA
certificate, the admin certificate and key, the Prefect API's URL and auth string, pools.yaml.
`crv worker-config DIR` writes all of it into one directory (0700, every file 0600), laid out as
a CRV_HOME (`ca/ca.crt`, `service/admin.crt`, `service/admin.key`, `pools.yaml`) with
`worker.json` (the URLs, the pool) and `worker.env` (the environment of `prefect worker start`:
the auth string is there, and only there). Copy the directory to the worker machine.

`crv worker --config DIR` is `prefect worker start --pool crv --type process` (Prefect's worker,
exec'ed: its pid is the worker's) in that environment, with CRV_WORKER_CONFIG=DIR, so every flow
run it starts (a child process inheriting it) finds the service from DIR, not from a CRV_HOME
(crv.base.running.find_site). `set -a; . DIR/worker.env; set +a; prefect worker start --pool crv`
does the same. Without a configuration, `crv worker` on the crv machine runs a worker of this
CRV_HOME (its flows then see the home, local pool included). Secrets travel in files and in the
environment, never on a command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import stat
import sys
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

from crv.base.home import Home
from crv.base.running import (
    ENV_WORKER_CONFIG,
    HEARTBEAT_SECONDS,
    WORKER_ENV_FILE,
    WORKER_FILE,
    DaemonError,
    checked_work_pool,
    prefect_env,
    read_worker_config,
    registered_work_pool,
    running,
    work_pool,
)
from crv_cli.common import home as cli_home
from crv_cli.common import user_errors

DEFAULT_POOL = "crv"

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="DIR",
        help="The worker configuration `crv worker-config` wrote (default: CRV_WORKER_CONFIG; "
        "without either, this machine's CRV_HOME).",
    ),
]
PoolOption = Annotated[
    str | None,
    typer.Option(
        "--pool",
        metavar="NAME",
        help=f"The Prefect work pool (default: the configuration's, else CRV_WORK_POOL, else "
        f"{DEFAULT_POOL}).",
    ),
]


def _chosen_pool(given: str | None, home: Home | None = None) -> str:
    """--pool, else the pool `crv up` registered the deployments to (of `home`), else
    CRV_WORK_POOL, else `crv`."""
    if given is not None:
        return checked_work_pool(given, "--pool")
    registered = registered_work_pool(home) if home is not None else None
    return registered or work_pool() or DEFAULT_POOL


def _write_private(path: Path, data: bytes) -> None:
    """`path` with mode 0600 (replaced whole, never readable by others in between)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def write_config(home: Home, directory: Path, pool: str) -> list[str]:
    """Write the worker configuration of this running home into `directory` (module doc); the
    warnings to show (a URL only this machine reaches)."""
    endpoints = running(home)
    if endpoints is None:
        raise DaemonError(
            f"crv is not running in {home.root}: start it first (`CRV_WORK_POOL={pool} crv up`)"
        )
    from crv.base.running import api_auth
    from pools import config as pools_config

    directory = directory.expanduser().absolute()
    if directory.exists() and not directory.is_dir():
        raise DaemonError(f"{directory}: exists and is not a directory")
    if directory.resolve() == home.root.resolve():
        raise DaemonError(f"{directory}: that is CRV_HOME itself; name another directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    target = Home(directory)
    for d in (target.ca_dir, target.service_dir):
        d.mkdir(mode=0o700, exist_ok=True)
        d.chmod(0o700)
    _write_private(target.ca_file, home.ca_file.read_bytes())
    _write_private(target.admin_cert, home.admin_cert.read_bytes())
    _write_private(target.admin_key, home.admin_key.read_bytes())
    pools_file = pools_config.config_file(home.root)
    copied = directory / "pools.yaml"
    if pools_file.is_file():
        _write_private(copied, pools_file.read_bytes())
    else:
        with contextlib.suppress(FileNotFoundError):
            copied.unlink()
    made = {
        "service_url": endpoints.service_url,
        "prefect_api_url": endpoints.prefect_api_url,
        "work_pool": pool,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "from": f"{socket.gethostname()}:{home.root}",
    }
    _write_private(directory / WORKER_FILE, (json.dumps(made, indent=2) + "\n").encode())
    env = {
        ENV_WORKER_CONFIG: str(directory),
        "PREFECT_API_URL": endpoints.prefect_api_url,
        **({"PREFECT_API_AUTH_STRING": auth} if (auth := api_auth(home)) else {}),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
    }
    lines = [
        "# crv worker configuration (`crv worker-config`): the environment of a Prefect worker",
        f"# of the work pool {pool}. It holds the Prefect API's auth string: keep it 0600.",
        f"#   set -a; . {directory}/{WORKER_ENV_FILE}; set +a",
        f"#   prefect worker start --pool {pool} --type process",
        f"# ({ENV_WORKER_CONFIG} is where this directory is on the worker's machine.)",
        *(f"{key}={shlex.quote(value)}" for key, value in env.items()),
    ]
    _write_private(directory / WORKER_ENV_FILE, ("\n".join(lines) + "\n").encode())
    warnings = []
    registered = registered_work_pool(home)
    if registered != pool:
        now = f"registered to work pool {registered}" if registered else "served by `crv up`"
        warnings.append(
            f"the deployments are {now}: workers of {pool} get no runs until `crv down` and "
            f"`CRV_WORK_POOL={pool} crv up`"
        )
    if _loopback(endpoints.service_url):
        warnings.append(
            f"the crv service listens on {endpoints.service_url}: only workers on this machine "
            "reach it (CRV_SERVICE_ADDRESS=<an address of this host> before `crv up` for others)"
        )
    if _loopback(endpoints.prefect_api_url):
        warnings.append(
            f"the Prefect API is {endpoints.prefect_api_url}: only workers on this machine reach "
            "it (CRV_PREFECT_HOST=<an address of this host> before `crv up` for others)"
        )
    return warnings


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (shell quoting) of a worker.env; comments and blank lines skipped."""
    found: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        try:
            words = shlex.split(value)
        except ValueError as e:
            raise DaemonError(f"{path}: line {number}: {e}") from None
        if not sep or not key.isidentifier() or len(words) > 1:
            raise DaemonError(f"{path}: line {number}: not a KEY=VALUE line")
        found[key] = words[0] if words else ""
    return found


def _private(path: Path) -> None:
    """A file holding a secret must be this user's alone (0600 or tighter)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DaemonError(
            f"{path}: mode {mode:04o}: others can read it; `chmod 600 {path}` (it holds a secret)"
        )


def worker_env(config: Path | None) -> tuple[dict[str, str], str | None]:
    """The environment of a worker (and of every flow run it starts), and the configuration's
    work pool: from a worker configuration directory, or from this CRV_HOME without one."""
    if config is None:
        home = cli_home()
        endpoints = running(home)
        if endpoints is None:
            raise DaemonError(
                f"no worker configuration (--config DIR or {ENV_WORKER_CONFIG}) and crv is not "
                f"running in {home.root}: on another machine, give the directory `crv "
                "worker-config` wrote; here, `crv up` first"
            )
        env = {
            **os.environ,
            **prefect_env(home, endpoints.prefect_api_url),
            "CRV_HOME": str(home.root),
        }
        env.pop(ENV_WORKER_CONFIG, None)
        return env, None
    root = config.expanduser().resolve()
    _, _, pool = read_worker_config(root)
    home = Home(root)
    for secret in (root / WORKER_ENV_FILE, home.admin_key):
        _private(secret)
    shared = read_env_file(root / WORKER_ENV_FILE)
    if "PREFECT_API_URL" not in shared:
        raise DaemonError(f"{root / WORKER_ENV_FILE}: PREFECT_API_URL: missing")
    prefect_home = root / "prefect"  # this worker's own Prefect state: no profile of the user's
    prefect_home.mkdir(mode=0o700, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        **shared,
        ENV_WORKER_CONFIG: str(root),  # where it is here, whatever worker.env says
    }
    env.pop("CRV_HOME", None)  # the configuration, not a home, says where crv is
    env.pop("PREFECT_API_KEY", None)  # a key beside the auth string breaks the auth
    return env, pool


def register(app: typer.Typer) -> None:
    """Add `crv worker-config` and `crv worker` to the `crv` command."""

    @app.command("worker-config")
    def worker_config(
        directory: Annotated[
            Path, typer.Argument(metavar="DIR", help="Where to write it (made 0700).")
        ],
        pool: PoolOption = None,
    ) -> None:
        """Write what a Prefect worker on another machine needs into DIR (the service URL, the
        CA certificate, the admin certificate and key, the Prefect API URL and auth string,
        pools.yaml; every file 0600) and say what to copy. It holds crv's admin key."""
        home = cli_home()
        with user_errors():
            chosen = _chosen_pool(pool, home)
            warnings = write_config(home, directory, chosen)
        d = directory.expanduser().absolute()
        print(f"wrote {d} (mode 0700, every file 0600):")
        print(f"  {WORKER_FILE}        the crv service's URL, the Prefect API's URL, the work pool")
        print(f"  {WORKER_ENV_FILE}         the environment of `prefect worker start` (the auth "
              "string)")  # fmt: skip
        print("  ca/ca.crt          the CA certificate (the service's TLS, the nodes' bootstrap)")
        print("  service/admin.*    the admin client certificate and key")
        if (d / "pools.yaml").is_file():
            print("  pools.yaml         the pools (credentials by reference stay references)")
        print("copy it whole to each worker machine (whoever has it acts as crv's admin), then:")
        print(f"  crv worker --config {d} --pool {chosen}")
        print(f"  # or: set -a; . {d}/{WORKER_ENV_FILE}; set +a; "
              f"prefect worker start --pool {chosen} --type process")  # fmt: skip
        print("the local pool cannot be used from another machine (docs/workers.md)")
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)

    @app.command("worker")
    def worker(
        config: ConfigOption = None,
        pool: PoolOption = None,
        name: Annotated[
            str | None,
            typer.Option("--name", help="The worker's name in Prefect (default: Prefect's)."),
        ] = None,
        limit: Annotated[
            int | None,
            typer.Option("--limit", min=1, help="At most this many flow runs at once."),
        ] = None,
    ) -> None:
        """Run a Prefect process worker for crv's work pool (`prefect worker start`) with the
        configuration `crv worker-config` wrote: its flow runs find the service from it, with no
        CRV_HOME. Until Ctrl-C."""
        given = config or (Path(p) if (p := os.environ.get(ENV_WORKER_CONFIG)) else None)
        with user_errors():
            env, configured = worker_env(given)
            chosen = pool if pool is not None else configured
            chosen = _chosen_pool(chosen)
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", chosen]
        argv += ["--type", "process"]
        if name:
            argv += ["--name", name]
        if limit:
            argv += ["--limit", str(limit)]
        where = f"configuration {given}" if given else f"CRV_HOME {cli_home().root}"
        print(f"worker of work pool {chosen} against {env['PREFECT_API_URL']} ({where})",
              file=sys.stderr, flush=True)  # fmt: skip
        sys.stdout.flush()
        python = shutil.which(sys.executable) or sys.executable
        os.execve(python, argv, env)
