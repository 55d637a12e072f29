"""Node-hours from the usage ledger (the store's `node_usage` table): one row per node, from
when the store recorded it to when it was deleted (a bare-metal machine released to the pool
counts as ended: it no longer works for the cluster, and a powered-off machine costs nothing).

Pure arithmetic on Unix times, so the store, the admin API, the guards (crv.engine.guards) and
their tests count alike. A day is a UTC day: Unix time has no leap seconds, so every day is
86,400 s and starts at a multiple of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

DAY = 86400.0


def day_start(at: float) -> float:
    """The start (00:00 UTC) of the UTC day holding `at`."""
    return at - at % DAY


def overlap(started: float, ended: float | None, since: float, until: float) -> float:
    """Seconds of [started, ended or until] inside [since, until]; never negative."""
    end = until if ended is None else min(ended, until)
    return max(0.0, end - max(started, since))


def node_hours(rows: Iterable[Mapping[str, Any]], since: float, until: float) -> float:
    """The node-hours of the ledger's `rows` ({started, ended}) within [since, until]."""
    seconds = sum(overlap(float(r["started"]), _end(r), since, until) for r in rows)
    return seconds / 3600.0


def _end(row: Mapping[str, Any]) -> float | None:
    ended = row.get("ended")
    return None if ended is None else float(ended)
