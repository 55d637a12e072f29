"""Bare metal: the web farm on a simulated rack of 6 machines, through the CLI.

A temporary CRV_HOME, `crv baremetal simulate-rack 6` (ipmi_sim BMCs speaking IPMI 2.0, machines
that TFTP their boot loader, chain their iPXE script, download kernel and initrd and run the
agent), `crv up`, then `crv deploy appliances/webfarm --pool rack --set workers=5` (6 nodes) and
`crv destroy`. Prints the wall time of each, the IPMI commands sent per machine (the pool's lease
ledger counts them: session opens, commands, session closes), and the time from power-on to the
call-back as each machine's console log recorded it.

    python -m benchmarks.bench_baremetal [--machines 6] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import exit_on_sigterm

REPO = Path(__file__).resolve().parent.parent


def crv(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRV_HOME": str(home)}
    env.pop("CRV_POOLS_FILE", None)
    r = subprocess.run(
        [sys.executable, "-m", "crv_cli", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout,
    )  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"crv {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r


def timed(home: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.monotonic()
    r = crv(home, *args)
    return time.monotonic() - began, r


def boot_times(home: Path) -> list[float]:
    """Seconds from power-on to the agent's enrolment, from each machine's console log."""
    found = []
    stamp = re.compile(r"(\d\d):(\d\d):(\d\d)")
    for log in sorted((home / "racks/rack/machines").glob("*/console.log")):
        text = log.read_text()
        on = [m for m in text.splitlines() if "powered on, boot device pxe" in m]
        done = [m for m in text.splitlines() if "enrolled as" in m]
        if on and done:
            a, b = stamp.search(on[-1]), stamp.search(done[-1])
            if a and b:
                t = [int(x) * k for x, k in zip(a.groups(), (3600, 60, 1), strict=True)]
                u = [int(x) * k for x, k in zip(b.groups(), (3600, 60, 1), strict=True)]
                found.append(float(sum(u) - sum(t)))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_baremetal")
    parser.add_argument("--machines", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep the temporary CRV_HOME")
    parser.add_argument("--smoke", action="store_true", help="a 2-machine rack (CI)")
    args = parser.parse_args(argv if argv is not None else [])
    if args.smoke:
        args.machines = 2
    if shutil.which("ipmi_sim") is None:
        print("bench_baremetal: skipped, OpenIPMI's ipmi_sim is not installed")
        return
    home = Path(tempfile.mkdtemp(prefix="crv-bench-bm-"))
    try:
        rack_s, _ = timed(home, "baremetal", "simulate-rack", str(args.machines))
        up_s, _ = timed(home, "up")
        workers = str(args.machines - 1)
        deploy_s, _ = timed(
            home, "deploy", "appliances/webfarm", "--pool", "rack", "--set", f"workers={workers}"
        )
        boots = boot_times(home)
        destroy_s, _ = timed(home, "destroy", "webfarm")
        ledger = json.loads((home / "pools/rack/leases.json").read_text())
        commands = ledger["commands"]
        print(f"bare metal, {args.machines}-machine simulated rack (webfarm, workers={workers})")
        print(f"  rack start (BMCs up)        {rack_s:6.1f} s")
        print(f"  crv up                      {up_s:6.1f} s")
        print(f"  deploy, every step          {deploy_s:6.1f} s")
        if boots:
            print(f"  power-on to enrolled        {min(boots):.0f}-{max(boots):.0f} s per machine")
        print(f"  destroy (all powered off)   {destroy_s:6.1f} s")
        per = sorted(commands.values())
        print(f"  IPMI commands per machine   {per[0]}-{per[-1]} (deploy + destroy) {commands}")
    finally:
        subprocess.run(
            [sys.executable, "-m", "crv_cli", "down"],
            env={**os.environ, "CRV_HOME": str(home)}, capture_output=True, cwd=REPO, timeout=120,
        )  # fmt: skip
        if args.keep:
            print(f"  CRV_HOME kept: {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    exit_on_sigterm()
    main(sys.argv[1:])
