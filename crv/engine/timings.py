"""A node's timings: when it reached each phase of its making, as the engine, the service and
the pools recorded them (`crv status NAME --timings`, the cluster artifact).

- provision: the engine asked the pool for the node; created: the pool's call returned;
- power_on, script, kernel, initrd, callback (bare metal): the BMC took the power-on, iPXE
  fetched the node's script, the boot service sent the kernel and the ramdisk in full, the
  booted OS called back once enrolled (docs/pools.md, "Bare metal");
- enrolled: the node's agent enrolled (crv saw it); recipes: every role's recipe was done;
  verified: every role's verify passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

PHASES = (
    "provision", "created", "power_on", "script", "kernel", "initrd", "enrolled", "callback",
    "recipes", "verified",
)  # fmt: skip


def seconds_since_start(timings: Mapping[str, str]) -> dict[str, float]:
    """Phase -> seconds since the node's first phase (ISO times in, phase order out)."""
    times = {p: datetime.fromisoformat(t).timestamp() for p, t in timings.items()}
    if not times:
        return {}
    start = times.get("provision", min(times.values()))
    order = {p: i for i, p in enumerate(PHASES)}
    return {
        p: round(t - start, 1)
        for p, t in sorted(times.items(), key=lambda kv: (order.get(kv[0], 99), kv[1]))
    }


def summary(timings: Mapping[str, str]) -> str:
    """`power_on +1.2 s, script +9.8 s, ...`: one line for a table cell."""
    return ", ".join(
        f"{p} +{s:g} s" for p, s in seconds_since_start(timings).items() if p != "provision"
    )
