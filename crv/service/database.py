"""Where the service's store lives: SQLite under CRV_HOME (the embedded default), or PostgreSQL
when `CRV_DATABASE_URL` (or `crv up --database URL`, kept in `service/database-url`, 0600)
names one. The store's code is the same for both (crv.service.store, SQLAlchemy Core).

PostgreSQL: crv's tables live in the schema `crv_store` of the given database, so Prefect's
server can use the same database (its tables stay in `public`; both have an `events` table and
an `alembic_version`). Reads are REPEATABLE READ snapshots; the store's writes to one cluster
go one at a time under an advisory lock (crv.service.store.Store._writing), as SQLite's single
writer makes them, so several service processes change the same rows safely.
psycopg 3 prepares a statement on the server after its fifth execution on a connection, so the
hot routes' queries are prepared statements without code of ours.

Schema changes are Alembic revisions (crv/service/migrations). A new database is made from the
tables' definitions and stamped with the newest revision (Alembic's recipe for a database built
from scratch); a database stamped before goes through `upgrade head`; one from before Alembic
(SQLite homes of earlier crv versions) gets its missing tables and columns, which brings it to
the first revision (0001), and then the revisions since. On
PostgreSQL the migration holds an advisory lock, so services starting together migrate once.

The URL's password never leaves this module in clear: `redact` is what errors and logs show.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import make_url

from crv.base.errors import CrvError
from crv.base.home import Home

ENV_DATABASE_URL = "CRV_DATABASE_URL"
SCHEMA = "crv_store"  # PostgreSQL: crv's tables, apart from Prefect's in `public`
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_LOCK_ID = 0x6372760021  # pg_advisory_xact_lock key of crv's migrations ("crv" + issue 21)


class DatabaseError(CrvError):
    """The database named is unusable (bad URL, unreachable, refused): one line, no password."""


def redact(url: str) -> str:
    """The URL with its password hidden: what logs, errors and status show."""
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "<an invalid database URL>"
    return parsed.render_as_string(hide_password=True)


def url_file(home: Home) -> Path:
    return home.service_dir / "database-url"


def database_url(home: Home) -> str | None:
    """The PostgreSQL URL this home's service uses: CRV_DATABASE_URL, else the one `crv up
    --database` recorded; None: SQLite in the home."""
    given = os.environ.get(ENV_DATABASE_URL, "").strip()
    if given:
        return given
    try:
        return url_file(home).read_text().strip() or None
    except FileNotFoundError:
        return None


def remember_url(home: Home, url: str | None) -> None:
    """Record the URL for this home's later starts (0600), or forget it (None: SQLite)."""
    path = url_file(home)
    if url is None:
        path.unlink(missing_ok=True)
        return
    home.ensure()
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")
    os.replace(tmp, path)


def check_url(url: str) -> sa.URL:
    """A PostgreSQL URL as SQLAlchemy takes it (driver psycopg), or a one-line DatabaseError."""
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise DatabaseError(f"{ENV_DATABASE_URL}: not a database URL: {redact(url)}") from None
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise DatabaseError(
            f"{ENV_DATABASE_URL}: {redact(url)}: crv's store takes postgresql://USER:PASSWORD@"
            "HOST:PORT/DATABASE (or nothing: SQLite in CRV_HOME)"
        )
    if not parsed.database:
        raise DatabaseError(f"{ENV_DATABASE_URL}: {redact(url)} names no database")
    return parsed.set(drivername="postgresql+psycopg")


def prefect_url(url: str) -> str:
    """The same database for Prefect's server (PREFECT_API_DATABASE_CONNECTION_URL: asyncpg)."""
    return check_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def conninfo(url: str) -> str:
    """The URL as psycopg takes it (the service processes' LISTEN/NOTIFY connections)."""
    return check_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def open_engine(target: Path | str, *, migrate: bool = True, pool_size: int = 10) -> Engine:
    """An engine on SQLite (a path) or PostgreSQL (a URL), its schema brought up to date
    unless `migrate` is false (a service process whose supervisor migrated already)."""
    engine = _sqlite(target) if isinstance(target, Path) else _postgres(target, pool_size)
    if migrate:
        upgrade(engine)
    return engine


def _sqlite(path: Path) -> Engine:
    from crv.service.store import WRITE_OPTION

    engine = sa.create_engine(f"sqlite:///{path}", future=True)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
        # SQLAlchemy emits BEGIN itself (below): the driver's own began only before a write,
        # so a transaction's reads ran outside it (two writers both read, then both wrote)
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # a write transaction (the store's `_writing`) takes the write lock first, as the
        # advisory lock does on PostgreSQL; a read is a snapshot
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _postgres(url: str, pool_size: int) -> Engine:
    engine = sa.create_engine(
        check_url(url),
        isolation_level="REPEATABLE READ",  # reads; the store's writes: crv.service.store
        pool_size=pool_size,
        max_overflow=pool_size,
        # no pre-ping (a round trip per checkout): a connection found dropped is replaced and
        # the store's transaction runs again (crv.service.store._retried)
        connect_args={
            "connect_timeout": 5,
            "application_name": "crv-service",
            # a commit does not wait for its WAL on disk: what PostgreSQL crashing may lose is
            # the last fraction of a second, as SQLite's WAL with synchronous=NORMAL may
            "options": f"-c search_path={SCHEMA} -c synchronous_commit=off",
        },
    )
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    except sa.exc.OperationalError as e:
        engine.dispose()
        raise DatabaseError(f"database {redact(url)} unreachable: {_reason(e)}") from None
    except sa.exc.DBAPIError as e:
        engine.dispose()
        raise DatabaseError(f"database {redact(url)} refused: {_reason(e)}") from None
    return engine


def _reason(e: sa.exc.DBAPIError) -> str:
    """The driver's first line, without the URL (psycopg does not echo passwords)."""
    text = str(e.orig).strip().splitlines()
    return text[0] if text else type(e.orig).__name__


def prepare(url: str) -> str:
    """Check a PostgreSQL URL before anything starts on it: reachable, crv's schema migrated,
    and `pg_trgm` in the database for Prefect's server (a trusted extension: the database's
    owner may create it). Its revision; a one-line DatabaseError otherwise."""
    engine = open_engine(url, migrate=False, pool_size=1)
    try:
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except sa.exc.DBAPIError as e:
            raise DatabaseError(
                f"database {redact(url)}: Prefect's server needs the extension pg_trgm "
                f"(Debian: postgresql-contrib; CREATE EXTENSION pg_trgm as its owner): {_reason(e)}"
            ) from None
        try:
            return upgrade(engine)
        except sa.exc.DBAPIError as e:
            raise DatabaseError(f"database {redact(url)}: migration failed: {_reason(e)}") from None
    finally:
        engine.dispose()


def _alembic(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    rev = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert rev is not None
    return rev


def revision(engine: Engine) -> str | None:
    with engine.connect() as c:
        return MigrationContext.configure(c).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Bring the schema to the newest revision (see the module's docstring); the revision."""
    from crv.service.store import METADATA, add_missing_columns

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines on every start
    connection = engine.connect()
    if is_postgres(engine):  # each statement sees what the lock's previous holder committed
        connection = connection.execution_options(isolation_level="READ COMMITTED")
    with connection as c, c.begin():
        if is_postgres(engine):  # SQLite has one service process: nobody to wait for
            c.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_ID})")
        config = _alembic(c)
        current = MigrationContext.configure(c).get_current_revision()
        if current is None and not sa.inspect(c).has_table("clusters"):
            METADATA.create_all(c)  # a new database: made as it is now
            command.stamp(config, "head")
        elif current is None:  # from before migrations: what it lacks, then the baseline's
            METADATA.create_all(c)  # stamp, then the revisions since
            add_missing_columns(c)
            command.stamp(config, "0001")
            command.upgrade(config, "head")
        elif current != head():
            command.upgrade(config, "head")
    return head()
