"""Autoscaling end to end: the web farm grows under load and shrinks back to `min` when it stops.

Everything is real: `crv up` under a temporary CRV_HOME (service, Prefect server, the served
deployments), the local pool, the catalog's lb and web recipes (the lb publishes
requests_per_second every second), and the scheduled `autoscale/<cluster>` deployment. A
bounded load generator on loopback sends a fixed request rate to the load balancer. Prints:

- reaction time: from the first request of the load to the first new worker recorded (the node
  is planned and provisioned in the same change), and to it being ready (enrolled and verified);
- the schedule interval, the metric's report interval and how the group grew;
- the time from the end of the load to the group being back at `min`.

    python -m benchmarks.bench_autoscale [--every 10] [--rate 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import exit_on_sigterm
from benchmarks.bench_resize import REPO, crv

CATALOG = REPO / "appliances"

# the catalog's web farm with a fast policy: 5 requests per second per worker, workers 1-3
FAST = {
    "scale: {min: 1, max: 1000}": "scale: {min: 1, max: 3}",
    "stale_after: 2m}": "stale_after: 20s}",
    "policy: {target_per_node: 20}": "policy: {target_per_node: 5}",
    "cooldown: 2m": "cooldown: 5s",
    "scale_down_delay: 5m": "scale_down_delay: 10s",
    "max_step: 4": "max_step: 2",
}


def fast_farm(dest: Path, name: str = "asfarm") -> Path:
    """A copy of the catalog's web farm under `dest` whose worker group scales within seconds."""
    directory = dest / name
    shutil.copytree(CATALOG / "webfarm", directory)
    path = directory / "appliance.yaml"
    text = path.read_text().replace("name: webfarm", f"name: {name}", 1)
    for old, new in FAST.items():
        if old not in text:
            raise RuntimeError(f"the catalog's webfarm changed: {old!r} is not in it")
        text = text.replace(old, new)
    path.write_text(text)
    return directory


class Load:
    """GET requests to `url` at `rate` per second from one thread, for at most `limit` s."""

    def __init__(self, url: str, rate: float, limit: float = 300.0) -> None:
        self.url, self.rate, self.limit = url, rate, limit
        self.sent = 0
        self.started: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        while self.started is None:
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        self.started = time.monotonic()
        end = self.started + self.limit
        while not self._stop.is_set() and time.monotonic() < end:
            due = self.started + self.sent / self.rate
            if due > time.monotonic():
                self._stop.wait(due - time.monotonic())
                continue
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
            except OSError:
                pass
            self.sent += 1


def workers(env: dict[str, str], cluster: str) -> list[dict[str, Any]]:
    status = json.loads(crv(env, "status", cluster, "--json"))
    return [n for n in status["nodes"] if n["group"] == "worker"]


def wait_for(what: str, check: Any, timeout: float, every: float = 0.25) -> float:
    """Poll `check()` until true; the monotonic time it first was."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return time.monotonic()
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_autoscale")
    parser.add_argument("--every", type=float, default=10.0, help="schedule interval, seconds")
    parser.add_argument("--rate", type=float, default=30.0, help="requests per second")
    parser.add_argument(
        "--smoke", action="store_true", help="deploy and wait for one decision, no load (CI)"
    )
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    root = Path(tempfile.mkdtemp(prefix="crv-bench-autoscale-"))
    env = {**os.environ, "CRV_HOME": str(root / "home")}
    cluster = "asfarm"
    try:
        app = fast_farm(root)
        crv(env, "up")
        crv(
            env, "deploy", str(app), "--set", "workers=1", "--set", "rate-every=1",
            "--autoscale", "--autoscale-every", f"{args.every:g}s",
        )  # fmt: skip
        status = json.loads(crv(env, "status", cluster, "--json"))
        lb = next(n for n in status["nodes"] if n["group"] == "front")
        # wait for the first decision, so the load starts at a random point of the schedule
        wait_for(
            "the first autoscale decision",
            lambda: json.loads(crv(env, "autoscale", "status", cluster, "--json"))["decisions"],
            120,
        )
        if args.smoke:
            print(f"autoscale: smoke run: {cluster} deployed, first decision recorded, no load")
            return
        with Load(f"http://{lb['address']}:8080/", args.rate) as load:
            assert load.started is not None
            first = wait_for("a new worker", lambda: len(workers(env, cluster)) > 1, 180, 0.1)
            ready = wait_for(
                "the new worker to be verified",
                lambda: any(
                    n["name"] != f"{cluster}-worker-0"
                    and all(state == "verified" for state in n["roles"].values())
                    for n in workers(env, cluster)
                ),
                180,
            )
            full = wait_for("3 workers", lambda: len(workers(env, cluster)) == 3, 180)
            started, sent = load.started, load.sent
        stopped = time.monotonic()
        back = wait_for("the group back at min", lambda: len(workers(env, cluster)) == 1, 300, 1)
        decisions = json.loads(crv(env, "autoscale", "status", cluster, "--json", "--last", "200"))
        changes = [d for d in reversed(decisions["decisions"]) if d["action"] != "none"]
        print(f"autoscale: schedule every {args.every:g} s, metric reported every 1 s, ")
        print(f"  load {args.rate:g} requests/s ({sent} sent) on the lb; policy 5 per worker, 1-3")
        print(f"  reaction: first new worker recorded {first - started:.1f} s after the load began")
        print(f"            and verified (serving) {ready - started:.1f} s after")
        print(f"  at 3 workers {full - started:.1f} s after the load began")
        print(f"  back at min (1 worker) {back - stopped:.1f} s after the load stopped")
        for d in changes:
            print(f"  {d['action']:6} {d['current']}->{d['target']}: {d['reason']}; {d['outcome']}")
    finally:
        for args in (("destroy", cluster), ("down",)):  # nodes outlive `crv down`: destroy first
            subprocess.run(
                [sys.executable, "-m", "crv_cli", *args], env=env, cwd=REPO, capture_output=True
            )
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
