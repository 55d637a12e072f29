"""Benchmarks: each module has `main()` printing its figures and the ratio to its target.

Run them all with `./dev bench` (or `python -m benchmarks`); one of them with
`python -m benchmarks.bench_plan`.
Timed here, never in unit tests: these machines are noisy, so a benchmark reports the median of
several runs and the test-suite checks behaviour only.
"""

import argparse
import os
import signal
import sys


def exit_on_sigterm() -> None:
    """Let SIGTERM (a CI timeout, a kill) end this benchmark process through its `finally`
    blocks, so the daemons it started go down and its temporary CRV_HOME goes away.

    A second SIGTERM is ignored, so it cannot cut that cleanup short. Called where a benchmark
    runs as a program, never on import (the tests import them).
    """

    def terminated(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


def add_database_options(parser: argparse.ArgumentParser, postgresql: str) -> None:
    """`--database sqlite|postgresql|both` and `--processes N`, as the benchmarks that run on
    both databases take them; `postgresql` says what the PostgreSQL side is."""
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgresql", "both"],
        default="both",
        help=f"SQLite with one service process, {postgresql} with --processes, or both side "
        "by side (the default; each in a process of its own)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="service processes on PostgreSQL (default: the CPU count)",
    )
