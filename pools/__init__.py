"""Resource pool drivers (local, sim, libvirt, libcloud, baremetal, and manual: paired machines).

Layer rule: pools know nothing of Prefect. A driver is the five methods of the pool contract
(validate, list_nodes, get_node, create_node, destroy_node); it translates library errors into
crv errors that say whether a retry can help.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from crv.base.errors import SpecError
from pools.base import Pool

AGENT = Path(__file__).resolve().parent.parent / "agent" / "crv_agent.py"
POOLS = ("local", "sim")  # built in; pools.yaml adds more (pools/config.py)


LAB_POOL = "lab"  # the pool `crv lab up` writes into pools.yaml (lab/control.py)


def get_pool(name: str, state_dir: Path) -> Pool:
    """A pool by name, its state under `state_dir` (CRV_HOME/pools/<name>): a built-in one, or
    one that pools.yaml (pools/config.py) names. Checked with `validate()`, no network call."""
    if name == "local":
        from pools.local import LocalPool

        pool: Pool = LocalPool(state_dir, AGENT)
    elif name == "sim":
        from pools.sim import SimPool

        pool = SimPool(state_dir)
    elif name == "manual":  # machines that joined with `crv pair`; not a place to make nodes
        from pools.manual import ManualPool

        pool = ManualPool(state_dir)
    else:
        from pools import config

        configs = config.load(config.config_file(state_dir.parent.parent))
        found = configs.get(name)
        if found is None:
            hint = " (`crv lab up` makes the lab pool)" if name == LAB_POOL else ""
            known = ", ".join(configs)
            raise SpecError("--pool", name, f"unknown pool; known pools: {known}{hint}")
        module, cls, _ = config.DRIVERS[found.driver]
        pool = getattr(importlib.import_module(module), cls)(name, state_dir, found.options)
    pool.validate()
    return pool


def pool_names(home_root: Path) -> list[str]:
    """The pools a deploy may name: the built-in ones and those of pools.yaml."""
    from pools import config

    return list(config.load(config.config_file(home_root)))
