"""The `crv` command line.

Exit codes are a contract: 0 success, 2 bad input (one line on stderr,
`error: <file>: <field>: <what is wrong>`, no traceback, nothing done).
"""

from __future__ import annotations

import asyncio
import enum
import json
import signal
import sys
import time
from collections.abc import Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from crv import __version__
from crv.appliance.loader import (
    NOT_SCALED,
    load_appliance,
    load_recorded,
    locate,
    parse_overrides,
    with_counts,
)
from crv.appliance.plan import Plan, expand
from crv.appliance.spec import json_schema
from crv.base.errors import CrvError, SpecError
from crv.base.home import Home, disk_full
from crv.base.running import registered_work_pool
from crv.engine.placement import Drift, Drivers, check, drift, lapsed, place, pools_of
from crv.service.client import Service, ServiceError
from crv.service.models import ClusterStatus
from crv.service.pki import node_ttl_from_env
from crv.service.store import LEAVING
from crv_cli import common, daemons, submit
from crv_cli.common import (
    EXIT_BAD_INPUT,
    console,
    ensure_up,
    err_console,
    user_errors,
)
from crv_cli.common import home as cli_home
from crv_cli.plan_view import describe
from pools import AGENT as AGENT_FILE
from pools import get_pool

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

PAIR_POLL = 1.0  # seconds between looks at a pairing while crv pair waits

app = typer.Typer(
    name="crv",
    help="Deploy virtual cluster appliances onto resource pools.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Directory = Annotated[
    Path, typer.Argument(metavar="DIR", help="An appliance directory (holds appliance.yaml).")
]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Set an appliance parameter."),
]
Wait = Annotated[
    float | None,
    typer.Option(
        "--wait",
        metavar="SECONDS",
        min=0,
        help="How long to wait while another change of the cluster runs (default: as long as "
        "it takes; 0: refuse at once).",
    ),
]


class OnFailureChoice(str, enum.Enum):
    keep = "keep"
    rollback = "rollback"


OnFailureOption = Annotated[
    OnFailureChoice | None,
    typer.Option(
        "--on-failure",
        help="If the change fails: keep what it made (run it again to resume) or roll back "
        "what it added (default: the appliance's on_failure, else keep).",
        show_default=False,
    ),
]
PoolFor = Annotated[
    list[str] | None,
    typer.Option(
        "--pool-for",
        metavar="GROUP=POOL",
        help="Put a node group's nodes in another pool (repeatable); the default for a group "
        "is its pool in the appliance, else --pool.",
    ),
]
ClusterName = Annotated[
    str | None, typer.Option("--name", "-n", help="Cluster name (default: the appliance's name).")
]


def _plan(directory: Path, sets: list[str] | None, name: str | None) -> Plan:
    return expand(load_appliance(directory, parse_overrides(sets or [])), cluster=name)


@app.command()
def validate(directory: Directory, set_: Sets = None, name: ClusterName = None) -> None:
    """Check an appliance (and its plan) without provisioning anything."""
    with user_errors():
        plan = _plan(directory, set_, name)
    a = plan.appliance
    print(
        f"ok: {a.source}: appliance {a.name}, {len(a.groups)} node groups, {len(a.roles)} roles, "
        f"{len(plan.nodes)} nodes, {plan.graph.number_of_nodes()} steps"
    )


@app.command()
def plan(
    directory: Directory,
    set_: Sets = None,
    name: ClusterName = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as one JSON object.")
    ] = False,
) -> None:
    """Print the DAG of steps a deploy would run, by levels, and its critical path."""
    with user_errors():
        result = _plan(directory, set_, name)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
    else:
        console.print(describe(result))


@app.command()
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of appliance.yaml (for editors and linters)."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


# -- running clusters -----------------------------------------------------------------------


@app.command()
def up(
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            metavar="URL",
            help="Keep crv's store and the Prefect server's database in this PostgreSQL "
            "(postgresql://USER:PASSWORD@HOST:PORT/DB; the password may come from ~/.pgpass or "
            "PGPASSWORD instead), from now on; `sqlite` goes back to SQLite in CRV_HOME. "
            "CRV_DATABASE_URL does the same for one command.",
        ),
    ] = None,
    postgres: Annotated[
        bool,
        typer.Option(
            "--postgres",
            help="Start a PostgreSQL of this home's own (Debian's postgresql package) and use "
            "it as --database does.",
        ),
    ] = False,
) -> None:
    """Start the crv service, a Prefect server and the served deployments in the background
    (idempotent)."""
    home = cli_home()
    with user_errors():
        daemons.choose_database(home, database, postgres=postgres)
        endpoints = ensure_up(home)
    home.tighten()  # running already: a home left open since (or by an older crv) is closed
    print(f"crv service: {endpoints.service_url}")
    print(f"Prefect UI:  {endpoints.prefect_ui_url}")
    print(f"Prefect API: {endpoints.prefect_api_url}")
    print(f"state:       {home.root}")
    print(f"database:    {daemons.database_description(home)}")
    ttl = float(Service(home, endpoints.service_url).call("GET", "/v1/health")["node_cert_ttl"])
    print(f"node certs:  {ttl:g} s lifetime, renewed by each agent at about 2/3 of it "
          "(CRV_NODE_CERT_TTL)")  # fmt: skip
    wanted = node_ttl_from_env().total_seconds()
    if wanted != ttl:
        print(f"             (CRV_NODE_CERT_TTL={wanted:g} takes effect after `crv down`)")
    with user_errors():
        pid = daemons.ensure_served(home, endpoints)
    pool = registered_work_pool(home)
    how = f"served by pid {pid}" if pool is None else f"on work pool {pool}: run by `crv worker`"
    print(f"deployments: {', '.join(daemons.deployment_names())} ({how})")
    print(f"run forms:   {endpoints.prefect_ui_url}/deployments")
    if daemons.api_auth(home) is None:
        print("API auth:    none (CRV_PREFECT_AUTH=off; loopback only)")
    else:
        print(
            f"API auth:    user {daemons.PREFECT_USER}, password in {home.prefect_auth_file} "
            "(`crv api-credentials` prints what another system needs)"
        )


@app.command("api-credentials")
def api_credentials(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (for machines).")
    ] = False,
    auth_string: Annotated[
        bool,
        typer.Option(
            "--auth-string",
            help="Print only user:password (for curl -u, or PREFECT_API_AUTH_STRING); starts "
            "nothing.",
        ),
    ] = False,
) -> None:
    """Print what another system needs to use the Prefect API: its URL, the user and password
    of its basic auth, and a curl line (starts crv if it is not running). Keep the output to
    yourself: whoever has it can run crv's flows."""
    home = cli_home()
    with user_errors():
        if auth_string:
            home.ensure()
            if not daemons.prefect_auth_enabled():
                raise daemons.DaemonError("the Prefect API has no auth (CRV_PREFECT_AUTH=off)")
            print(daemons.ensure_api_auth(home))
            return
        endpoints = ensure_up(home, quiet=as_json)
        auth = daemons.api_auth(home)
    api = endpoints.prefect_api_url
    user, _, password = auth.partition(":") if auth else (None, "", None)
    probe = f"{api}/deployments/name/deploy-appliance/crv"
    curl = f"curl -u '{auth}' {probe}" if auth else f"curl {probe}"
    if as_json:
        found = {
            "api_url": api,
            "ui_url": endpoints.prefect_ui_url,
            "user": user,
            "password": password,
            "auth_string": auth,
            "file": str(home.prefect_auth_file) if auth else None,
            "env": {"PREFECT_API_URL": api, **({"PREFECT_API_AUTH_STRING": auth} if auth else {})},
            "curl": curl,
        }
        sys.stdout.write(json.dumps(found) + "\n")
        return
    print(f"Prefect API: {api}")
    print(f"Prefect UI:  {endpoints.prefect_ui_url} (sign in with the auth string as password)")
    if auth is None:
        print("auth:        none (CRV_PREFECT_AUTH=off; loopback only)")
    else:
        print(f"user:        {user}")
        print(f"password:    {password}")
        print(f"auth string: {auth}  (PREFECT_API_AUTH_STRING for Prefect's clients)")
        print(f"file:        {home.prefect_auth_file}")
    print(f"curl:        {curl}")


@app.command()
def down() -> None:
    """Stop the served deployments, the crv service and the Prefect server (nodes keep
    running)."""
    stopped = daemons.down(cli_home())
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def serve() -> None:
    """Serve the Prefect deployments (deploy-appliance, scale-role, destroy-cluster) in the
    foreground until Ctrl-C; `crv up` already serves them in the background."""
    home = cli_home()
    with user_errors():
        daemons.serve_foreground(home)


@app.command()
def deploy(
    directory: Annotated[
        str, typer.Argument(metavar="DIR", help="An appliance directory, or a catalog name.")
    ],
    pool: Annotated[
        str, typer.Option("--pool", "-p", help="Resource pool of the node groups.")
    ] = "local",
    pool_for: PoolFor = None,
    set_: Sets = None,
    name: ClusterName = None,
    retries: Annotated[int, typer.Option(help="Retries per step (temporary errors).")] = 2,
    boot_timeout: Annotated[float, typer.Option(help="Seconds for a node to enrol.")] = 300.0,
    wait: Wait = None,
    on_failure: OnFailureOption = None,
    autoscale: Annotated[
        bool,
        typer.Option(
            "--autoscale", help="Enable autoscaling once deployed (needs a scaling section)."
        ),
    ] = False,
    autoscale_every: Annotated[
        str, typer.Option(help="With --autoscale: the schedule's interval, e.g. 60s, 5m.")
    ] = "60s",
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            metavar="KEY",
            help="Run through the deploy-appliance deployment, once per KEY: the same command "
            "again (while it runs or after) follows the same run instead of starting another.",
        ),
    ] = None,
) -> None:
    """Deploy an appliance: provision, certify, contextualize and verify every node."""
    home = cli_home()
    overrides = parse_overrides(set_ or []) if set_ else {}
    with user_errors():
        if idempotency_key is not None:
            idempotency_key = submit.checked_key(idempotency_key)
            reference = submit.catalog_name(directory)
        plan = expand(load_appliance(locate(directory), overrides), cluster=name)
        groups = _pool_for(pool_for)
        check(home, plan.appliance, place(plan.appliance, pool, groups), groups)
        every = None
        if autoscale:
            from crv_cli.autoscale import interval

            every = interval("--autoscale-every", autoscale_every)
            if not plan.appliance.scaled:
                raise SpecError(plan.appliance.source, "nodes", f"--autoscale: {NOT_SCALED}")
        endpoints = ensure_up(home)
    if idempotency_key is not None:
        asked = {
            "appliance": reference,
            "pool": pool,
            "name": plan.cluster,
            "parameters": overrides or None,
            "boot_timeout": boot_timeout,
            "retries": retries,
            "wait": wait,
            "on_failure": on_failure.value if on_failure else None,
            "pools": groups or None,
            "autoscale_every": every,
        }
        state = _submitted("deploy-appliance/crv", asked, idempotency_key, endpoints, plan.cluster)
    else:
        state = _run_with_progress(
            _deploy_here(
                directory,
                pool,
                plan,
                overrides,
                boot_timeout,
                retries,
                wait,
                on_failure,
                groups,
                every,
            ),
            endpoints,
            f"deploying {plan.cluster}",
            plan,
        )
    _report(state, "deploy", home, endpoints, plan)
    if every is not None:
        print(f"autoscaling every {every:g} s: `crv autoscale status {plan.cluster}`")


def _deploy_here(
    directory: str,
    pool: str,
    plan: Plan,
    overrides: dict[str, str],
    boot_timeout: float,
    retries: int,
    wait: float | None,
    on_failure: OnFailureChoice | None,
    groups: dict[str, str],
    every: float | None,
) -> Any:
    """The deploy flow's coroutine, to run in this process."""
    from flows.deploy import deploy_appliance

    return deploy_appliance(
        appliance=str(locate(directory)),
        pool=pool,
        name=plan.cluster,
        parameters=overrides,
        boot_timeout=boot_timeout,
        retries=retries,
        wait=wait,
        on_failure=on_failure.value if on_failure else None,
        pools=groups or None,
        autoscale_every=every,
        return_state=True,
    )


def _submitted(
    deployment: str,
    asked: dict[str, Any],
    key: str,
    endpoints: daemons.Endpoints,
    cluster: str,
) -> State[Any]:
    """Create (or find) the run of `deployment` for `key` and follow it to its end."""
    parameters = {k: v for k, v in asked.items() if v is not None}

    async def go() -> State[Any]:
        made = await submit.submit(deployment, parameters, key)
        run = made.run
        said = "new run" if made.new else f"the run of key {key} ({run.state_name})"
        err_console.print(
            f"{said}: {run.name}; watch it: {endpoints.prefect_ui_url}/runs/flow-run/{run.id}",
            soft_wrap=True,
        )
        ended = await submit.follow(run, f"{deployment} {cluster}")
        assert ended.state is not None
        return ended.state

    with user_errors():
        try:
            return asyncio.run(go())
        except KeyboardInterrupt:  # the run goes on in the deployment's process
            raise Stopped(signal.SIGINT) from None


def _pool_for(given: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in given or []:
        group, sep, pool = item.partition("=")
        if not sep or not group.strip() or not pool.strip():
            raise SpecError("--pool-for", item, "expected GROUP=POOL")
        if group.strip() in out:
            raise SpecError("--pool-for", item, f"group {group.strip()!r} is given twice")
        out[group.strip()] = pool.strip()
    return out


def _run_with_progress(
    run: Any, endpoints: daemons.Endpoints, label: str, plan: Plan
) -> State[dict[str, Any]]:
    """Run a flow in this process with a progress bar over the plan's steps."""
    from flows.deploy import PROGRESS_LISTENERS, STARTED_LISTENERS

    ui = endpoints.prefect_ui_url
    STARTED_LISTENERS.append(
        lambda run_id: err_console.print(f"watch it: {ui}/runs/flow-run/{run_id}", soft_wrap=True)
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        bar = progress.add_task(label, total=plan.graph.number_of_nodes())
        PROGRESS_LISTENERS.append(
            lambda dag: progress.update(bar, completed=sum(dag.counts().values()))
        )
        try:
            return asyncio.run(cast("Coroutine[Any, Any, State[dict[str, Any]]]", run))
        except KeyboardInterrupt:  # past click, which would only say "Aborted!"
            raise Stopped(signal.SIGINT) from None


def _report(
    state: State[dict[str, Any]], what: str, home: Home, endpoints: daemons.Endpoints, plan: Plan
) -> None:
    try:
        status = Service(home, endpoints.service_url).status(plan.cluster)
    except ServiceError as e:  # the run ended, but the service cannot say how the cluster is
        outcome = "completed" if state.is_completed() else f"failed: {common.reason(state)}"
        print(f"error: {what} of {plan.cluster} {outcome}; then {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    if not state.is_completed():
        reason = common.reason(state)
        print(
            f"error: {what} of {plan.cluster} failed: {reason}{_disk_full(home, reason)}",
            file=sys.stderr,
        )
        raise typer.Exit(1)
    print(f"cluster {plan.cluster} is ready ({len(plan.nodes)} nodes)")
    for role, node, url in _entry_points(plan, status):
        print(f"{role} on {node}: {url}")
    print(f"Prefect UI: {endpoints.prefect_ui_url}")


@app.command()
def scale(
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    group: Annotated[str, typer.Argument(help="Node group (e.g. worker).")],
    count: Annotated[int, typer.Argument(help="Nodes the group should have.", min=0)],
    retries: Annotated[int, typer.Option(help="Retries per step (temporary errors).")] = 2,
    boot_timeout: Annotated[float, typer.Option(help="Seconds for a node to enrol.")] = 300.0,
    wait: Wait = None,
    on_failure: OnFailureOption = None,
    remove: Annotated[
        list[str] | None,
        typer.Option(
            "--remove",
            metavar="NODE",
            help="Remove exactly this node of the group (again for more); COUNT is then the "
            "group's size less them.",
        ),
    ] = None,
) -> None:
    """Resize a node group: new nodes go through every step, the roles that read the group are
    contextualized again, removed nodes (those named by --remove, else the idlest by their
    `busy` reports, then the newest) are drained, let go by their dependents, destroyed and
    their certificates revoked. Nodes nothing changed for are not touched."""
    home = cli_home()
    with user_errors():
        endpoints = ensure_up(home)
        found = Service(home, endpoints.service_url).status(name)
        if found is None:
            raise SpecError("crv scale", "NAME", f"no cluster {name!r}")
        if remove:
            from crv.engine.placement import explicit_victims

            recorded_now = load_recorded(found["source"], found["parameters"] or {},
                                         found.get("counts") or {})  # fmt: skip
            if group not in recorded_now.groups:
                known = ", ".join(recorded_now.groups)
                raise SpecError("crv scale", "GROUP", f"no group {group!r} (groups: {known})")
            low = recorded_now.groups[group].scale_min
            explicit_victims(group, low, found["nodes"], count, remove)
        counts = {**(found.get("counts") or {}), group: count}
        plan = expand(load_recorded(found["source"], found["parameters"] or {}, counts), name)
    from crv_cli.approval import announce_waits
    from flows.scale import scale_role

    announce_waits(endpoints.prefect_ui_url)  # a shrink that waits for approval says so
    run = scale_role(
        name=name,
        group=group,
        count=count,
        boot_timeout=boot_timeout,
        retries=retries,
        wait=wait,
        on_failure=on_failure.value if on_failure else None,
        remove=remove or None,
        return_state=True,
    )
    state = _run_with_progress(run, endpoints, f"scaling {name} {group} to {count}", plan)
    _report(state, "scale", home, endpoints, plan)


@app.command()
def pair(
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    group: Annotated[str, typer.Argument(help="Node group the machine joins (e.g. worker).")],
    ttl: Annotated[
        str, typer.Option(help="How long the PIN can be used, e.g. 10m (30 s to 1 day).")
    ] = "10m",
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait",
            help="Print the PIN and return; the next deploy, scale or repair of the cluster "
            "contextualizes the machine once it has paired.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object and return (like --no-wait).")
    ] = False,
    retries: Annotated[int, typer.Option(help="Retries per step (temporary errors).")] = 2,
) -> None:
    """Let a machine crv did not make (a desktop, a server behind NAT) join a node group:
    prints a one-time PIN, the CA fingerprint and the command to run on the machine
    (`crv-agent pair`), waits until the machine has paired, then contextualizes it like any
    new node of the group (its roles, and the roles that read the group, run)."""
    from crv_cli.autoscale import interval

    home = cli_home()
    with user_errors():
        seconds = interval("--ttl", ttl, least=30)
        endpoints = ensure_up(home, quiet=as_json)
        service = Service(home, endpoints.service_url)
        found = service.status(name)
        if found is None:
            raise SpecError("crv pair", "CLUSTER", f"no cluster {name!r}")
        counts = found.get("counts") or {}
        loaded = load_recorded(found["source"], found["parameters"] or {}, counts)
        if group not in loaded.groups:
            known = ", ".join(loaded.groups)
            raise SpecError("crv pair", "GROUP", f"no group {group!r} in {name} ({known})")
        with_counts(loaded, {**counts, group: _members(found, group) + 1})  # fixed, or at max
        roles = list(loaded.groups[group].roles)
        made = service.create_pairing(name, group, roles, seconds)
    agent = AGENT_FILE
    command = (
        f"python3 crv_agent.py --home /var/lib/crv-agent pair {endpoints.service_url} "
        f"{made['pin']} --ca-sha256 {made['ca_sha256']} --address ADDRESS"
    )
    if as_json:
        print(json.dumps({**made, "cluster": name, "group": group,
                          "service": endpoints.service_url, "agent": str(agent),
                          "command": command}))  # fmt: skip
        return
    until = datetime.fromisoformat(made["expires_at"]).strftime("%H:%M:%S UTC")
    print(f"PIN {made['pin']} for cluster {name} group {group}: once, until {until}")
    print(f"CA fingerprint (SHA-256): {made['ca_sha256']}")
    print(f"on the machine (the agent is {agent}, one file, Python 3 only):")
    print(f"  {command}")
    print("  (ADDRESS: the machine's IP address as the other nodes reach it; leave out "
          "--address when none does)")  # fmt: skip
    sys.stdout.flush()
    if no_wait:
        return
    node = _await_pairing(service, made["id"], seconds)
    with user_errors():
        found = service.status(name)
        assert found is not None
        count = _members(found, group)
        counts = {**(found.get("counts") or {}), group: count}
        plan = expand(load_recorded(found["source"], found["parameters"] or {}, counts), name)
    print(f"{node} paired; contextualizing it")
    from flows.scale import scale_role

    run = scale_role(name=name, group=group, count=count, retries=retries, return_state=True)
    state = _run_with_progress(run, endpoints, f"contextualizing {node}", plan)
    _report(state, "pairing", home, endpoints, plan)


def _members(status: ClusterStatus, group: str) -> int:
    """The nodes of `group` that count (a shrink's victims, `leaving`, no longer do)."""
    return sum(1 for n in status["nodes"] if n["group"] == group and n["state"] != LEAVING)


def _await_pairing(service: Service, ident: str, seconds: float) -> str:
    """The node the machine became, once it paired; exit 1 when the PIN ended unused."""
    deadline = time.monotonic() + seconds + 5
    try:
        while time.monotonic() < deadline:
            found = service.pairing(ident)
            if found["state"] == "paired":
                return str(found["node"])
            if found["state"] in ("expired", "locked"):
                why = "it expired" if found["state"] == "expired" else "it was locked out"
                print(f"error: no machine paired: {why}; run crv pair again", file=sys.stderr)
                raise typer.Exit(1)
            time.sleep(PAIR_POLL)
    except KeyboardInterrupt:
        raise Stopped(signal.SIGINT) from None
    except ServiceError as e:  # the service went away while we waited
        print(f"error: waiting for the machine to pair: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    print("error: no machine paired: the PIN expired; run crv pair again", file=sys.stderr)
    raise typer.Exit(1)


def _disk_full(home: Home, reason: str) -> str:
    """What a failure's line adds when CRV_HOME's filesystem filled up during the change:
    Prefect's server and crv's service then answer only '500' or '503' (F15)."""
    full = disk_full(home.root)
    return f"; {full}" if full is not None and full not in reason else ""


def _entry_points(plan: Plan, status: ClusterStatus | None) -> list[tuple[str, str, str]]:
    """The `url` of roles no other role depends on: where a user starts (the load balancer)."""
    used = {d.role for r in plan.appliance.roles.values() for d in r.depends_on}
    out = []
    for n in status["nodes"] if status else []:
        for role, r in n["roles"].items():
            url = r.get("attributes", {}).get("url")
            if role not in used and url:
                out.append((role, n["name"], url))
    return out


@app.command()
def status(
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    show_timings: Annotated[
        bool,
        typer.Option(
            "--timings",
            help="Where each node's time went: seconds from provision to each phase (power-on, "
            "PXE script, kernel, ramdisk, call-back, enrolled, recipes, verified).",
        ),
    ] = False,
) -> None:
    """Show a cluster's nodes, their pools and the state of every role on them, and where the
    pools disagree with crv's records (drift: `crv repair` converges it)."""
    home = cli_home()
    with user_errors():
        endpoints = ensure_up(home, quiet=as_json)
        found = Service(home, endpoints.service_url).status(name)
        if found is None:
            raise SpecError("cluster", name, "no such cluster (see `crv list`)")
        found_drift = drift(found, Drivers(home))
    if as_json:
        sys.stdout.write(json.dumps(status_json(found, found_drift)) + "\n")
        return
    if show_timings:
        from rich.console import Console

        table = _timings_table(found)
        Console(
            width=max(console.width, table.__rich_measure__(console, console.options).maximum)
        ).print(table)
        return
    table = Table(title=f"{found['name']} ({found['appliance']}) ready={found['ready']}")
    for column in ("node", "group", "pool", "address", "state", "roles"):
        table.add_column(column)
    for n in found["nodes"]:
        roles = ", ".join(f"{r}={v['state']}" for r, v in n["roles"].items())
        table.add_row(n["name"], n["group"], n["pool"], n["address"] or "-", n["state"], roles)
    console.print(table)
    for line in _drift_lines(name, found_drift):
        print(line)


def _timings_table(found: ClusterStatus) -> Table:
    from crv.engine.timings import PHASES, seconds_since_start

    rows = {n["name"]: seconds_since_start(n.get("timings") or {}) for n in found["nodes"]}
    seen = {p for r in rows.values() for p in r} - {"provision"}
    phases = [p for p in PHASES if p in seen]
    table = Table(title=f"{found['name']}: seconds from provision to each phase")
    for column in ("node", "pool", *phases):
        table.add_column(
            column, justify="left" if column in ("node", "pool") else "right", no_wrap=True
        )
    for n in found["nodes"]:
        times = rows[n["name"]]
        cells = [f"{times[p]:.1f}" if p in times else "-" for p in phases]
        table.add_row(n["name"], n["pool"], *cells)
    return table


def _drift_lines(cluster: str, found: Drift) -> list[str]:
    lines = [
        f"drift: {n['name']} is missing from pool {n['pool']} ({n['state']})" for n in found.missing
    ]
    lines += [
        f"drift: {n['name']} in pool {n['pool']} is tagged for {cluster} but not in its records"
        for n in found.orphans
    ]
    lines += [f"drift: pool {p} could not be asked: {why}" for p, why in found.unreachable.items()]
    if found.missing or found.orphans:
        lines.append(f"run `crv repair {cluster}` to converge")
    return lines


def status_json(found: ClusterStatus, found_drift: Drift | None = None) -> dict[str, Any]:
    """The `crv status --json` contract: add fields, never rename them."""
    return {
        "name": found["name"],
        "appliance": found["appliance"],
        "ready": found["ready"],
        "pool": found["pool"],
        "pools": found.get("pools") or {},
        "drift": (found_drift or Drift()).to_json(),
        "nodes": [
            {
                "name": n["name"],
                "group": n["group"],
                "pool": n["pool"],
                "address": n["address"],
                "state": n["state"],
                "roles": {r: v["state"] for r, v in n["roles"].items()},
                "timings": n.get("timings") or {},
            }
            for n in found["nodes"]
        ],
    }


@app.command()
def destroy(
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    pool: Annotated[
        str | None, typer.Option("--pool", "-p", help="Pool (default: the cluster's).")
    ] = None,
    wait: Wait = None,
) -> None:
    """Remove every node of a cluster and revoke all its certificates."""
    home = cli_home()
    with user_errors():
        endpoints = ensure_up(home)
        found = Service(home, endpoints.service_url).status(name)
        pool_name = pool or (found["pool"] if found else "local")
        for used in pools_of(found, pool_name):  # every pool its nodes are in
            get_pool(used, home.pool_dir(used))
    from flows.destroy import destroy_cluster

    state = asyncio.run(
        cast(
            "Coroutine[Any, Any, State[dict[str, Any]]]",
            destroy_cluster(name, pool_name, wait=wait, return_state=True),
        )
    )
    if not state.is_completed():
        print(f"error: destroy of {name} failed: {common.reason(state)}", file=sys.stderr)
        raise typer.Exit(1)
    result = state.result()
    print(
        f"destroyed {name}: {result['destroyed']} nodes removed, "
        f"{result['revoked']} certificates revoked"
    )


@app.command()
def repair(
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what the pools and the records disagree on.")
    ] = False,
    retries: Annotated[int, typer.Option(help="Retries per step (temporary errors).")] = 2,
    boot_timeout: Annotated[float, typer.Option(help="Seconds for a node to enrol.")] = 300.0,
    wait: Wait = None,
) -> None:
    """Converge a cluster whose pools drifted from crv's records: destroy the nodes its pools
    hold for it that crv does not know (after saying so), make again the nodes missing from
    their pools through every step, and re-run the roles that read them."""
    home = cli_home()
    with user_errors():
        endpoints = ensure_up(home)
        found = Service(home, endpoints.service_url).status(name)
        if found is None:
            raise SpecError("cluster", name, "no such cluster (see `crv list`)")
        found_drift = drift(found, Drivers(home))
        liveness = Service(home, endpoints.service_url).call(
            "GET", f"/v1/admin/clusters/{name}/liveness"
        )["nodes"]
        missing = {n["name"] for n in found_drift.missing}
        ended = [
            n
            for n in lapsed(found, liveness, datetime.now(timezone.utc))
            if n["name"] not in missing
        ]
        counts = dict(found.get("counts") or {})
        plan = expand(load_recorded(found["source"], found["parameters"] or {}, counts), name)
    for n in found_drift.orphans:
        print(f"destroying {n['name']} in pool {n['pool']}: tagged for {name}, not in its records")
    for n in found_drift.missing:
        print(f"making {n['name']} again in pool {n['pool']}: missing ({n['state']})")
    for n in ended:
        print(
            f"making {n['name']} again in pool {n['pool']}: its certificate ended at "
            f"{n['ended']} and it did not re-join"
        )
    for pool, why in found_drift.unreachable.items():
        print(f"error: pool {pool} could not be asked: {why}", file=sys.stderr)
    if found_drift.unreachable:
        raise typer.Exit(1)
    if not found_drift and not ended:
        print(f"no drift: the pools hold what crv recorded for {name}")
    if dry_run:
        return
    from flows.repair import repair_cluster

    run = repair_cluster(
        name=name, boot_timeout=boot_timeout, retries=retries, wait=wait, return_state=True
    )
    state = _run_with_progress(run, endpoints, f"repairing {name}", plan)
    _report(state, "repair", home, endpoints, plan)


@app.command("list")
def list_clusters(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the clusters this crv home knows."""
    home = cli_home()
    with user_errors():
        endpoints = ensure_up(home, quiet=as_json)
        clusters = Service(home, endpoints.service_url).clusters()
    if as_json:
        sys.stdout.write(json.dumps({"clusters": clusters}) + "\n")
        return
    table = Table()
    for column in ("name", "appliance", "pool", "nodes", "ready"):
        table.add_column(column)
    for c in clusters:
        table.add_row(c["name"], c["appliance"], c["pool"], str(c["nodes"]), str(c["ready"]))
    console.print(table)


def _version(value: bool) -> None:
    if value:
        print(f"crv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """crv: virtual cluster appliances, deployed as Prefect flows."""


pools_app = typer.Typer(
    no_args_is_help=True,
    help="The resource pools: built in (local, sim) and configured in pools.yaml.",
)
app.add_typer(pools_app, name="pools")


@pools_app.command("list")
def pools_list() -> None:
    """List the pools a deploy may name, with their driver and where they are configured."""
    from pools import config

    home = cli_home()
    with user_errors():
        found = config.load(config.config_file(home.root))
    table = Table("pool", "driver", "configured in", "description", box=None)
    for p in found.values():
        table.add_row(p.name, p.driver, p.source, p.description)
    console.print(table)


@pools_app.command("check")
def pools_check(
    name: Annotated[str, typer.Argument(help="Pool name.")],
    connect: Annotated[
        bool,
        typer.Option("--connect", help="Also make one read-only call: list the pool's crv nodes."),
    ] = False,
) -> None:
    """Check a pool's configuration without side effects (no network call unless --connect).
    Exit 2: the configuration is wrong; exit 1: --connect could not reach the pool."""
    home = cli_home()
    with user_errors():
        pool = get_pool(name, home.pool_dir(name))
    print(f"ok: pool {name}: configuration valid")
    if connect:
        try:
            nodes = pool.list_nodes()
        except CrvError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(1 if exc.temporary else EXIT_BAD_INPUT) from None
        clusters = sorted({n.cluster for n in nodes})
        print(f"ok: pool {name}: reachable; {len(nodes)} crv nodes" + (
            f" of {len(clusters)} clusters ({', '.join(clusters)})" if clusters else ""
        ))  # fmt: skip


from crv_cli.approval import register as register_approval_commands  # noqa: E402
from crv_cli.autoscale import autoscale_app  # noqa: E402  (these use the helpers above)
from crv_cli.baremetal import baremetal_app, pxe_app  # noqa: E402
from crv_cli.image import image_app  # noqa: E402
from crv_cli.lab import lab_app  # noqa: E402
from crv_cli.worker import register as register_worker_commands  # noqa: E402

app.add_typer(autoscale_app, name="autoscale")
app.add_typer(baremetal_app, name="baremetal")
app.add_typer(pxe_app, name="pxe")
app.add_typer(lab_app, name="lab")
app.add_typer(image_app, name="image")
register_worker_commands(app)  # crv worker-config, crv worker (Prefect workers elsewhere)
register_approval_commands(app)  # crv approve, crv reject (flows.approval)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        _stopped(signal.SIGINT)
    except Exception as exc:
        message = _prefect_failure(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except Stopped as exc:
        _stopped(exc.signum)
    except BaseException as exc:  # Prefect turns SIGTERM into TerminationSignal in a flow
        if type(exc).__name__ != "TerminationSignal":
            raise
        _stopped(int(getattr(exc, "signal", signal.SIGTERM)))


class Stopped(BaseException):
    """Ctrl-C during a flow run, carried past click to `main`."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)


def _stopped(signum: int) -> None:
    """Ctrl-C or a kill in the middle of a change: one line, no traceback. What the change
    made is kept (the flow run is marked crashed) and running the command again resumes."""
    name = signal.Signals(signum).name
    what = " ".join(sys.argv[1:3]) or "crv"
    print(
        f"error: `crv {what}` stopped by {name}; what it made is kept: run the same command "
        "again to resume it",
        file=sys.stderr,
    )
    sys.exit(128 + signum)


def _prefect_failure(exc: Exception) -> str | None:
    """One line for a request to the Prefect server that failed after the client's retries
    (an overloaded server answers 503 while its database is locked), None for anything else.
    A flow cut short this way is converged by running the same command again."""
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    httpx = sys.modules.get("httpx")
    if prefect_exceptions is not None and isinstance(
        exc, prefect_exceptions.PrefectHTTPStatusError
    ):
        request, response = exc.request, exc.response
        what = f"answered {response.status_code} {response.reason_phrase}"
    elif httpx is not None and isinstance(exc, httpx.TransportError):
        try:
            request = exc.request
        except RuntimeError:  # raised before a request was attached
            request = None
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
        in_time = " in time" if isinstance(exc, httpx.TimeoutException) else ""
        what = f"did not answer{in_time} ({detail})"
    else:
        return None
    to = f" to {request.method} {request.url}" if request is not None else ""
    log = Home.from_env().prefect_dir / "prefect.log"
    return f"the Prefect server {what}{to}; run the command again once it is back; its log: {log}"
