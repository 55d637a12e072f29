"""Bare metal: where a machine's time goes, on the simulated rack and on the lab's real PXE rack.

For each rack: one machine (benchmarks/appliances/one-web: one node), then the web farm on N
machines (`--set workers=N-1`), each deployed through the CLI and destroyed. Per phase it prints
the seconds from provision (`crv status NAME --timings`: power-on, iPXE script fetched, kernel,
ramdisk, enrolled, call-back, recipes, verified; the median over the N machines), the deploy's
wall time, and the IPMI commands each machine got (the pool's ledger counts session opens,
commands and closes; deploy + destroy).

- the simulated rack (`crv baremetal simulate-rack`): ipmi_sim BMCs, machines that are Python
  programs following the boot chain on loopback;
- `--real`: the lab's rack (`crv lab rack`): qemu machines (TCG here) with iPXE firmware behind
  ipmi_sim BMCs, real DHCP (dnsmasq), a real kernel and the image's PXE ramdisk. Needs root and
  what the lab needs; the image comes from the test image cache (CRV_TEST_IMAGES).

    python -m benchmarks.bench_baremetal [--machines 3] [--real] [--smoke] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import exit_on_sigterm

REPO = Path(__file__).resolve().parent.parent
ONE = str(REPO / "benchmarks" / "appliances" / "one-web")
PHASES = ("power_on", "script", "kernel", "initrd", "enrolled", "callback", "recipes", "verified")


def crv(home: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRV_HOME": str(home)}
    env.pop("CRV_POOLS_FILE", None)
    r = subprocess.run(
        [sys.executable, "-m", "crv_cli", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout,
    )  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"crv {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r


def phases(home: Path, cluster: str) -> dict[str, float]:
    """Median seconds from provision to each phase over the cluster's nodes."""
    from crv.engine.timings import seconds_since_start

    status = json.loads(crv(home, "status", cluster, "--json").stdout)
    per: dict[str, list[float]] = {}
    for node in status["nodes"]:
        for phase, seconds in seconds_since_start(node.get("timings") or {}).items():
            per.setdefault(phase, []).append(seconds)
    return {p: statistics.median(v) for p, v in per.items()}


def run_rack(home: Path, machines: int) -> dict[str, Any]:
    """One machine, then N, on the rack pool of `home`; the figures."""
    out: dict[str, Any] = {}
    for label, args in (
        ("one", ["deploy", ONE, "--pool", "rack", "-n", "one", "--boot-timeout", "900"]),
        ("all", ["deploy", "appliances/webfarm", "--pool", "rack", "-n", "farm",
                 "--set", f"workers={machines - 1}", "--boot-timeout", "900"]),
    ):  # fmt: skip
        began = time.monotonic()
        crv(home, *args)
        out[f"{label}_deploy_s"] = time.monotonic() - began
        cluster = args[args.index("-n") + 1]
        out[f"{label}_phases"] = phases(home, cluster)
        crv(home, "destroy", cluster)
    ledger = json.loads((home / "pools/rack/leases.json").read_text())
    out["ipmi"] = dict(ledger["commands"])
    return out


def real_rack_reason() -> str:
    """Why the lab's rack cannot run here ('' when it can)."""
    if os.geteuid() != 0:
        return "not root (the lab needs network namespaces and its own libvirtd)"
    from lab.network import missing_tools

    missing = missing_tools() + [t for t in ("ipmi_sim", "mmdebstrap") if not shutil.which(t)]
    return f"missing {', '.join(missing)}" if missing else ""


def image_for_the_lab() -> Path:
    """The base image with its PXE ramdisk, from (or built into) the test image cache."""
    from crv.base.home import Home
    from lab import images

    cache = Path(os.environ.get("CRV_TEST_IMAGES", "/var/tmp/crv-test-images"))
    cache.mkdir(parents=True, exist_ok=True)
    home = Home(Path(tempfile.mkdtemp(prefix="crv-bench-img-")))
    home.root.mkdir(parents=True, exist_ok=True)
    home.images_dir.symlink_to(cache)
    return images.build(home, (), ramdisk=True, progress=lambda line: None).dir


def row(label: str, values: list[str]) -> str:
    return f"  {label:<24}" + "".join(f"{v:>14}" for v in values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_baremetal")
    parser.add_argument("--machines", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also the lab's real PXE rack")
    parser.add_argument("--keep", action="store_true", help="keep the temporary CRV_HOMEs")
    parser.add_argument("--smoke", action="store_true", help="a 2-machine simulated rack (CI)")
    args = parser.parse_args(argv if argv is not None else [])
    if args.smoke:
        args.machines, args.real = 2, False
    if shutil.which("ipmi_sim") is None:
        print("bench_baremetal: skipped, OpenIPMI's ipmi_sim is not installed")
        return
    results: dict[str, dict[str, Any]] = {}
    homes: list[Path] = []
    try:
        home = Path(tempfile.mkdtemp(prefix="crv-bench-bm-"))
        homes.append(home)
        crv(home, "baremetal", "simulate-rack", str(args.machines))
        crv(home, "up")
        results["simulated"] = run_rack(home, args.machines)
        why = real_rack_reason() if args.real else "not asked (--real)"
        if not why:
            home = Path(tempfile.mkdtemp(prefix="crv-bench-lab-"))
            homes.append(home)
            image = image_for_the_lab()
            os.environ["CRV_LAB_HARDWARE"] = str(home / "hardware")
            crv(home, "lab", "rack", str(args.machines), "--image", str(image))
            results["real"] = run_rack(home, args.machines)
    finally:
        for home in homes:
            env = {**os.environ, "CRV_HOME": str(home)}
            for cmd in (["lab", "down"], ["down"]):
                subprocess.run([sys.executable, "-m", "crv_cli", *cmd], env=env,
                               capture_output=True, cwd=REPO, timeout=300)  # fmt: skip
            if args.keep:
                print(f"  CRV_HOME kept: {home}")
            else:
                shutil.rmtree(home, ignore_errors=True)
    racks = list(results)
    n = args.machines
    print(f"bare metal: seconds from provision to each phase (one machine; median of {n})")
    header = [f"{r} 1" for r in racks] + [f"{r} {n}" for r in racks]
    print(row("phase", header))
    for phase in PHASES:
        cells = [results[r]["one_phases"].get(phase) for r in racks]
        cells += [results[r]["all_phases"].get(phase) for r in racks]
        print(row(phase, ["-" if c is None else f"{c:.1f}" for c in cells]))
    walls = [results[r]["one_deploy_s"] for r in racks] + [
        results[r]["all_deploy_s"] for r in racks
    ]
    print(row("deploy wall time", [f"{w:.1f}" for w in walls]))
    for r in racks:
        per = sorted(results[r]["ipmi"].values())
        print(f"  IPMI commands per machine ({r}, deploys + destroys): {per[0]}-{per[-1]}")
    if "real" in results:
        sim, real = results["simulated"]["all_phases"], results["real"]["all_phases"]
        if sim.get("verified") and real.get("verified"):
            ratio = real["verified"] / sim["verified"]
            print(f"  real / simulated, provision to verified ({n} machines): {ratio:.0f}x")
    else:
        print(f"  real rack: skipped, {why}")


if __name__ == "__main__":
    exit_on_sigterm()
    main(sys.argv[1:])
