"""crv_cli.postgres: a real PostgreSQL from Debian's package, started in a temp dir."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from crv_cli.postgres import LocalPostgres, PostgresError, postgres_binaries, redact

try:
    postgres_binaries()
except PostgresError as e:
    pytest.skip(str(e), allow_module_level=True)


def cmdlines() -> dict[int, str]:
    """Every process's command line, as `ps` shows it (arguments joined by spaces)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            found[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return found


def naming(data: Path) -> list[str]:
    """The command lines of processes that name the data directory `data` (the postmaster)."""
    return [line for line in cmdlines().values() if f"-D {data} " in line]


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    server = LocalPostgres(tmp_path_factory.mktemp("pg"))
    server.start()
    yield server
    server.destroy()


def test_connects_with_the_url_and_has_pg_trgm(pg: LocalPostgres) -> None:
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("crv", "crv")
        row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone()
        assert row == (1,)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
    assert pg.url.startswith("postgresql://crv:") and f"@127.0.0.1:{pg.port}/crv" in pg.url


def test_the_password_is_on_no_command_line_and_in_a_0600_file(pg: LocalPostgres) -> None:
    password = (pg.directory / "password").read_text().strip()
    assert len(password) >= 24
    assert naming(pg.data), "the postmaster should be running, named by its data dir"
    assert not [line for line in cmdlines().values() if password in line]
    assert stat.S_IMODE((pg.directory / "password").stat().st_mode) == 0o600
    assert password not in (pg.data / "server.log").read_text()


def test_only_loopback_and_the_owners_socket(pg: LocalPostgres) -> None:
    assert stat.S_IMODE(pg.data.stat().st_mode) == 0o700  # the socket's directory
    assert (pg.data / f".s.PGSQL.{pg.port}").is_socket()
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    wrong = pg.url.replace(pg.url.split(":")[2].split("@")[0], "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)
    if os.geteuid() == 0:  # reachable by postgres; under a 0700 pytest dir, that is /var/lib
        assert pg.data.owner() == "postgres"
        assert pg.data.parent == Path("/var/lib/crv-postgres")
        assert (pg.directory / "location").read_text().strip() == str(pg.data)


def test_a_restart_keeps_the_data_port_and_password(pg: LocalPostgres) -> None:
    url = pg.url
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    pg.stop()
    assert not pg.running() and not naming(pg.data)
    pg.stop()  # idempotent
    assert pg.start() == url
    assert pg.running()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (42,)


def test_a_second_instance_on_the_directory_reuses_port_and_password(pg: LocalPostgres) -> None:
    other = LocalPostgres(pg.directory)
    assert other.running()
    assert other.start() == pg.url
    assert other.port == pg.port and other.data == pg.data


def test_create_and_drop_a_database(pg: LocalPostgres) -> None:
    url = pg.create_database("t_created")
    assert url == pg.url_for("t_created")
    conn = psycopg.connect(url)  # left open: drop_database ends it
    assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone()
    assert conn.execute("SELECT current_user").fetchone() == ("crv",)
    pg.drop_database("t_created")
    conn.close()
    with psycopg.connect(pg.url) as check:
        assert not check.execute("SELECT 1 FROM pg_database WHERE datname = 't_created'").fetchone()
    with pytest.raises(PostgresError, match="a database name"):
        pg.create_database('x"; DROP DATABASE crv; --')


def test_fresh_database_fixture(fresh_database: str, postgres_url: str) -> None:
    assert fresh_database.rpartition("/")[0] == postgres_url.rpartition("/")[0]
    with psycopg.connect(fresh_database) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)
        assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone()


def test_redact_hides_the_password() -> None:
    assert redact("postgresql://crv:s3cret@127.0.0.1:5432/crv") == (
        "postgresql://crv:***@127.0.0.1:5432/crv"
    )
    assert redact("postgresql://crv@host/db") == "postgresql://crv@host/db"
    assert redact("postgresql://h/db?user=u&password=s3cret&x=1") == (
        "postgresql://h/db?user=u&password=***&x=1"
    )
    assert "s3cret" not in redact("postgresql://crv:s3cret@[::1/db")


def test_a_failed_start_says_why_from_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = LocalPostgres(tmp_path / "pg", port=taken.getsockname()[1])
        try:
            with pytest.raises(PostgresError, match="did not start") as raised:
                server.start()
            assert "already in use" in str(raised.value)
        finally:
            server.destroy()


def test_destroy_leaves_nothing(tmp_path: Path) -> None:
    server = LocalPostgres(tmp_path / "pg")
    server.start()
    data = server.data
    assert naming(data)
    server.destroy()
    assert not naming(data)
    assert not data.exists()
    assert sorted(p.name for p in (tmp_path / "pg").iterdir()) == ["lock"]
    server.stop()  # no cluster: nothing to do
    server.destroy()
    assert not server.running()
