"""The boot service of one bare-metal pool as a process of its own (TFTP + HTTP, see boot.py):
what `crv up` starts for each bare-metal pool."""

from __future__ import annotations

from collections.abc import Sequence

from crv.base.home import Home
from pools import get_pool
from pools.baremetal.pool import BaremetalPool


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pools.baremetal.serve_boot --pool NAME`: what `crv up` runs for each bare-metal
    pool (CRV_HOME and CRV_POOLS_FILE from the environment)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pools.baremetal.serve_boot")
    parser.add_argument("--pool", required=True)
    args = parser.parse_args(argv)
    home = Home.from_env()
    pool = get_pool(args.pool, home.pool_dir(args.pool))
    if not isinstance(pool, BaremetalPool):
        raise SystemExit(f"pool {args.pool} is not a bare-metal pool")
    pool.serve_boot()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
