"""The store's schema through Alembic (crv.service.database.upgrade), on SQLite and on a real
PostgreSQL: a new database is made and stamped with the newest revision; one stamped at an
older revision is upgraded; one from before crv had migrations keeps its rows, gets what it
lacks and the stamp; services starting together migrate once."""

from __future__ import annotations

import concurrent.futures
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from crv.service import database
from crv.service.database import head, open_engine, revision, upgrade
from crv.service.store import METADATA, Store

INDEX = "ix_certificates_cluster_node"


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "state.db"
    url: str = request.getfixturevalue("fresh_database")
    return url


def _engine(target: Path | str) -> sa.Engine:
    return open_engine(target, migrate=False)


def indexes(engine: sa.Engine) -> set[str]:
    with engine.connect() as c:
        return {i["name"] for i in sa.inspect(c).get_indexes("certificates") if i["name"]}


def test_a_new_database_is_made_at_the_newest_revision(target: Path | str) -> None:
    engine = open_engine(target)
    try:
        assert revision(engine) == head() == "0004"
        assert INDEX in indexes(engine)
        Store(engine).put_cluster(
            "c", appliance="x", source="d", pool="local", parameters={}, roles={}, bundle=b"b"
        )
        assert upgrade(engine) == head()  # again: nothing to do, nothing lost
        assert [c["name"] for c in Store(engine).list_clusters()] == ["c"]
    finally:
        engine.dispose()


def test_a_database_stamped_at_the_first_revision_gets_the_index(target: Path | str) -> None:
    engine = _engine(target)
    try:
        with engine.begin() as c:
            METADATA.create_all(c)
            c.execute(sa.text(f"DROP INDEX {INDEX}"))
            command.stamp(database._alembic(c), "0001")
        assert INDEX not in indexes(engine)
        assert revision(engine) == "0001"
        upgrade(engine)
        assert revision(engine) == head()
        assert INDEX in indexes(engine)
    finally:
        engine.dispose()


def test_a_database_at_0002_gets_the_decisions_last_action(target: Path | str) -> None:
    """0003: the autoscaler's cooldown after any action needs decisions.last_action; a row
    written before keeps its values."""
    engine = _engine(target)
    try:
        with engine.begin() as c:
            METADATA.create_all(c)
            c.execute(sa.text("ALTER TABLE decisions DROP COLUMN last_action"))
            command.stamp(database._alembic(c), "0002")
        store = Store(engine)
        store.put_cluster(
            "c", appliance="x", source="d", pool="local", parameters={}, roles={}, bundle=b"b"
        )
        with engine.begin() as c:
            c.execute(sa.text(
                "INSERT INTO decisions (cluster, grp, at, current, desired, target, action, "
                "reason, last_scale_up) VALUES ('c', 'w', 5, 1, 2, 2, 'grow', 'r', 5)"
            ))  # fmt: skip
        upgrade(engine)
        assert revision(engine) == head()
        [row] = store.decisions("c")
        assert (row["last_scale_up"], row["last_action"]) == (5, None)
        store.add_decision("c", {"group": "w", "at": 9, "current": 2, "desired": 1,
                                 "target": 1, "action": "shrink", "reason": "r",
                                 "last_action": 9})  # fmt: skip
        assert store.decisions("c", limit=1)[0]["last_action"] == 9
    finally:
        engine.dispose()


GUARD_COLUMNS = ("lease", "lease_from", "on_lease", "idle_after", "idle_from", "budget",
                 "warn_before", "work_seen", "notices")  # fmt: skip


def test_a_database_at_0003_gets_the_guards_and_a_usage_ledger_of_its_nodes(
    target: Path | str,
) -> None:
    """0004: the guards' columns of `autoscaling` and the `node_usage` ledger; every node there
    gets its row, from its first recorded phase, or else from its cluster's creation."""
    engine = _engine(target)
    try:
        with engine.begin() as c:
            METADATA.create_all(c)
            c.execute(sa.text("DROP TABLE node_usage"))
            for column in GUARD_COLUMNS:
                c.execute(sa.text(f"ALTER TABLE autoscaling DROP COLUMN {column}"))
            command.stamp(database._alembic(c), "0003")
        with engine.begin() as c:
            c.execute(
                sa.text(
                    "INSERT INTO clusters (name, appliance, source, pool, parameters, roles, bundle, "
                    "bundle_digest, created_at) VALUES ('c', 'x', 'd', 'local', '{}', '{}', :b, 'h', "
                    ":at)"
                ),
                {"b": b"b", "at": datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)},
            )
            c.execute(
                sa.text(
                    "INSERT INTO nodes (cluster, name, grp, roles, pool, state, generation, stop, "
                    "timings) VALUES ('c', 'c-w-0', 'w', '[]', 'local', 'enrolled', 1, false, "
                    ":t0), ('c', 'c-w-1', 'w', '[]', 'rack', 'enrolled', 1, false, NULL)"
                ),
                {"t0": json.dumps({"provision": 1714567000.0, "verified": 1714567100.0})},
            )
            c.execute(sa.text(
                "INSERT INTO autoscaling (cluster, enabled, every, updated_at) "
                "VALUES ('c', true, 30, CURRENT_TIMESTAMP)"
            ))  # fmt: skip
        upgrade(engine)
        assert revision(engine) == head() == "0004"
        with engine.connect() as c:
            have = {col["name"] for col in sa.inspect(c).get_columns("autoscaling")}
            ledger_index = {i["name"] for i in sa.inspect(c).get_indexes("node_usage")}
        assert set(GUARD_COLUMNS) <= have and "ix_node_usage_cluster" in ledger_index
        store = Store(engine)
        [setting] = store.autoscaling()
        assert (setting["enabled"], setting["every"]) == (True, 30)
        assert store.guards("c")["lease"] is None
        rows = store.usage("c", 0, 2e9)
        created = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc).timestamp()
        assert [(r["node"], r["pool"], r["started"], r["ended"]) for r in rows] == [
            ("c-w-0", "local", 1714567000.0, None), ("c-w-1", "rack", created, None),
        ]  # fmt: skip
        upgrade(engine)  # again: nothing to do, no second row
        assert len(store.usage("c", 0, 2e9)) == 2
        assert store.put_guards("c", {"lease": 60.0})["lease"] == 60.0
        store.delete_node("c", "c-w-1")
        assert store.usage("c", 0, 2e9)[1]["ended"] is not None
    finally:
        engine.dispose()


def test_a_database_from_before_migrations_keeps_its_rows(target: Path | str) -> None:
    """Tables as an older crv made them (no timings column, no index, no alembic_version)."""
    engine = _engine(target)
    try:
        old = sa.MetaData()
        for table in METADATA.sorted_tables:
            columns = [
                c._copy() for c in table.columns if (table.name, c.name) != ("nodes", "timings")
            ]
            sa.Table(table.name, old, *columns)
        with engine.begin() as c:
            old.create_all(c)
            c.execute(
                sa.text(
                    "INSERT INTO autoscaling (cluster, enabled, every, updated_at) "
                    "VALUES ('keep', true, 30, CURRENT_TIMESTAMP)"
                )
            )
        upgrade(engine)
        assert revision(engine) == head()
        with engine.connect() as c:
            have = {col["name"] for col in sa.inspect(c).get_columns("nodes")}
        assert "timings" in have
        assert INDEX in indexes(engine)
        assert Store(engine).autoscaling()[0]["cluster"] == "keep"
    finally:
        engine.dispose()


def test_services_starting_together_migrate_once(fresh_database: str) -> None:
    """Four engines upgrade a new PostgreSQL database at once: the advisory lock lets one make
    it; the others find it stamped."""
    engines = [_engine(fresh_database) for _ in range(4)]
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(upgrade, engines))
        assert results == [head()] * 4
        with engines[0].connect() as c:
            stamps = c.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar()
        assert stamps == 1
    finally:
        for e in engines:
            e.dispose()


def test_crv_tables_stay_out_of_the_public_schema(fresh_database: str) -> None:
    """Prefect's server keeps its tables (among them `events` and `alembic_version`) in
    `public` of the same database: crv's are in their own schema."""
    engine = open_engine(fresh_database)
    try:
        with engine.connect() as c:
            public = sa.inspect(c).get_table_names(schema="public")
            mine = sa.inspect(c).get_table_names(schema=database.SCHEMA)
        assert not {"events", "alembic_version", "clusters"} & set(public)
        assert {"events", "alembic_version", "clusters", "nodes"} <= set(mine)
    finally:
        engine.dispose()
