"""C6: a verify that fails fails the deploy (docs/appliances.md, `verify`).

Without these tests a verify that checks nothing would pass every other test. Each end-to-end
test deploys, through `crv deploy` on the local pool, two roles where `b` depends on `a` and `a`'s
check fails: an http check answered 500, a tcp check of a port nobody listens on, a command and
an on_node command that exit 1. Each asserts that the deploy exits 1 with one line naming the
step, the role, the node, the rendered check and what it saw; that the check ran once per attempt
(1 + --retries); that the service recorded `a` as verify_failed with that message; and that `b`
was never released (its recipe never ran on its node).

The unit tests below run verify.run against real sockets and processes: what each kind says.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from crv.base.home import Home
from crv.engine import verify
from crv.engine.verify import Check, VerifyFailed
from crv.service.client import Service
from tests.conftest import write_appliance
from tests.test_deploy_e2e import Crv, started_crv

RETRIES = 2  # --retries: every check runs 1 + 2 times

APPLIANCE = """\
apiVersion: crv/v1
name: {name}
parameters:
  port: {{type: integer, default: 9}}
  log: {{type: string, default: /dev/null}}
nodes:
  a: {{count: 1, roles: [a]}}
  b: {{count: 1, roles: [b]}}
roles:
  a:
    recipe: a.sh
    verify: {verify}
    estimates: {{verify: 1}}
  b: {{recipe: b.sh, depends_on: [a]}}
"""


class Counting(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 answering every GET with 500 and a two-line body, counting."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _Answer500)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Answer500(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        assert isinstance(self.server, Counting)
        self.server.paths.append(self.path)
        body = b"database is down\n\x1b[31mretry later\n"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def answering_500() -> Iterator[Counting]:
    server = Counting()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 bound but not listening: a connection is refused, and nothing else
    can take the port meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


# -- end to end: crv deploy on the local pool ----------------------------------------------------


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    yield from started_crv(tmp_path_factory)


def failing_appliance(root: Path, name: str, verify_yaml: str) -> Path:
    app = write_appliance(root, name, APPLIANCE.format(name=name, verify=verify_yaml))
    for role in ("a", "b"):  # each leaves a mark in its node's work directory and its log
        recipe = app / f"{role}.sh"
        recipe.write_text(f'#!/bin/sh\necho "{role} ran on $CRV_NODE" | tee -a ran-{role}.txt\n')
        recipe.chmod(0o755)
    return app


def deploy_fails(crv: Crv, app: Path, *sets: str) -> str:
    """`crv deploy` of `app` with --retries RETRIES: it exits 1; its last stderr line (the one
    line of the error), checked to be the only trace of the failure on stderr."""
    args = [a for s in sets for a in ("--set", s)]
    r = crv("deploy", str(app), "--retries", str(RETRIES), *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: deploy of {app.name} failed: "), r.stderr
    return line


def assert_b_never_released(crv: Crv, cluster: str, message: str) -> None:
    """`a` on its node verify_failed, recorded with `message`; `b`'s node enrolled (it was
    there to be released) but `b` still pending: no release, its recipe never ran."""
    status = crv.status(cluster)
    assert not status["ready"]
    nodes = {n["name"]: n for n in status["nodes"]}
    a, b = nodes[f"{cluster}-a-0"], nodes[f"{cluster}-b-0"]
    assert a["roles"] == {"a": "verify_failed"}
    assert (b["state"], b["roles"]) == ("enrolled", {"b": "pending"})

    record = json.loads((crv.home / "service" / "daemon.json").read_text())
    full = Service(Home(crv.home), record["url"]).status(cluster)
    assert full is not None
    roles = {n["name"]: n["roles"] for n in full["nodes"]}
    assert roles[f"{cluster}-a-0"]["a"]["output"] == message  # what `crv deploy` said
    b_record = roles[f"{cluster}-b-0"]["b"]
    assert (b_record["state"], b_record.get("release", 0)) == ("pending", 0)  # never released

    pool = crv.home / "pools" / "local"
    assert (pool / f"{cluster}-a-0/work/ran-a.txt").read_text().count("a ran") == 1
    assert not (pool / f"{cluster}-b-0/work/ran-b.txt").exists()
    assert not (pool / f"{cluster}-b-0/logs/b.log").exists()


def destroyed(crv: Crv, cluster: str) -> None:
    d = crv("destroy", cluster)
    assert d.returncode == 0, d.stdout + d.stderr
    assert "2 nodes removed" in d.stdout


def verify_message(line: str, cluster: str, attempts: int) -> str:
    """The part of the failure line the service recorded for `a` (from `verify of a ...`),
    after checking the part in front: the failed step and its attempts."""
    head = f"error: deploy of {cluster} failed: {cluster}-a-0:verify:a failed after "
    assert line.startswith(f"{head}{attempts} attempts: verify of a on {cluster}-a-0 ("), line
    return line.split(" attempts: ", 1)[1]


@pytest.mark.faults
def test_http_verify_answered_500_fails_the_deploy_after_its_retries(
    crv: Crv, tmp_path: Path, answering_500: Counting
) -> None:
    app = failing_appliance(
        tmp_path, "vf-http", '{http: "http://127.0.0.1:{{ params.port }}/health"}'
    )
    line = deploy_fails(crv, app, f"port={answering_500.port}")
    url = f"http://127.0.0.1:{answering_500.port}/health"
    message = verify_message(line, "vf-http", RETRIES + 1)
    # the body's escape sequence is shown as ?, its lines joined
    assert message == (
        f"verify of a on vf-http-a-0 (http {url}) failed: HTTP 500: database is down | "
        "?[31mretry later"
    )
    assert answering_500.paths == ["/health"] * (RETRIES + 1)
    assert_b_never_released(crv, "vf-http", message)
    destroyed(crv, "vf-http")


@pytest.mark.faults
def test_tcp_verify_of_a_port_nobody_listens_on_fails_the_deploy(
    crv: Crv, tmp_path: Path, closed_port: int
) -> None:
    app = failing_appliance(
        tmp_path, "vf-tcp", '{tcp: "{{ node.address }}:{{ params.port }}"}'
    )  # the node's own address: its service is down
    line = deploy_fails(crv, app, f"port={closed_port}")
    address = next(n["address"] for n in crv.status("vf-tcp")["nodes"] if n["group"] == "a")
    assert address
    message = verify_message(line, "vf-tcp", RETRIES + 1)
    assert message == (
        f"verify of a on vf-tcp-a-0 (tcp {address}:{closed_port}) failed: connection refused"
    )
    assert_b_never_released(crv, "vf-tcp", message)
    destroyed(crv, "vf-tcp")


@pytest.mark.faults
def test_command_verify_exiting_1_fails_the_deploy_with_the_tail_of_its_output(
    crv: Crv, tmp_path: Path
) -> None:
    log = tmp_path / "checks log.txt"  # a space: the parameter reaches sh quoted
    command = (
        "echo attempt on {{ node.name }} >> {{ params.log }}; echo checking replication; "
        "echo replica lag 42 s >&2; exit 1"
    )
    app = failing_appliance(tmp_path, "vf-cmd", json.dumps({"command": command}))
    line = deploy_fails(crv, app, f"log={log}")
    rendered = (
        f"echo attempt on vf-cmd-a-0 >> '{log}'; echo checking replication; "
        "echo replica lag 42 s >&2; exit 1"
    )
    message = verify_message(line, "vf-cmd", RETRIES + 1)
    assert message == (
        f"verify of a on vf-cmd-a-0 (command {rendered}) failed: "
        "exited 1: checking replication | replica lag 42 s"
    )
    assert log.read_text().splitlines() == ["attempt on vf-cmd-a-0"] * (RETRIES + 1)
    assert_b_never_released(crv, "vf-cmd", message)
    destroyed(crv, "vf-cmd")


@pytest.mark.faults
def test_on_node_verify_exiting_1_fails_the_deploy_with_what_the_agent_reported(
    crv: Crv, tmp_path: Path
) -> None:
    command = 'echo "try on $CRV_NODE" >> checks.txt; echo not serving yet >&2; exit 1'
    app = failing_appliance(tmp_path, "vf-node", json.dumps({"on_node": {"command": command}}))
    line = deploy_fails(crv, app)
    message = verify_message(line, "vf-node", RETRIES + 1)
    assert message == (
        f"verify of a on vf-node-a-0 (on_node {command}) failed: "
        "on the node, exited 1: not serving yet"
    )
    checks = crv.home / "pools" / "local" / "vf-node-a-0" / "work" / "checks.txt"
    assert checks.read_text().splitlines() == ["try on vf-node-a-0"] * (RETRIES + 1)
    assert_b_never_released(crv, "vf-node", message)
    destroyed(crv, "vf-node")


# -- unit: what each kind of check says when it fails ---------------------------------------------


def failure(check: Check) -> str:
    async def go() -> str:
        async with httpx.AsyncClient() as http:
            with pytest.raises(VerifyFailed) as e:
                await verify.run(check, http)
        return str(e.value)

    return asyncio.run(go())


def test_http_says_the_status_and_the_start_of_the_body(answering_500: Counting) -> None:
    url = f"http://127.0.0.1:{answering_500.port}/x"
    assert failure(Check("http", url)) == "HTTP 500: database is down | ?[31mretry later"


def test_http_and_tcp_to_a_closed_port_say_connection_refused(closed_port: int) -> None:
    assert failure(Check("http", f"http://127.0.0.1:{closed_port}/")) == "connection refused"
    assert failure(Check("tcp", f"127.0.0.1:{closed_port}")) == "connection refused"


def test_http_tcp_to_an_unknown_name_and_a_bad_target_say_so() -> None:
    assert failure(Check("http", "http://nowhere.invalid/")).startswith("name not found: ")
    assert failure(Check("tcp", "nowhere.invalid:80")).startswith("name not found: ")
    assert failure(Check("tcp", "no-port")) == "not HOST:PORT"


def test_command_says_its_exit_code_and_its_last_lines_in_one_line() -> None:
    command = "for i in 1 2 3 4 5 6 7; do echo line $i; done; echo boom >&2; exit 3"
    assert failure(Check("command", command)) == (
        "exited 3: line 4 | line 5 | line 6 | line 7 | boom"
    )
    assert failure(Check("command", "exit 1")) == "exited 1: (no output)"


def test_what_a_node_reported_is_one_line_without_its_control_characters() -> None:
    # on_node: crv.engine.stages raises VerifyFailed("on the node, " + exited(...))
    said = verify.exited(2, "\n\x1b[2Jstarting\n\n  ready? no\n")
    assert said == "exited 2: ?[2Jstarting | ready? no"
    assert str(VerifyFailed("first\nsecond\r\n")) == "first | second"
    assert re.fullmatch(r"exited 1: x{2000}", verify.exited(1, "y" + "x" * 5000))
