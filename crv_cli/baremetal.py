"""`crv baremetal ...` and `crv pxe ...`: the machines of bare-metal pools and their boot service.

Credentials are never printed: `check` shows the BMC's address, user and cipher suite, and an
error names the credential's reference (`file ...`, `environment variable ...`), not its value.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from crv.base.errors import CrvError, SpecError
from crv.base.home import Home
from crv_cli import common, daemons

if TYPE_CHECKING:
    from pools.baremetal.pool import BaremetalPool

baremetal_app = typer.Typer(
    no_args_is_help=True, help="Bare-metal pools: their machines, BMCs and a simulated rack."
)
pxe_app = typer.Typer(no_args_is_help=True, help="Network boot (PXE/iPXE) for bare-metal pools.")

PoolOption = Annotated[
    str | None,
    typer.Option("--pool", "-p", help="The bare-metal pool (default: the only one configured)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _pool(home: Home, name: str | None) -> BaremetalPool:
    from pools import config, get_pool
    from pools.baremetal.pool import BaremetalPool

    found = config.load(config.config_file(home.root))
    bare = [p.name for p in found.values() if p.driver == "baremetal"]
    if name is None:
        if len(bare) != 1:
            which = f"they are: {', '.join(bare)}" if bare else "none is configured in pools.yaml"
            raise SpecError("--pool", "", f"name the bare-metal pool; {which}")
        name = bare[0]
    if name not in bare:
        known = ", ".join(bare) or "none"
        raise SpecError("--pool", name, f"not a bare-metal pool (bare-metal pools: {known})")
    pool = get_pool(name, home.pool_dir(name))
    assert isinstance(pool, BaremetalPool)
    return pool


@baremetal_app.command("list")
def baremetal_list(pool: PoolOption = None, as_json: JsonOption = False) -> None:
    """The machines of a bare-metal pool: class, addresses, and free, leased or failed."""
    home = common.home()
    with common.user_errors():
        bm = _pool(home, pool)
        machines = bm.machines()
        ledger = bm.leases.read()
    rows = []
    for m in machines.values():
        lease = ledger.holder(m.name)
        lease_state = lease.state if lease else None
        if lease and lease.state == "booting" and bm.files.booted(lease.machine, lease.nonce):
            lease_state = "up"  # it called back; the ledger learns it on the pool's next look
        row: dict[str, Any] = {
            "machine": m.name,
            "class": m.machine_class,
            "labels": dict(m.labels),
            "macs": list(m.macs),
            "address": m.address,
            "bmc": f"{m.bmc.address}:{m.bmc.port}",
            "state": ledger.state_of(m.name),
            "node": lease.node if lease else None,
            "cluster": lease.cluster if lease else None,
            "lease": lease_state,
            "ipmi_commands": ledger.commands.get(m.name, 0),
        }
        if m.name in ledger.failed:
            row["failure"] = ledger.failed[m.name].get("reason")
        rows.append(row)
    if as_json:
        sys.stdout.write(json.dumps({"pool": bm.name, "machines": rows}) + "\n")
        return
    table = Table("machine", "class", "address", "bmc", "state", "node", "detail", box=None)
    for r in rows:
        detail = r.get("failure") or (f"{r['cluster']}, {r['lease']}" if r["node"] else "")
        table.add_row(
            r["machine"], r["class"], r["address"] or "-", r["bmc"], r["state"],
            r["node"] or "-", detail,
        )  # fmt: skip
    common.console.print(table)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("free", "leased", "failed")}
    print(
        f"pool {bm.name}: {len(rows)} machines, " + ", ".join(f"{v} {k}" for k, v in counts.items())
    )


@baremetal_app.command("check")
def baremetal_check(
    name: Annotated[str | None, typer.Argument(help="One machine (default: all).")] = None,
    pool: PoolOption = None,
    as_json: JsonOption = False,
) -> None:
    """Read each machine's power state through its BMC (a presence ping, then an IPMI 2.0
    session). Exit 1 if a BMC could not be read; credentials are never printed."""
    home = common.home()
    with common.user_errors():
        bm = _pool(home, pool)
        machines = bm.machines()
        if name is not None and name not in machines:
            raise SpecError("machine", name, f"not in {bm.options.machines}")
    chosen = [machines[name]] if name else list(machines.values())
    results = []
    for m in chosen:
        entry: dict[str, Any] = {
            "machine": m.name,
            "bmc": f"{m.bmc.address}:{m.bmc.port}",
            "user": m.bmc.username,
            "cipher_suite": m.bmc.cipher_suite,
        }
        try:
            bmc = bm.bmc(m)  # the password read once
            bm.power.ping(m.name, bmc)
            entry["power"] = bm.power.state(m.name, bmc)
        except CrvError as exc:
            entry["error"] = str(exc)
        results.append(entry)
    if as_json:
        sys.stdout.write(json.dumps({"pool": bm.name, "machines": results}) + "\n")
    else:
        for e in results:
            where = f"BMC {e['bmc']}, user {e['user']}, cipher suite {e['cipher_suite']}"
            said = f"power {e['power']}" if "power" in e else f"error: {e['error']}"
            print(f"{e['machine']}: {said} ({where})")
    if any("error" in e for e in results):
        raise typer.Exit(1)


@baremetal_app.command("clear")
def baremetal_clear(
    name: Annotated[str, typer.Argument(help="The failed machine.")],
    pool: PoolOption = None,
) -> None:
    """Return a machine written off as failed to the free set, once fixed (powers it off)."""
    home = common.home()
    with common.user_errors():
        bm = _pool(home, pool)
        bm.clear(name)
    print(f"machine {name} is free again (powered off)")


@baremetal_app.command("simulate-rack")
def simulate_rack(
    machines: Annotated[int, typer.Argument(min=1, max=200, help="How many machines.")] = 6,
    pool: Annotated[str, typer.Option("--pool", "-p", help="The pool's name.")] = "rack",
    class_of: Annotated[
        list[str] | None,
        typer.Option(
            "--class-of",
            metavar="CLASS=COUNT",
            help="Give COUNT machines the hardware class CLASS (repeatable; the rest: std).",
        ),
    ] = None,
    boot_timeout: Annotated[
        float, typer.Option(help="Seconds a machine has to boot and call back.")
    ] = 60.0,
    stop: Annotated[bool, typer.Option("--stop", help="Power off and stop the rack.")] = False,
) -> None:
    """Start a simulated rack: one ipmi_sim BMC (real IPMI 2.0 on 127.0.0.x UDP) per machine,
    machines that network-boot through the pool's boot service, and the pool in pools.yaml."""
    from pools.baremetal import simrack

    home = common.home()
    with common.user_errors():
        if stop:
            stopped = simrack.stop(home, pool)
            print(f"rack {pool}: {stopped} BMCs stopped, every machine powered off")
            return
        counts: dict[str, int] = {}
        for item in class_of or []:
            klass, sep, count = item.partition("=")
            if not sep or not count.isdigit():
                raise SpecError("--class-of", item, "expected CLASS=COUNT")
            counts[klass] = int(count)
        rack = simrack.create(
            home, pool, machines=machines, classes=counts, boot_timeout=boot_timeout
        )
        started = daemons.ensure_boot_services(home)
    for line in rack.describe():
        print(line)
    if pool in started:
        print(f"boot service of {pool}: {rack.http_url} (started)")
    print(f"deploy on it:  crv deploy appliances/webfarm --pool {pool}")
    print(f"its machines:  crv baremetal list --pool {pool}")
    print(f"stop it:       crv baremetal simulate-rack --stop --pool {pool}")


@pxe_app.command("dnsmasq-config")
def dnsmasq_config(
    pool: PoolOption = None,
    network: Annotated[
        str,
        typer.Option(
            "--network", help="The existing DHCP network's address (proxy-DHCP answers there)."
        ),
    ] = "10.0.0.0",
    interface: Annotated[
        str | None, typer.Option("--interface", help="Listen on this interface only.")
    ] = None,
) -> None:
    """Print a dnsmasq configuration that adds PXE/iPXE boot to an existing DHCP network as a
    proxy: the site's DHCP server keeps handing out addresses; dnsmasq only names the boot
    loader (crv's TFTP) and, to iPXE, the boot script URL on crv's boot service."""
    from pools.baremetal.boot import dnsmasq_config as render

    home = common.home()
    with common.user_errors():
        bm = _pool(home, pool)
        text = render(bm, network=network, interface=interface)
    sys.stdout.write(text)


@pxe_app.command("serve")
def pxe_serve(pool: PoolOption = None) -> None:
    """Run a bare-metal pool's boot service in the foreground (`crv up` runs it in the
    background for every bare-metal pool)."""
    home = common.home()
    with common.user_errors():
        bm = _pool(home, pool)
    print(f"boot service of {bm.name}: {bm.http_url}/ipxe/<mac> (Ctrl-C stops it)")
    bm.serve_boot()
