"""`crv lab up | down | status`: the lab for real machines (lab/control.py, docs/lab.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from crv.base.errors import SpecError
from crv_cli import common, daemons

lab_app = typer.Typer(
    no_args_is_help=True,
    help="The lab: a network namespace with real qemu guests (libvirt) for real deploys.",
)
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _image(given: str | None) -> Path | None:
    """The manifest the lab pool boots: a path to image.json or to its directory, or the key
    (or a prefix of it) of an image in the cache; None: keep the pool's, else the newest."""
    from lab.control import state
    from pools import images

    home = common.home()
    if given is None:
        if state(home) is not None:
            return None
        from lab.images import cached

        newest = cached(home)  # whole images only, newest first
        if not newest:
            raise SpecError("--image", "", "no image built yet: run `crv image build` first")
        return newest[0].dir / "image.json"
    path = Path(given)
    if path.is_dir():
        path = path / "image.json"
    if not path.is_file():
        plain_key = re.fullmatch(r"[0-9a-f]{1,64}", given) is not None
        matches = sorted((home.root / "images").glob(f"{given}*/image.json")) if plain_key else []
        if len(matches) != 1:
            why = "matches several images" if matches else "is neither a file nor a cached image"
            raise SpecError("--image", given, why)
        path = matches[0]
    try:
        images.load(path)
    except images.ImageError as exc:
        raise SpecError("--image", str(path), str(exc)) from None
    return path


@lab_app.command("up")
def lab_up(
    image: Annotated[
        str | None,
        typer.Option(
            help="The image its pool boots: image.json, its directory or its key "
            "(default: the newest `crv image build` made)."
        ),
    ] = None,
    memory: Annotated[int, typer.Option(help="MiB of memory per guest.", min=256)] = 768,
    max_nodes: Annotated[int, typer.Option(help="Guests at a time.", min=1)] = 4,
    as_json: JsonOption = False,
) -> None:
    """Make the lab (or keep it): namespace, bridge, DHCP, its own libvirtd, the `lab` pool."""
    from lab import control

    home = common.home()
    with common.user_errors():
        data = control.up(home, _image(image), memory_mb=memory, max_nodes=max_nodes)
        service = daemons.restart_service(home)  # it listens in the lab from now on
    _show(data, service, as_json)


@lab_app.command("rack")
def lab_rack(
    machines: Annotated[int, typer.Argument(help="How many machines.", min=1, max=39)] = 3,
    image: Annotated[
        str | None,
        typer.Option(
            help="The image whose kernel and PXE ramdisk they boot (default: the lab "
            "pool's, else the newest `crv image build` made)."
        ),
    ] = None,
    memory: Annotated[int, typer.Option(help="MiB of memory per machine.", min=512)] = 1536,
    boot_timeout: Annotated[
        float, typer.Option(help="Seconds from power-on to the call-back.", min=10)
    ] = 900.0,
    script_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds from power-on until iPXE must have fetched its script."),
    ] = None,
    attempts: Annotated[int, typer.Option(help="Machines tried per node.", min=1)] = 3,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the rack.")] = False,
    as_json: JsonOption = False,
) -> None:
    """A rack of N qemu machines that network-boot (iPXE) behind ipmi_sim BMCs, in the lab
    (made first if needed), as the bare-metal pool `rack` (docs/lab.md)."""
    from lab import control, rack

    home = common.home()
    with common.user_errors():
        data = control.state(home)
        if remove:
            daemons.stop_boot_service(home, rack.POOL)
            count = rack.remove(home, data) if data is not None else 0
            print(json.dumps({"removed": count}) if as_json else f"rack removed ({count} machines)")
            return
        manifest = _image(image) if image is not None or data is None else None
        if data is None or not control.alive(data):
            data = control.up(home, manifest)
            daemons.restart_service(home)
        if manifest is None:
            manifest = control.pool_image(home)
        if manifest is None:
            raise SpecError("--image", "", "the lab's pool has no image: give one")
        daemons.stop_boot_service(home, rack.POOL)
        phases = {"script": script_timeout} if script_timeout else None
        shown = rack.create(
            home, data, machines, image=manifest, memory_mb=memory, boot_timeout=boot_timeout,
            attempts=attempts, phase_timeouts=phases,
        )  # fmt: skip
        daemons.ensure_boot_services(home)
    if as_json:
        print(json.dumps(shown, sort_keys=True))
        return
    print(f"rack: {len(shown['machines'])} machines in {data['netns']}, pool {shown['pool']}")
    for m in shown["machines"]:
        print(f"  {m['name']}: {m['mac']} -> {m['address']}, BMC {m['bmc']} (IPMI 2.0), "
              f"power {m['power']}")  # fmt: skip
    print(f"  boot service: {shown['boot_service']} (inside the lab)")
    print(f"  deploy on it: crv deploy appliances/webfarm --pool {shown['pool']}")
    print(f"  watch a machine: tail -f {shown['machines'][0]['serial_log']}")


@lab_app.command("down")
def lab_down(as_json: JsonOption = False) -> None:
    """Remove the lab: its guests and volumes, daemons, namespace, pool entry and files."""
    from lab import control

    home = common.home()
    with common.user_errors():
        daemons.stop_boot_service(home, "rack")
        removed = control.down(home)
        daemons.restart_service(home)  # without its lab listener, which pinned the namespace
    if as_json:
        print(json.dumps(removed))
        return
    guests = ", ".join(removed["domains"]) or "none"
    print(f"lab removed (namespace: {removed['netns'] or 'none'}; guests: {guests})")


@lab_app.command("status")
def lab_status(as_json: JsonOption = False) -> None:
    """Whether the lab is up, and its addresses."""
    from lab import control

    home = common.home()
    data = control.state(home)
    if data is None:
        if as_json:
            print(json.dumps({"up": False}))
        else:
            print("no lab (crv lab up makes one)")
        raise typer.Exit(1)
    up = control.alive(data)
    from lab import rack

    machines = rack.describe(home, data)["machines"] if up else []
    _show({**data, "up": up, "rack": machines}, None, as_json)
    if not up:
        raise typer.Exit(1)


def _show(data: dict[str, Any], service: str | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**data, "up": data.get("up", True)}, sort_keys=True))
        return
    if not data.get("up", True):
        print(f"lab BROKEN: namespace {data['netns']}: its libvirtd, virtlogd or dnsmasq is not "
              "running (crv lab up makes it again; crv lab down removes it)")  # fmt: skip
        return
    print(
        f"lab up: namespace {data['netns']}, guests on {data['subnet']} (bridge {data['bridge']})"
    )
    print(
        f"  guests reach the crv service at {data['gateway']}"
        + (f" ({service})" if service else "")
    )
    print(f"  guests: {data.get('domain_type', 'qemu')} ({data.get('kvm', 'TCG')})")
    print(f"  libvirt: virsh -c '{data['uri']}' list --all")
    print(f"  pool: {data['pool']} (pools.yaml) - crv deploy APPLIANCE --pool {data['pool']}")
    if data.get("rack"):
        power = ", ".join(f"{m['name']} {m['power']}" for m in data["rack"])
        print(f"  rack: {len(data['rack'])} PXE machines, pool rack ({power})")
