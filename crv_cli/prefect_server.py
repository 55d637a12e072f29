"""Prefect's own CLI (`python -m crv_cli.prefect_server server start ...`), with one change for
a Prefect server on SQLite: its write transactions begin IMMEDIATE.

Prefect's server opens the transactions of its writing routes (`session_context(
begin_transaction=True)`: create_flow_run_from_deployment, set_flow_run_state, the concurrency
slots, ...) as SQLite DEFERRED transactions: they read, then write. In WAL mode, when another
connection committed a write after such a transaction's first read, its first write fails at
once with "database is locked" (SQLITE_BUSY_SNAPSHOT: SQLite's busy timeout cannot help, the
transaction's snapshot is stale), and the server answers 503. Two deploys created through the
API at the same moment saw that on a quiet machine (`python -m benchmarks.bench_day --smoke`: 3
of them), and CI saw a README `curl` get one. BEGIN IMMEDIATE takes the write lock before the
first read, so a second writer waits (Prefect's busy_timeout: 60 s) instead of failing; Prefect
itself does this already for its `with_for_update` transactions and for its migrations, and
read-only routes (`session_context()` without a transaction) are unchanged. PostgreSQL servers
are not touched. The change is made here, by wrapping the configuration's `begin_transaction`,
because Prefect has no setting for it (PrefectHQ/prefect#9594 proposed one and was not merged).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


def write_transactions_immediate() -> None:
    """Make every transaction Prefect's server begins on SQLite an IMMEDIATE one."""
    from prefect.server.database import configurations

    sqlite = configurations.AioSqliteConfiguration
    begin = sqlite.begin_transaction
    if getattr(begin, "crv_immediate", False):
        return

    @asynccontextmanager
    async def begin_immediate(
        self: Any, session: Any, with_for_update: bool = False
    ) -> AsyncIterator[Any]:
        async with begin(self, session, with_for_update=True) as transaction:
            yield transaction

    begin_immediate.crv_immediate = True  # type: ignore[attr-defined]
    sqlite.begin_transaction = begin_immediate  # type: ignore[method-assign]


def main() -> None:
    write_transactions_immediate()
    from prefect.cli import app

    app()


if __name__ == "__main__":
    main()
