"""Resize the web farm on the local pool: 3 -> 20 web nodes, then back to 3, through the CLI.

Everything is real (`crv up` under a temporary CRV_HOME, the service, the Prefect server, the
local pool and the agents running the catalog's recipes). Prints how long each `crv scale`
took and how many of the nodes that existed before it were touched (their role released
again, i.e. their recipe ran again): growing should touch only the load balancer.

    python -m benchmarks.bench_resize [--to 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import exit_on_sigterm
from crv.base.home import Home
from crv.service.client import Service
from crv_cli import daemons

REPO = Path(__file__).resolve().parent.parent


def crv(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    """Run the crv CLI in `env`; its output, or the benchmark ends naming the command."""
    r = subprocess.run(
        [sys.executable, "-m", "crv_cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise SystemExit(f"crv {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def timed(env: dict[str, str], *args: str) -> float:
    """Seconds a crv command took."""
    started = time.monotonic()
    crv(env, *args, timeout=900)
    return time.monotonic() - started


def releases(service: Service, cluster: str) -> dict[str, dict[str, Any]]:
    status = service.status(cluster) or {"nodes": []}
    return {
        n["name"]: {role: r["release"] for role, r in n["roles"].items()} for n in status["nodes"]
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_resize")
    parser.add_argument("--from", dest="start", type=int, default=3)
    parser.add_argument("--to", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="resize 1 -> 2 -> 1 (CI)")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.start, args.to = 1, 2
    root = Path(tempfile.mkdtemp(prefix="crv-bench-resize-"))
    env = {**os.environ, "CRV_HOME": str(root)}
    home = Home(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"crv resize benchmark: web farm on the local pool, {os.cpu_count()} CPUs")
    try:
        crv(env, "up", timeout=900)
        endpoints = daemons.running(home)
        assert endpoints is not None
        service = Service(home, endpoints.service_url)
        took = timed(env, "deploy", "webfarm", "--name", "rs", "--set", f"workers={args.start}",
                     "--set", f"port={port}")  # fmt: skip
        print(f"  deploy {args.start} web nodes: {took:.1f} s")
        for target in (args.to, args.start):
            before = releases(service, "rs")
            took = timed(env, "scale", "rs", "worker", str(target))
            after = releases(service, "rs")
            kept = [n for n in before if n in after]
            touched = sorted(n for n in kept if after[n] != before[n])
            print(
                f"resize {len(before) - 1:>3} -> {target:>3} web nodes: {took:5.1f} s (the whole "
                f"`crv scale` command), {len(touched)} of {len(kept)} existing nodes touched "
                f"({', '.join(touched) or 'none'})"
            )
    finally:
        subprocess.run([sys.executable, "-m", "crv_cli", "destroy", "rs"], env=env, cwd=REPO,
                       capture_output=True, timeout=300)  # fmt: skip
        daemons.down(home)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
