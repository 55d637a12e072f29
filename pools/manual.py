"""The `manual` pool: machines crv did not make and cannot make, which joined by pairing.

A desktop or a server someone already runs (often behind NAT) joins a group with `crv pair`
and `crv-agent pair` (docs/pki.md, "Pairing"). The service records it as a node of this pool;
this driver keeps a ledger of the paired machines crv has taken in (`adopt`, called by the
provision step once the node has enrolled) so that `crv status`, repair and teardown see them
like any pool's nodes. It never starts, stops or deletes a machine: `create_node` refuses (a
paired machine cannot be made again; pair one), and `destroy_node` only forgets it. The node's
certificates are revoked when crv removes it, so its agent is refused and stops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crv.base.flock import exclusive
from pools.base import NodeInfo, NodeSpec, PoolError, write_atomic

NAME = "manual"


class ManualPool:
    name = NAME

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self._ledger = state_dir / "nodes.json"
        self._lock = state_dir / "nodes.lock"

    def validate(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise PoolError(NAME, f"state directory {self.root}: {e}") from e

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._ledger.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise PoolError(NAME, f"{self._ledger} is unreadable: {e}") from e
        if not isinstance(data, dict):
            raise PoolError(NAME, f"{self._ledger} is not a JSON object")
        return data

    def _write(self, nodes: dict[str, dict[str, Any]]) -> None:
        write_atomic(self._ledger, json.dumps(nodes, sort_keys=True).encode(), 0o600)

    @staticmethod
    def _info(name: str, n: dict[str, Any]) -> NodeInfo:
        return NodeInfo(
            name=name,
            cluster=str(n["cluster"]),
            state="running",  # as far as crv can tell: its agent tells the service the rest
            address=n.get("address"),
            extra={"paired": True},
        )

    def list_nodes(self, cluster: str | None = None) -> list[NodeInfo]:
        return [
            self._info(name, n)
            for name, n in sorted(self._read().items())
            if cluster is None or n.get("cluster") == cluster
        ]

    def get_node(self, name: str) -> NodeInfo | None:
        n = self._read().get(name)
        return None if n is None else self._info(name, n)

    def adopt(self, name: str, cluster: str, address: str | None) -> NodeInfo:
        """Take in a machine that paired as `name` of `cluster` (idempotent)."""
        self.validate()
        with exclusive(self._lock):
            nodes = self._read()
            nodes[name] = {"cluster": cluster, "address": address}
            self._write(nodes)
        return self._info(name, nodes[name])

    def create_node(self, spec: NodeSpec) -> NodeInfo:
        raise PoolError(
            NAME,
            f"{spec.name}: the manual pool makes no machines; a machine joins it with "
            f"`crv pair {spec.cluster} {spec.group}`",
        )

    def destroy_node(self, name: str) -> None:
        """Forget the machine (it goes on running; its certificates are revoked by crv)."""
        if not self._ledger.exists():
            return
        with exclusive(self._lock):
            nodes = self._read()
            if nodes.pop(name, None) is not None:
                self._write(nodes)
