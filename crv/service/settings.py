"""The service's own settings from the environment, checked: how many processes serve, and
how many threads each runs the store's calls on. Read by the service and by `crv up` (which
refuses a bad value in one line before anything starts)."""

from __future__ import annotations

import os

from crv.base.errors import CrvError
from crv.service.database import ENV_DATABASE_URL


class ServiceConfigError(CrvError):
    """The service's settings are refused (one line: the variable and why)."""


ENV_PROCESSES = "CRV_SERVICE_PROCESSES"
ENV_THREADS = "CRV_SERVICE_DB_THREADS"
DB_THREADS = 8  # store threads per process on PostgreSQL (SQLite: one, its single writer)


def service_processes(postgres: bool) -> int:
    """How many service processes: CRV_SERVICE_PROCESSES, else one per CPU on PostgreSQL and
    one on SQLite (whose single writer several processes would only queue on)."""
    raw = os.environ.get(ENV_PROCESSES, "").strip()
    if not raw:
        return (os.cpu_count() or 1) if postgres else 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ServiceConfigError(
            f"{ENV_PROCESSES}={raw!r}: give a whole number of processes, 1 or more"
        )
    if n > 1 and not postgres:
        raise ServiceConfigError(
            f"{ENV_PROCESSES}={n}: several service processes need PostgreSQL "
            f"({ENV_DATABASE_URL}); on SQLite the service runs one"
        )
    return n


def store_threads(postgres: bool) -> int:
    """Store threads per service process: CRV_SERVICE_DB_THREADS on PostgreSQL, else one."""
    raw = os.environ.get(ENV_THREADS, "").strip()
    return max(1, int(raw)) if postgres and raw.isdigit() else (DB_THREADS if postgres else 1)
