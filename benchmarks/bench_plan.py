"""Planning cost: load + validate + expand + critical path, for 1,000 to 10,000 nodes.

Target (DESIGN.md): planning a 10,000-node appliance in under 2 s. Uses the catalog's ganglia
appliance (two roles per compute node, every gmond waiting for every collector) and webfarm
shapes, so the figure covers both remote fan-in and plain chains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from benchmarks import exit_on_sigterm
from crv.appliance.loader import load_appliance
from crv.appliance.plan import Plan, expand
from crv_cli.plan_view import describe

CATALOG = Path(__file__).resolve().parent.parent / "appliances"
TARGET_SECONDS = 2.0
RUNS = 5
T = TypeVar("T")


def timed(fn: Callable[[], T], runs: int = RUNS) -> tuple[float, T]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(label: str, appliance: str, overrides: dict[str, str], runs: int = RUNS) -> float:
    load_s, a = timed(lambda: load_appliance(CATALOG / appliance, overrides), runs)
    expand_s, plan = timed(lambda: expand(a), runs)
    json_s, _ = timed(lambda: json.dumps(plan.to_json()), runs)
    view_s, _ = timed(lambda: render(plan), runs)
    total = load_s + expand_s
    g = plan.graph
    print(
        f"plan {label:>26}: {len(plan.nodes):>6} nodes {g.number_of_nodes():>6} steps "
        f"{g.number_of_edges():>6} edges | load {load_s * 1000:6.1f} ms  expand+critical path "
        f"{expand_s * 1000:7.1f} ms  = {total:5.2f} s ({total / TARGET_SECONDS:4.2f}x of the "
        f"{TARGET_SECONDS:g} s target) | --json {json_s * 1000:6.1f} ms, "
        f"table {view_s * 1000:6.1f} ms"
        f" | {total / len(plan.nodes) * 1e6:5.1f} us/node"
    )
    return total


def render(plan: Plan) -> bool:
    with open(os.devnull, "w") as sink:
        Console(file=sink, width=120).print(describe(plan))
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_plan")
    parser.add_argument("--smoke", action="store_true", help="one run of tiny plans (CI)")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        bench("ganglia 16 clients + 4", "ganglia", {"clients": "16", "servers": "4"}, runs=1)
        bench("webfarm 10 workers", "webfarm", {"workers": "10"}, runs=1)
        print("plan: smoke run (tiny plans, one run each): no figure checked")
        return
    print(f"crv planning benchmark (median of {RUNS} runs, Python {sys.version.split()[0]})")
    for n in (1000, 5000, 10000):
        bench(f"ganglia {n - 4} clients + 4", "ganglia", {"clients": str(n - 4), "servers": "4"})
    for n in (1000,):
        bench(f"webfarm {n} workers", "webfarm", {"workers": str(n)})
    worst = bench("ganglia 10,000 nodes (final)", "ganglia", {"clients": "9996", "servers": "4"})
    verdict = "meets" if worst < TARGET_SECONDS else "MISSES"
    print(f"plan: 10,000 nodes planned in {worst:.2f} s: {verdict} the {TARGET_SECONDS:g} s target")


if __name__ == "__main__":
    exit_on_sigterm()
    main()
