"""The service on PostgreSQL with several processes behind one port (crv.service.server,
crv.service.wakeups): a real PostgreSQL started by the test run, the real service process
(`python -m crv.service`, CRV_SERVICE_PROCESSES=2), real mutual-TLS clients.

Which process serves a connection is the kernel's choice; the tests find out from /proc (the
process that owns the accepted socket) and open connections until both processes hold some, so
each cross-process path (a long poll woken by a change another process made, a revocation
another process must honour) is really crossed."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crv.service.database import redact
from crv_cli.postgres import LocalPostgres
from tests.test_service_security import (
    Service,
    enrol,
    issue_tokens,
    node_client,
    setup_cluster,
    started_service,
)

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 2


@pytest.fixture(scope="module")
def database(local_postgres: LocalPostgres) -> str:
    return local_postgres.create_database("svcprocs")


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, database: str) -> Iterator[Service]:
    yield from started_service(
        tmp_path_factory, CRV_DATABASE_URL=database, CRV_SERVICE_PROCESSES=str(PROCESSES)
    )


def children(svc: Service) -> list[int]:
    """The service processes serving (the spawned children of the supervisor, not
    multiprocessing's resource tracker)."""
    assert svc.proc is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == svc.proc.pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(int(m.group(1)))
    return inodes


def owner_of(svc: Service, client_port: int) -> int | None:
    """The service process holding the accepted end of the connection from `client_port`."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        local_port = int(fields[1].split(":")[1], 16)
        if remote_port == client_port and local_port == svc.port:
            inode = int(fields[9])
    if inode is None:
        return None
    for pid in children(svc):
        if inode in _socket_inodes(pid):
            return pid
    return None


def spread_clients(svc: Service, make: object, want: int = 2, most: int = 40) -> list[httpx.Client]:
    """Kept-alive clients (one connection each) until the service processes hold at least
    `want` of them each: every test crosses processes for sure."""
    clients: list[httpx.Client] = []
    held: dict[int, int] = {}
    while len(clients) < most:
        client = make()  # type: ignore[operator]
        assert client.get("/v1/health").status_code == 200
        port = _client_port(client)
        owner = owner_of(svc, port)
        assert owner is not None, f"no service process holds the connection from port {port}"
        held[owner] = held.get(owner, 0) + 1
        clients.append(client)
        if len(held) == PROCESSES and min(held.values()) >= want:
            return clients
    pytest.fail(f"{most} connections and the processes hold {held}")


def _client_port(client: httpx.Client) -> int:
    """The local port of the client's one pooled connection."""
    pool = client._transport._pool  # type: ignore[attr-defined]
    (conn,) = pool.connections
    stream = conn._connection._network_stream
    return int(stream.get_extra_info("client_addr")[1])


def test_health_names_postgresql_and_the_processes_serve(svc: Service, database: str) -> None:
    with svc.client() as c:
        health = c.get("/v1/health").json()
    assert health["database"] == "postgresql"
    assert health["processes"] == PROCESSES
    assert len(children(svc)) == PROCESSES
    password = database.split(":")[2].split("@")[0]
    assert password and redact(database).count(password) == 0
    for pid in [svc.proc.pid, *children(svc)]:  # type: ignore[union-attr]
        assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert password not in svc.log.read_text()


def test_a_long_poll_answers_a_change_made_through_another_process(svc: Service) -> None:
    """Agents' polls held by both processes; the release comes through one connection (one
    process): every poll answers within a second, not at its 25 s end."""
    with svc.admin() as admin:
        tokens = setup_cluster(svc, admin, "lp", nodes=[("lp-web-0", "web")])
    creds = enrol(svc, "lp", "lp-web-0", tokens["lp-web-0"])
    clients = spread_clients(svc, lambda: node_client(svc, creds))
    try:
        first = clients[0].get("/v1/work").json()
        after = first["generation"]

        def poll(c: httpx.Client) -> tuple[float, int]:
            r = c.get("/v1/work", params={"after": after, "wait": 25}, timeout=40)
            assert r.status_code == 200, r.text
            return time.monotonic(), r.json()["generation"]

        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            futures = [pool.submit(poll, c) for c in clients]
            time.sleep(1.5)  # every poll waiting
            assert not any(f.done() for f in futures)
            with svc.admin() as admin:
                released = time.monotonic()
                r = admin.post(
                    "/v1/admin/clusters/lp/roles",
                    json={"updates": [{"node": "lp-web-0", "role": "web", "op": "release"}]},
                )
                assert r.status_code == 200, r.text
            answers = [f.result(timeout=30) for f in futures]
        late = max(at - released for at, _ in answers)
        assert all(gen > after for _, gen in answers)
        assert late < 2.0, f"a poll answered {late:.1f} s after the release"
    finally:
        for c in clients:
            c.close()


def test_a_superseded_certificate_is_refused_by_every_process(svc: Service) -> None:
    """The node enrols again (a new token, a new key): its old certificate is revoked through
    one process, and connections the other process accepted earlier with it (its roles cached
    there as current) are refused from then on, while the node itself stays."""
    with svc.admin() as admin:
        tokens = setup_cluster(svc, admin, "rv", nodes=[("rv-web-0", "web")])
    old = enrol(svc, "rv", "rv-web-0", tokens["rv-web-0"])
    clients = spread_clients(svc, lambda: node_client(svc, old))
    try:
        for c in clients:
            assert c.get("/v1/work").status_code == 200  # cached as current everywhere
        with svc.admin() as admin:
            again = issue_tokens(svc, admin, "rv", ["rv-web-0"])
        new = enrol(svc, "rv", "rv-web-0", again["rv-web-0"])
        deadline = time.monotonic() + 2.0
        pending = list(clients)
        while pending and time.monotonic() < deadline:
            pending = [c for c in pending if c.get("/v1/work").status_code != 403]
            time.sleep(0.05)
        assert not pending, f"{len(pending)} connections still served with the old certificate"
        with node_client(svc, new) as c:
            assert c.get("/v1/work").status_code == 200
    finally:
        for c in clients:
            c.close()


def test_a_killed_service_process_is_replaced(svc: Service) -> None:
    before = children(svc)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = children(svc)
        if len(now) == PROCESSES and victim not in now:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"service processes {children(svc)} after killing {victim} of {before}")
    for _ in range(10):  # new connections are served by whichever process takes them
        with svc.client() as c:
            assert c.get("/v1/health").status_code == 200
    assert f"service process {victim} exited" in svc.log.read_text()


def run_service(home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crv.service", "--port", "0"],
        env={**os.environ, "CRV_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_several_processes_on_sqlite_is_refused_in_one_line(tmp_path: Path) -> None:
    r = run_service(tmp_path, CRV_SERVICE_PROCESSES="2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: CRV_SERVICE_PROCESSES=2: several service processes need PostgreSQL "
        "(CRV_DATABASE_URL); on SQLite the service runs one"
    ]


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    url = f"postgresql://crv:Sup3rSecret@127.0.0.1:{port}/crv"
    r = run_service(tmp_path, CRV_DATABASE_URL=url)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: database postgresql://crv:***@127.0.0.1:{port}/crv ")
    assert "Sup3rSecret" not in r.stderr + r.stdout


def test_the_service_rides_out_a_postgresql_restart(
    svc: Service, local_postgres: LocalPostgres
) -> None:
    """PostgreSQL restarts under the service: its pooled connections are dead. The next
    requests are answered (a dropped connection is replaced and the transaction runs again),
    and the processes listen to each other again (a poll still answers a change made
    through the other process)."""
    with svc.admin() as admin:
        tokens = setup_cluster(svc, admin, "pr", nodes=[("pr-web-0", "web")])
    creds = enrol(svc, "pr", "pr-web-0", tokens["pr-web-0"])
    clients = spread_clients(svc, lambda: node_client(svc, creds), want=1)
    try:
        for c in clients:
            assert c.get("/v1/work").status_code == 200
        local_postgres.stop()
        local_postgres.start()
        after = clients[0].get("/v1/work").json()["generation"]
        for c in clients:  # each process's pool: dead connections, replaced on use
            assert c.get("/v1/work").status_code == 200
        deadline = time.monotonic() + 10
        while "listening for the other service processes again" not in svc.log.read_text():
            assert time.monotonic() < deadline, "the bus did not listen again"
            time.sleep(0.2)

        def poll(c: httpx.Client) -> int:
            r = c.get("/v1/work", params={"after": after, "wait": 25}, timeout=40)
            assert r.status_code == 200, r.text
            return int(r.json()["generation"])

        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            futures = [pool.submit(poll, c) for c in clients]
            time.sleep(1.0)
            with svc.admin() as admin:
                r = admin.post(
                    "/v1/admin/clusters/pr/roles",
                    json={"updates": [{"node": "pr-web-0", "role": "web", "op": "release"}]},
                )
                assert r.status_code == 200, r.text
            assert all(g > after for g in (f.result(timeout=5) for f in futures))
    finally:
        for c in clients:
            c.close()


def test_a_locked_database_does_not_stop_the_service_answering(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SQLite, one process: another program holds the database's write lock, so a node's
    write waits in the store (up to its 5 s busy timeout). Meanwhile the service answers
    health checks on new connections at once: the store's calls run off the event loop."""
    import sqlite3

    for one in started_service(tmp_path_factory):
        with one.admin() as admin:
            tokens = setup_cluster(one, admin, "lk", nodes=[("lk-web-0", "web")])
        creds = enrol(one, "lk", "lk-web-0", tokens["lk-web-0"])
        holder = sqlite3.connect(one.home.database, timeout=1, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with (
                node_client(one, creds) as c,
                concurrent.futures.ThreadPoolExecutor(1) as pool,
            ):
                put = pool.submit(c.put, "/v1/attributes/web/k", json={"value": "v"})
                time.sleep(0.5)
                assert not put.done()  # waiting for the lock
                slowest = 0.0
                for _ in range(5):
                    began = time.monotonic()
                    with one.client() as h:
                        assert h.get("/v1/health").status_code == 200
                    slowest = max(slowest, time.monotonic() - began)
                assert slowest < 0.5, f"a health check took {slowest:.2f} s"
                holder.execute("ROLLBACK")
                assert put.result(timeout=10).status_code == 204
        finally:
            holder.close()


def test_an_attribute_set_through_one_process_is_read_through_the_other(svc: Service) -> None:
    """Each process keeps recent blackboard answers: a value set through one process reaches
    readers on both at once (the set drops the other process's answers through the bus)."""
    with svc.admin() as admin:
        tokens = setup_cluster(svc, admin, "at", nodes=[("at-web-0", "web"), ("at-lb-0", "lb")])
    web = enrol(svc, "at", "at-web-0", tokens["at-web-0"])
    lb = enrol(svc, "at", "at-lb-0", tokens["at-lb-0"])
    readers = spread_clients(svc, lambda: node_client(svc, lb), want=1)
    try:
        with node_client(svc, web) as writer:
            for value in ("one", "two", "three"):
                for r in readers:  # every process has the old answer (or none) at hand
                    assert r.get("/v1/attributes/web/port").status_code == 200
                assert (
                    writer.put("/v1/attributes/web/port", json={"value": value}).status_code == 204
                )
                deadline = time.monotonic() + 0.5
                for r in readers:
                    while True:
                        got = r.get("/v1/attributes/web/port").json()["values"]
                        if got == [{"node": "at-web-0", "value": value}]:
                            break
                        assert time.monotonic() < deadline, f"{got} after setting {value}"
                        time.sleep(0.01)
    finally:
        for r in readers:
            r.close()
