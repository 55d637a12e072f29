"""Resource pool drivers (local, libvirt, libcloud, baremetal).

Layer rule: pools know nothing of Prefect. A driver is the five methods of the pool contract
(validate, list_nodes, get_node, create_node, destroy_node); it translates library errors into
crv errors that say whether a retry can help.
"""

from __future__ import annotations

from pathlib import Path

from crv.errors import SpecError
from pools.base import Pool

AGENT = Path(__file__).resolve().parent.parent / "agent" / "crv_agent.py"
POOLS = ("local", "sim")


def get_pool(name: str, state_dir: Path) -> Pool:
    """A pool by name, its state under `state_dir` (CRV_HOME/pools/<name>)."""
    if name == "local":
        from pools.local import LocalPool

        pool: Pool = LocalPool(state_dir, AGENT)
    elif name == "sim":
        from pools.sim import SimPool

        pool = SimPool(state_dir)
    else:
        raise SpecError("--pool", name, f"unknown pool; known pools: {', '.join(POOLS)}")
    pool.validate()
    return pool
