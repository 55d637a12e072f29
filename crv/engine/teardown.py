"""Tearing a cluster down: every node its pools hold for it goes, every certificate is revoked.

Each pool the cluster uses is asked by tag as well as the service's records, so nodes a killed
deploy made before recording them are found too (FAULTS F1, F11). Revocation comes after the
nodes are gone, and the service purges the cluster's attributes with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from crv.engine.placement import Drivers, pools_of
from crv.service.client import Service


@dataclass(frozen=True)
class Teardown:
    cluster: str
    destroyed: int
    revoked: int
    appliance: str = ""


def teardown(
    cluster: str, drivers: Drivers, service: Service, also: Iterable[str] = ()
) -> Teardown:
    """Destroy the cluster's nodes in every pool it uses (and in the pools `also` names: a
    cluster whose record is gone is still found by tag there), then forget it."""
    status = service.status(cluster)
    doomed = {(n["pool"], n["name"]) for n in status["nodes"]} if status else set()
    for pool in pools_of(status, *also):
        doomed |= {(pool, n.name) for n in drivers(pool).list_nodes(cluster)}
    with ThreadPoolExecutor(min(32, max(1, len(doomed)))) as ex:
        list(ex.map(lambda pn: drivers(pn[0]).destroy_node(pn[1]), sorted(doomed)))
    revoked = service.delete_cluster(cluster) if status else []
    return Teardown(cluster, len(doomed), len(revoked), status["appliance"] if status else "")
