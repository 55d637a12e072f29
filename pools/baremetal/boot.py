"""Network boot for the bare-metal pool: per-machine iPXE scripts and the service that serves
them (TFTP for the boot loader, HTTP for the scripts and the boot artefacts).

The chain a machine follows (`docs/pools.md`, "Bare metal"):

1. its firmware PXE-boots; DHCP (the site's own, with dnsmasq as proxy-DHCP: `crv pxe
   dnsmasq-config`) names this service's TFTP server and the boot loader (iPXE);
2. iPXE asks DHCP again and is told to chain `http://<boot>/ipxe/${mac:hexhyp}`;
3. that script - rendered by the pool from `pools/templates/ipxe-boot.ipxe.j2`, strictly -
   loads the kernel and initrd from the pool's configured URLs with a command line carrying
   the service URL, the CA's fingerprint, the node's one-time token and a call-back URL;
4. the booted OS runs `crv-agent run --cmdline /proc/cmdline`: it fetches the CA, checks the
   fingerprint, enrols with the token and then calls back, which ends the provisioning: the
   script is deleted, so the token is never served again.

The files under `<state_dir>/boot/` are the only interface between the pool (which writes a
machine's script when it powers it on) and the service (which reads them): the service holds
no BMC credential and needs no database. A script exists only while its machine is being
provisioned; anything else asked for by MAC is a 404.
"""

from __future__ import annotations

import hmac
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from starlette.requests import Request  # at module level: FastAPI resolves the annotation

from pools.base import PoolError, write_atomic
from pools.templates import render

SCRIPT_TEMPLATE = "ipxe-boot.ipxe.j2"
DNSMASQ_TEMPLATE = "dnsmasq-proxy.conf.j2"
# A word of an iPXE command: no whitespace, no `$` (iPXE expands ${...} settings), no `#`
# (a comment) and no quotes - whatever a value holds, it stays one inert word.
_WORD = re.compile(r"^[A-Za-z0-9._~:/?@!&()*+,;=%-]{1,1024}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAC_HYPHENS = re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DHCP_HOST = _ADDRESS = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")


def url_mac(mac: str) -> str:
    """52:54:00:12:34:56 -> 52-54-00-12-34-56, as iPXE's ${mac:hexhyp} spells it in a URL."""
    return mac.lower().replace(":", "-")


def render_script(
    pool: str,
    *,
    machine: str,
    node: str,
    cluster: str,
    kernel: str,
    initrd: str,
    cmdline: Sequence[str],
) -> str:
    """The iPXE script; every value is checked to be one inert word first (a name or URL that
    could break out of its place in the script is refused, never escaped)."""
    for label, value in (("machine", machine), ("node", node), ("cluster", cluster)):
        if not _NAME.fullmatch(value):
            raise PoolError(pool, f"{label} name {value!r} cannot go into a boot script")
    for label, value in (
        ("kernel", kernel),
        ("initrd", initrd),
        *(("cmdline", w) for w in cmdline),
    ):
        if not _WORD.fullmatch(value):
            raise PoolError(pool, f"boot script: {label} word {value!r} has unsafe characters")
    return render(
        SCRIPT_TEMPLATE,
        machine=machine,
        node=node,
        cluster=cluster,
        kernel=kernel,
        initrd=initrd,
        cmdline=list(cmdline),
    )


class BootFiles:
    """`<state_dir>/boot/<machine>/` (script.ipxe, nonce, booted) and `by-mac/<mac>` links."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "boot"

    def _dir(self, machine: str) -> Path:
        if not _NAME.fullmatch(machine):
            raise ValueError(f"bad machine name {machine!r}")
        return self.root / machine

    def write(
        self,
        machine: str,
        macs: Sequence[str],
        script: str,
        nonce: str,
        address: str | None = None,
    ) -> None:
        """The script every NIC of the machine will be served, and the nonce its call-back
        must carry; anything from an earlier boot (a call-back, its timings) is cleared first.
        `address`, the one DHCP gives the machine, lets the service tell whose the requests
        for boot files are (`by-addr/`)."""
        directory = self._dir(machine)
        (self.root / "by-mac").mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        (directory / "booted").unlink(missing_ok=True)
        (directory / "events").unlink(missing_ok=True)
        write_atomic(directory / "nonce", nonce.encode(), 0o600)
        write_atomic(directory / "script.ipxe", script.encode(), 0o600)
        links = [self.root / "by-mac" / url_mac(mac) for mac in macs]
        if address and _ADDRESS.fullmatch(address):
            (self.root / "by-addr").mkdir(mode=0o700, exist_ok=True)
            links.append(self.root / "by-addr" / address)
        for link in links:
            with suppress(FileNotFoundError):
                if os.readlink(link) == f"../{machine}":
                    continue
                link.unlink()
            os.symlink(f"../{machine}", link)

    def remove(self, machine: str, macs: Sequence[str], address: str | None = None) -> None:
        for mac in macs:
            (self.root / "by-mac" / url_mac(mac)).unlink(missing_ok=True)
        if address and _ADDRESS.fullmatch(address):
            (self.root / "by-addr" / address).unlink(missing_ok=True)
        shutil.rmtree(self._dir(machine), ignore_errors=True)

    def record(self, machine: str, event: str, when: float | None = None) -> None:
        """One line `EVENT TIME` in the machine's `events`, while it is being provisioned (its
        directory exists): what the boot service saw of its boot, for the timings."""
        directory = self._dir(machine)
        if not directory.is_dir() or event in self.events(machine):
            return  # only the first time counts: a machine asking again grows nothing
        with suppress(OSError):
            fd = os.open(directory / "events", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{event} {time.time() if when is None else when:.3f}\n".encode())
            finally:
                os.close(fd)

    def events(self, machine: str) -> dict[str, float]:
        """The first time of each event of the machine's current boot."""
        found: dict[str, float] = {}
        try:
            text = (self._dir(machine) / "events").read_text()
        except OSError:
            return found
        for line in text.splitlines():
            event, _, when = line.partition(" ")
            with suppress(ValueError):
                found.setdefault(event, float(when))
        return found

    def machine_at(self, kind: str, key: str) -> str | None:
        """The machine a MAC (`by-mac`, hyphens) or an address (`by-addr`) belongs to while it
        is being provisioned."""
        pattern = _MAC_HYPHENS if kind == "by-mac" else _ADDRESS
        if not pattern.fullmatch(key):
            return None
        try:
            target = os.readlink(self.root / kind / key)
        except OSError:
            return None
        name = target.removeprefix("../")
        return name if _NAME.fullmatch(name) else None

    def booted(self, machine: str, nonce: str) -> bool:
        """Whether the OS on the machine called back for this boot (this nonce)."""
        try:
            seen = (self._dir(machine) / "booted").read_text()
        except OSError:
            return False
        return bool(nonce) and hmac.compare_digest(seen, nonce)

    # -- what the boot service does --------------------------------------------------------

    def script_for(self, mac: str) -> bytes | None:
        if not _MAC_HYPHENS.fullmatch(mac):
            return None
        try:
            return (self.root / "by-mac" / mac / "script.ipxe").read_bytes()
        except OSError:
            return None

    def call_back(self, machine: str, nonce: str) -> bool:
        """The OS of `machine` enrolled: its script goes (the token in it is spent), and the
        pool will see `booted`. A wrong nonce changes nothing."""
        if not _NAME.fullmatch(machine):
            return False
        directory = self._dir(machine)
        try:
            expected = (directory / "nonce").read_text()
        except OSError:
            return False
        if not nonce or not hmac.compare_digest(expected, nonce):
            return False
        (directory / "script.ipxe").unlink(missing_ok=True)
        write_atomic(directory / "booted", nonce.encode(), 0o600)
        self.record(machine, "callback")
        return True


# -- the boot service ----------------------------------------------------------------------------


def split_listen(pool: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise PoolError(pool, f"listen address {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def make_app(files: BootFiles, artefacts: Path | None) -> Any:
    """The HTTP side: scripts by MAC, call-backs, and (optionally) the artefacts directory.
    What it serves to a machine being provisioned is recorded in its events (script, each
    file once sent in full, the call-back): the timings of `crv status --timings`."""
    from fastapi import FastAPI, Response
    from starlette.background import BackgroundTask

    app = FastAPI(title="crv boot service", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ipxe/{mac}")
    def script(mac: str) -> Response:
        mac = mac.lower()
        data = files.script_for(mac)
        if data is None:
            return Response("#!ipxe\necho crv: no boot script for this machine\nexit 1\n", 404)
        machine = files.machine_at("by-mac", mac)
        if machine is not None:
            files.record(machine, "script")
        return Response(data, media_type="text/plain", headers={"Cache-Control": "no-store"})

    @app.post("/callback/{machine}/{nonce}")
    def call_back(machine: str, nonce: str) -> Response:
        return Response(status_code=204 if files.call_back(machine, nonce) else 404)

    @app.get("/files/{name}")
    def artefact(name: str, request: Request) -> Response:
        if artefacts is None or not _FILE.fullmatch(name) or not (artefacts / name).is_file():
            return Response(status_code=404)
        from fastapi.responses import FileResponse

        peer = request.client.host if request.client else ""
        machine = files.machine_at("by-addr", peer)
        done = None if machine is None else BackgroundTask(files.record, machine, f"file:{name}")
        return FileResponse(artefacts / name, background=done)  # the task runs once sent

    return app


def serve(
    pool: str,
    state_dir: Path,
    *,
    http_listen: str,
    tftp_listen: str | None,
    tftp_root: Path | None,
    artefacts: Path | None,
    ready: threading.Event | None = None,
    http_netns: str | None = None,
) -> None:
    """Run the boot service until SIGTERM/SIGINT: TFTP in a thread (tftpy, downloads only),
    HTTP in the foreground (FastAPI on uvicorn); with `http_netns` the HTTP side listens inside
    that network namespace (the lab's: its machines reach only addresses in there)."""
    import tftpy
    import uvicorn

    files = BootFiles(state_dir)
    tftp = None
    if tftp_listen and tftp_root is not None:
        host, port = split_listen(pool, tftp_listen)
        # upload_open refusing everything: tftpy writes uploads into its root otherwise
        tftp = tftpy.TftpServer(str(tftp_root), upload_open=lambda path, context: None)
        threading.Thread(target=tftp.listen, args=(host, port), daemon=True).start()
    host, port = split_listen(pool, http_listen)
    config = uvicorn.Config(
        make_app(files, artefacts), host=host, port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    sockets = None
    if http_netns:
        from crv.base.netns import listen_in, netns_path

        try:
            sockets = [listen_in(netns_path(http_netns), host, port)]
        except OSError as exc:
            raise PoolError(pool, f"boot service: {exc}") from None
    if ready is not None:
        threading.Thread(target=_signal_when_started, args=(server, ready), daemon=True).start()
    try:
        server.run(sockets=sockets)
    finally:
        if tftp is not None:
            tftp.stop(now=True)


def _signal_when_started(server: Any, ready: threading.Event) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    ready.set()


def dnsmasq_config(pool: Any, *, network: str, interface: str | None, dhcp: bool = False) -> str:
    """A dnsmasq configuration adding PXE/iPXE boot to an existing DHCP network as a proxy
    (the site's DHCP server keeps handing out addresses; dnsmasq adds only the boot part), or,
    with `dhcp`, for a dnsmasq that is the network's DHCP server: each machine of the pool's
    machines file gets its reserved address by MAC (`dhcp-host`) and the boot part with it."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        ipaddress.ip_address(network)
    except ValueError:
        raise PoolError(pool.name, f"--network {network!r} is not an IP address") from None
    if interface is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", interface):
        raise PoolError(pool.name, f"--interface {interface!r} is not an interface name")
    http = pool.http_url
    tftp_host = urlsplit(http).hostname
    if pool.options.tftp_listen:
        host, port = split_listen(pool.name, pool.options.tftp_listen)
        if host not in ("0.0.0.0", "::"):
            tftp_host = host
        if port != 69:
            raise PoolError(
                pool.name, f"PXE firmware asks TFTP on port 69; tftp_listen uses {port}"
            )
    hosts = None
    if dhcp:
        hosts = []
        for machine in pool.machines().values():
            if not machine.address or not _DHCP_HOST.fullmatch(machine.address):
                raise PoolError(
                    pool.name, f"--dhcp: machine {machine.name} has no IP address to reserve"
                )
            # one line per machine, every NIC on it: dnsmasq refuses an address given twice
            hosts.append((",".join(machine.macs), machine.address, machine.name))
    return render(
        DNSMASQ_TEMPLATE,
        pool_repr=repr(pool.name),
        hosts=hosts,
        interface=interface,
        network=network,
        tftp_host=tftp_host,
        boot_file=pool.options.boot_file,
        efi_boot_file=pool.options.efi_boot_file,
        http=http,
    )
