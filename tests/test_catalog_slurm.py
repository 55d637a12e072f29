"""The slurm appliance's shape (appliances/slurm): what waits for what, who may read the munge
key, and what its image must hold. It runs for real in tests/test_vm_catalog.py (marked vm)."""

from __future__ import annotations

import networkx as nx

from crv.appliance.loader import load_appliance
from crv.appliance.plan import expand
from tests.conftest import CATALOG


def test_the_key_first_then_every_slurmd_then_the_node_list_and_its_job() -> None:
    plan = expand(load_appliance(CATALOG / "slurm", {"computes": "3"}), "s")
    g = plan.graph
    ctl, computes = "s-controller-0", [f"s-compute-{i}" for i in range(3)]

    def before(a: str, b: str) -> bool:
        return nx.has_path(g, a, b)

    for node in computes:
        assert before(f"{ctl}:verify:munge-key", f"{node}:contextualize:slurmd")
        assert before(f"{node}:verify:slurmd", f"{ctl}:contextualize:slurmctld")
    # the key does not wait for the compute nodes: it is what they wait for
    assert not any(before(f"{n}:verify:slurmd", f"{ctl}:contextualize:munge-key") for n in computes)


def test_only_its_dependents_may_read_the_munge_key() -> None:
    appliance = load_appliance(CATALOG / "slurm")
    readers = {name for name, role in appliance.roles.items()
               if "munge-key" in {d.role for d in role.depends_on}}  # fmt: skip
    assert readers == {"slurmd", "slurmctld"}  # slurmctld: local, on the controller itself
    assert {g.name for g in appliance.hosts("slurmd")} == {"compute"}
    assert {g.name for g in appliance.hosts("munge-key")} == {"controller"}


def test_its_image_holds_slurm_and_munge() -> None:
    assert {"slurm-wlm", "munge"} <= set(load_appliance(CATALOG / "slurm").packages)
