"""A simulated machine of the simulated rack: what its firmware, iPXE and OS would do.

Its BMC (an `ipmi_sim`, pools/baremetal/simbmc.py) starts this program when the machine is
powered on and kills its whole process tree when it is powered off. It follows the real boot
chain over the network, with real clients:

1. firmware: `booted-from` says PXE (the BMC's next-boot flag) - otherwise there is no disk
   to boot, and the machine sits idle like a real one at "no bootable device";
2. PXE: the boot loader is fetched with a TFTP client (tftpy) from the server that DHCP would
   name (`machine.json` stands in for DHCP/proxy-DHCP, which a loopback rack cannot run);
3. iPXE: the script is fetched over HTTP by MAC (`/ipxe/52-54-00-..`); its `kernel` and
   `initrd` lines are followed, and both are downloaded;
4. the OS: the initrd of the simulated rack is a tar archive holding `crv-agent`, which runs
   with `--cmdline` pointing at the kernel command line from the script - as on a real
   machine, where it reads /proc/cmdline. The agent's node address is the machine's.

Everything it prints goes to the machine's console log (`console.log`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tarfile
import time
from pathlib import Path

NODE_ENV = ("PATH", "LANG", "LC_ALL", "TZ")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def idle(reason: str) -> int:
    """A powered-on machine with nothing to run: it waits for the BMC to power it off."""
    say(reason)
    while True:
        time.sleep(3600)


def get(url: str, source: str | None) -> bytes:
    """An HTTP GET from the machine's own address (as a real NIC's: the boot service tells
    machines apart by it)."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    bind = (source, 0) if source else None
    conn = http.client.HTTPConnection(
        parts.hostname or "", parts.port or 80, timeout=10, source_address=bind
    )
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    if answer.status != 200:
        raise OSError(f"HTTP {answer.status} for {url}")
    return data


def fetch(url: str, dest: Path, source: str | None = None) -> None:
    dest.write_bytes(get(url, source))


def parse_script(text: str) -> tuple[str, list[str], str]:
    """(kernel URL, kernel arguments, initrd URL) of an iPXE script of the crv form."""
    lines = [ln.strip() for ln in text.splitlines()]
    if not lines or lines[0] != "#!ipxe":
        raise ValueError("not an iPXE script (no #!ipxe line)")
    kernel, args, initrd = "", [], ""
    for line in lines[1:]:
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        command, rest, skip = words[0], [], False
        for word in words[1:]:  # options: --name NAME, --name=NAME, --autofree, ...
            if skip:
                skip = False
            elif word.startswith("--"):
                skip = word in ("--name", "-n", "--timeout")
            else:
                rest.append(word)
        if command == "kernel":
            kernel, args = rest[0], rest[1:]
        elif command == "initrd":
            initrd = rest[0]
        elif command not in ("boot", "echo"):
            raise ValueError(f"iPXE command {command!r} is not one this machine knows")
    if not kernel or not initrd:
        raise ValueError("the script loads no kernel or no initrd")
    return kernel, args, initrd


def boot(machine_dir: Path) -> int:
    conf = json.loads((machine_dir / "machine.json").read_text())
    name = conf["name"]
    try:
        device = (machine_dir / "booted-from").read_text().strip()
    except OSError:
        device = "default"
    say(f"{name}: powered on, boot device {device}")
    if device != "pxe":
        return idle(f"{name}: no bootable disk; waiting for power-off")
    os_dir = machine_dir / "os"  # a network-booted OS starts from nothing every time
    shutil.rmtree(os_dir, ignore_errors=True)
    os_dir.mkdir(mode=0o700)
    import tftpy

    host, _, port = conf["tftp"].rpartition(":")
    say(f"PXE: tftp://{conf['tftp']}/{conf['boot_file']}")
    try:
        tftpy.TftpClient(host, int(port)).download(
            conf["boot_file"], str(os_dir / "bootloader"), timeout=3, retries=3
        )
    except Exception as exc:  # a real NIC gives up and tries the next boot device
        return idle(f"PXE: TFTP failed: {exc}; no bootable device")
    mac = conf["macs"][0].replace(":", "-")
    url = conf["ipxe_url"].replace("${mac:hexhyp}", mac)
    say(f"iPXE: chain {url}")
    try:
        source = conf.get("address")
        script = get(url, source).decode()
        kernel, args, initrd = parse_script(script)
        say(f"iPXE: kernel {kernel}")
        fetch(kernel, os_dir / "vmlinuz", source)
        say(f"iPXE: initrd {initrd}")
        fetch(initrd, os_dir / "initrd", source)
        with tarfile.open(os_dir / "initrd") as archive:
            member = archive.getmember("crv-agent")
            source = archive.extractfile(member)
            assert source is not None
            (os_dir / "bin").mkdir(mode=0o700)
            (os_dir / "bin" / "crv-agent").write_bytes(source.read())
    except Exception as exc:
        return idle(f"iPXE: boot failed: {exc}")
    (os_dir / "bin" / "crv-agent").chmod(0o755)
    (os_dir / "cmdline").write_text(" ".join(args) + "\n")
    home = os_dir / "agent"
    home.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k in NODE_ENV or k.startswith("CRV_RACK_")}
    env["PATH"] = f"{os_dir / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["HOME"] = str(home)
    say(f"{name}: booted; starting crv-agent (address {conf.get('address')})")
    agent = [sys.executable, str(os_dir / "bin" / "crv-agent"), "run", "--home", str(home)]
    os.chdir(home)
    os.execve(sys.executable, [*agent, "--cmdline", str(os_dir / "cmdline")], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pools.baremetal.simmachine")
    parser.add_argument("--machine-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    return boot(args.machine_dir.resolve())


if __name__ == "__main__":
    raise SystemExit(main())
