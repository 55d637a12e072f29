"""`crv image build | list`: crv's own guest images (lab/images.py, docs/lab.md)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.markup import escape

from crv_cli import common

image_app = typer.Typer(
    no_args_is_help=True, help="Guest images crv builds from Debian's mirror (mmdebstrap)."
)
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


@image_app.command("build")
def image_build(
    appliances: Annotated[
        list[str] | None,
        typer.Argument(help="Appliance directories whose image.packages go in (their union)."),
    ] = None,
    package: Annotated[
        list[str] | None, typer.Option("--package", help="One more Debian package (repeatable).")
    ] = None,
    mirror: Annotated[
        str | None, typer.Option(help="The Debian mirror (default: the one the host's apt uses).")
    ] = None,
    ramdisk: Annotated[
        bool, typer.Option("--ramdisk/--no-ramdisk", help="Also the PXE ramdisk.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Build (or find in the cache) a Debian 12 image with cloud-init, python3, a kernel, and
    the packages the appliances' recipes need."""
    from crv.appliance.loader import load_appliance
    from lab import images

    home = common.home()
    with common.user_errors():
        loaded = [load_appliance(a) for a in appliances or []]
        wanted = images.packages_of(loaded, package or [])

        def progress(line: str) -> None:
            if not as_json:
                common.err_console.print(f"[bold]image:[/bold] {escape(line)}", soft_wrap=True)

        manifest = images.build(home, wanted, mirror=mirror, ramdisk=ramdisk, progress=progress)
    data = json.loads((manifest.dir / "image.json").read_text())
    if as_json:
        print(json.dumps({**data, "dir": str(manifest.dir)}))
        return
    print(f"image {manifest.key[:16]}: {manifest.dir}")
    print(f"  manifest: {manifest.dir / 'image.json'}")
    print(f"  disk sha256: {manifest.files['disk'].sha256}")
    print(f"  use it: crv lab up --image {manifest.key[:16]}")


@image_app.command("list")
def image_list(as_json: JsonOption = False) -> None:
    """The images in the cache, newest first: key, size, when built, packages beyond the base."""
    from lab import images

    found = images.cached(common.home())
    if as_json:
        print(json.dumps([
            {"key": m.key, "dir": str(m.dir), "packages": m.packages, "built_at": m.built_at,
             "size": sum(f.size for f in m.files.values())}
            for m in found
        ]))  # fmt: skip
        return
    if not found:
        print("no images (crv image build makes one)", file=sys.stderr)
    for m in found:
        size = sum(f.size for f in m.files.values()) / (1 << 20)
        extra = [p for p in m.packages if p not in images.BASE_PACKAGES]
        print(f"{m.key[:16]}  {size:6.0f} MiB  {m.built_at or '?':25}  "
              f"{' '.join(extra) or '(base only)'}  {m.dir}")  # fmt: skip
