"""crv on PostgreSQL end to end, through the CLI: `crv up --postgres` (a PostgreSQL of the home's
own, Debian's package), two service processes, Prefect's server on the same database with its
background services in a process of their own; a cluster deployed, resized and destroyed on
the sim pool; the state kept across `crv down` / `crv up`; bad input in one line; the password
nowhere it should not be."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from crv_cli.postgres import postgres_binaries
from tests.test_deploy_e2e import Crv

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not Path("/usr/lib/postgresql").is_dir(), reason="Debian's postgresql is not installed"
    ),
]


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    postgres_binaries()
    c = Crv(tmp_path_factory.mktemp("crv-pg-home"))
    c.env.update(CRV_SERVICE_PROCESSES="2", CRV_PREFECT_SERVICES="apart")
    r = c("up", "--postgres", timeout=300)
    if r.returncode != 0:
        c("down")
        pytest.fail(f"crv up --postgres failed: {r.stdout}{r.stderr}")
    try:
        yield c
    finally:
        c("down")
        from crv_cli.postgres import LocalPostgres

        LocalPostgres(c.home / "postgres").destroy()


def url_of(crv: Crv) -> str:
    return (crv.home / "service" / "database-url").read_text().strip()


def password_of(crv: Crv) -> str:
    url = url_of(crv)
    return url.split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]


def verified(node: dict) -> bool:
    """A node of `crv status --json`: enrolled, every role verified."""
    return node["state"] == "enrolled" and set(node["roles"].values()) == {"verified"}


def processes_of(crv: Crv) -> list[int]:
    """Every process whose environment names this CRV_HOME (the daemons and what they run)."""
    marker = f"CRV_HOME={crv.home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_up_puts_crv_and_prefect_on_postgresql(crv: Crv) -> None:
    r = crv("up")  # again: idempotent, and says where the state is
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("database:"))
    assert "postgresql://crv:***@127.0.0.1:" in line and password_of(crv) not in line
    assert not (crv.home / "prefect" / "prefect.db").exists()  # Prefect is not on SQLite
    assert not (crv.home / "service" / "state.db").exists()
    with psycopg.connect(url_of(crv)) as conn:
        public = {
            r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        mine = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='crv_store'")
        }
    assert {"flow_run", "deployment", "alembic_version"} <= public  # Prefect's
    assert {"clusters", "nodes", "alembic_version"} <= mine  # crv's
    health = json.loads((crv.home / "service" / "daemon.json").read_text())
    assert health["url"].startswith("https://")
    assert (crv.home / "prefect" / "services.json").exists()  # Prefect's services apart


def test_a_cluster_lives_on_postgresql_across_a_restart(crv: Crv) -> None:
    r = crv("deploy", "webfarm", "--pool", "sim", "--name", "pgfarm", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    before = crv.status("pgfarm")
    assert before["ready"] and all(verified(n) for n in before["nodes"])
    r = crv("scale", "pgfarm", "worker", "4", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len([n for n in crv.status("pgfarm")["nodes"] if n["group"] == "worker"]) == 4
    r = crv("down")
    assert r.returncode == 0 and "postgresql" in r.stdout, r.stdout
    r = crv("up", timeout=300)  # the recorded database, its local server started again
    assert r.returncode == 0, r.stdout + r.stderr
    after = crv.status("pgfarm")  # the four web nodes, as before the restart
    assert len(after["nodes"]) == len(before["nodes"]) + 1
    assert all(verified(n) for n in after["nodes"])
    r = crv("destroy", "pgfarm", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pgfarm" not in crv("list").stdout


def test_a_deploy_rides_out_postgresql_going_away(crv: Crv) -> None:
    """PostgreSQL stops for 5 s in the middle of a deploy (agents enrolling): the service and
    Prefect answer 5xx meanwhile, which their clients retry. The deploy either completes or
    fails in one clean line, and then the same command converges; either way every node ends
    verified, and the cluster goes away whole."""
    from crv_cli.postgres import LocalPostgres

    log = crv.home / "service" / "service.log"
    mark = log.stat().st_size
    deploy = crv.popen(
        "deploy", "webfarm", "--pool", "sim", "--name", "pgout", "--set", "workers=4"
    )
    try:
        deadline = time.monotonic() + 120
        while b"enrolled pgout/" not in log.read_bytes()[mark:]:
            assert deploy.poll() is None, deploy.communicate()[0]
            assert time.monotonic() < deadline, "no node enrolled"
            time.sleep(0.1)
        database = LocalPostgres(crv.home / "postgres")
        database.stop()
        time.sleep(5)
        database.start()
        out, _ = deploy.communicate(timeout=600)
    finally:
        if deploy.poll() is None:
            deploy.kill()
    print(f"the deploy through a 5 s PostgreSQL outage: exit code {deploy.returncode}")
    if deploy.returncode != 0:  # failed, cleanly: then the same command converges
        assert "Traceback" not in out, out
        again = crv(
            "deploy",
            "webfarm",
            "--pool",
            "sim",
            "--name",
            "pgout",
            "--set",
            "workers=4",
            timeout=600,
        )
        assert again.returncode == 0, again.stdout + again.stderr
    found = crv.status("pgout")
    assert found["ready"] and len(found["nodes"]) == 5 and all(verified(n) for n in found["nodes"])
    r = crv("destroy", "pgout", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_password_is_nowhere_it_should_not_be(crv: Crv) -> None:
    password = password_of(crv).encode()
    for pid in processes_of(crv):
        try:
            assert password not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
        except FileNotFoundError:
            continue
    for log in [*crv.home.rglob("*.log"), *crv.home.rglob("*.json")]:
        assert password not in log.read_bytes(), log
    listed = crv("list", "--json")
    assert listed.returncode == 0 and password.decode() not in listed.stdout


def test_an_unreachable_database_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Crv(tmp_path / "home")
    r = c("up", "--database", f"postgresql://crv:Sup3rSecret@127.0.0.1:{port}/crv", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: database postgresql://crv:***@127.0.0.1:{port}/crv unreachable"
    ), lines
    assert "Sup3rSecret" not in r.stdout + r.stderr
    assert not (tmp_path / "home" / "service" / "daemon.json").exists()
    assert not (tmp_path / "home" / "prefect" / "daemon.json").exists()
    assert not (tmp_path / "home" / "service" / "database-url").exists()
    r = c("up", "--database", "mysql://x@y/z")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "postgresql://" in r.stderr
    env_url = f"postgresql://crv:Sup3rSecret@127.0.0.1:{port}/crv"
    c.env["CRV_DATABASE_URL"] = env_url
    r = c("up", timeout=120)
    assert r.returncode == 2 and "Sup3rSecret" not in r.stderr, r.stderr
    assert os.environ.get("CRV_DATABASE_URL") != env_url
