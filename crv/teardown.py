"""Tearing a cluster down: every node the pool holds for it goes, every certificate is revoked.

The pool is asked by tag as well as by the service's records, so nodes a killed deploy made
before recording them are found too (FAULTS F1, F11). Revocation comes after the nodes are
gone, and the service purges the cluster's attributes with it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from crv.client import Service
from pools.base import Pool


@dataclass(frozen=True)
class Teardown:
    cluster: str
    destroyed: int
    revoked: int
    appliance: str = ""


def teardown(cluster: str, pool: Pool, service: Service) -> Teardown:
    status = service.status(cluster)
    names = {n["name"] for n in status["nodes"]} if status else set()
    names |= {n.name for n in pool.list_nodes(cluster)}
    with ThreadPoolExecutor(min(32, max(1, len(names)))) as ex:
        list(ex.map(pool.destroy_node, sorted(names)))
    revoked = service.delete_cluster(cluster) if status else []
    return Teardown(cluster, len(names), len(revoked), status["appliance"] if status else "")
