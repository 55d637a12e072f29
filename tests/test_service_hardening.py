"""Slow and hostile clients against the real service process over real TLS (issue 17, item 7).

The service runs with short bounds (HARDENING_ENV) so that each test takes seconds: a TLS
handshake or request headers not complete in time get the connection dropped, one client
address holds at most MAX_CONNS connections, and a flood of refused requests grows the log by a
bounded amount. A too-long value gets 413 whether it is too long by characters or by bytes.
The service process and its clients come from tests/test_service_security.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crv.base.home import Home
from crv.service.guard import MAX_LINE
from tests.test_service_security import (
    Service,
    _free_port,
    enrolled_cluster,
    make_csr,
    post_enrol,
    setup_cluster,
)

HANDSHAKE_TIMEOUT = 3.0
HEADER_TIMEOUT = 3.0
MAX_CONNS = 8
LOG_BURST = 10
LOG_WINDOW = 6.0
LOG_PER_KIND = 40
HARDENING_ENV = {
    "CRV_SERVICE_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT),
    "CRV_SERVICE_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
    "CRV_SERVICE_MAX_CONNS_PER_CLIENT": str(MAX_CONNS),
    "CRV_SERVICE_LOG_BURST": str(LOG_BURST),
    "CRV_SERVICE_LOG_WINDOW": str(LOG_WINDOW),
    "CRV_SERVICE_LOG_PER_KIND": str(LOG_PER_KIND),
}
SLACK = 3.0  # seconds a drop may come after its bound on a busy test machine


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("crv-home-hardening")
    service = Service(Home(root), _free_port(), root / "service-process.log")
    with pytest.MonkeyPatch.context() as env:
        for name, value in HARDENING_ENV.items():
            env.setenv(name, value)
        service.start()
    try:
        yield service
    finally:
        service.stop()


def _closed_by_peer(sock: socket.socket, within: float) -> tuple[float, bytes]:
    """Reads until the service closes the connection: (seconds it took, bytes received). A
    connection still open after `within` seconds fails the test."""
    started, received = time.monotonic(), b""
    sock.settimeout(0.2)
    while time.monotonic() - started < within:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        received += chunk
    else:
        pytest.fail(f"the service kept the connection open for {within} s")
    return time.monotonic() - started, received


def _settle() -> None:
    """Lets the service see the close of connections a previous step ended."""
    time.sleep(0.5)


# -- slow clients -------------------------------------------------------------------------------


def test_tls_handshake_not_finished_in_time_is_dropped(svc: Service) -> None:
    """One client sends nothing after TCP connect, another the start of a ClientHello only:
    both are dropped after the handshake timeout (asyncio's default would be 60 s)."""
    silent = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
    partial = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
    try:
        partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # a handshake record that never comes
        took, received = _closed_by_peer(silent, HANDSHAKE_TIMEOUT + 10)
        assert HANDSHAKE_TIMEOUT - 0.5 <= took <= HANDSHAKE_TIMEOUT + SLACK, took
        assert received == b""
        took_partial, _ = _closed_by_peer(partial, HANDSHAKE_TIMEOUT + 10)
        assert took_partial <= SLACK, took_partial  # its bound ran alongside the first one's
    finally:
        silent.close()
        partial.close()
    with svc.client() as client:  # the service itself is fine
        assert client.get("/v1/health").status_code == 200


def _tls(svc: Service) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
    return svc.context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_client_that_sends_no_request_after_the_handshake_is_dropped(svc: Service) -> None:
    with _tls(svc) as tls:
        took, received = _closed_by_peer(tls, HEADER_TIMEOUT + 10)
    assert HEADER_TIMEOUT - 0.5 <= took <= HEADER_TIMEOUT + SLACK, took
    assert received == b""


def test_slow_loris_headers_are_cut_off(svc: Service) -> None:
    """Request headers at one byte per second: the connection is dropped once the headers are
    not complete within the header timeout, without an answer and long before they would be."""
    request = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
    mark = svc.log_mark()
    with _tls(svc) as tls:
        tls.settimeout(0.2)
        started, sent, received, closed = time.monotonic(), 0, b"", False
        while not closed and time.monotonic() - started < HEADER_TIMEOUT + 10:
            try:
                tls.sendall(request[sent : sent + 1])
                sent += 1
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                break
            tick = time.monotonic()
            while not closed and time.monotonic() - tick < 1.0:  # one byte per second
                try:
                    chunk = tls.recv(4096)
                except TimeoutError:
                    continue
                except (ConnectionResetError, ssl.SSLError):
                    closed = True
                    break
                received += chunk
                closed = not chunk
        took = time.monotonic() - started
    assert closed or sent < len(request), "the service waited for the slow headers"
    assert took <= HEADER_TIMEOUT + SLACK, took
    assert sent < len(request) and b"HTTP/" not in received, (sent, received)
    assert f"no complete request headers within {HEADER_TIMEOUT:g} s" in svc.log_since(mark)


def test_idle_kept_alive_connections_and_long_polls_outlast_the_header_timeout(
    svc: Service,
) -> None:
    """The header timeout is about requests being sent: not about the wait between requests
    (uvicorn's keep-alive timeout) nor about a long poll the service holds."""
    with svc.admin() as admin:
        cl = enrolled_cluster(svc, admin, "hard-poll")
    with cl.client(svc, "hard-poll-web-0") as node:
        first = node.get("/v1/work", params={"wait": 0})
        assert first.status_code == 200, first.text
        generation = first.json()["generation"]
        port = _local_port(first)
        started = time.monotonic()
        r = node.get("/v1/work", params={"after": generation, "wait": HEADER_TIMEOUT + 1.5})
        assert r.status_code == 200, r.text
        assert time.monotonic() - started >= HEADER_TIMEOUT + 1  # it really was held
        time.sleep(HEADER_TIMEOUT + 1)  # idle on the kept-alive connection
        again = node.get("/v1/work", params={"wait": 0})
        assert again.status_code == 200, again.text
        assert _local_port(again) == port  # the same connection all along


def test_a_request_sent_while_the_service_was_held_up_is_answered(svc: Service) -> None:
    """The header timeout is the client's time, not the service's: a service that cannot read
    for longer than the bound (a blocking store call; here the process is stopped) answers the
    requests that arrived meanwhile instead of dropping their connections."""
    assert svc.proc is not None
    with _tls(svc) as tls:
        _wait_for_session_ticket(tls)  # the service's side of the handshake is done too
        os.kill(svc.proc.pid, signal.SIGSTOP)  # with its header timer running
        try:
            tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            time.sleep(HEADER_TIMEOUT + 1.5)
        finally:
            os.kill(svc.proc.pid, signal.SIGCONT)
        tls.settimeout(10)
        assert tls.recv(4096).startswith(b"HTTP/1.1 200 ")


def _wait_for_session_ticket(tls: ssl.SSLSocket, timeout: float = 10.0) -> None:
    """The client's handshake ends when it sends its Finished; the service's when it reads it,
    and then it sends its TLS 1.3 session tickets. Stopping the service before that would test
    the handshake timeout, not the header timeout."""
    deadline = time.monotonic() + timeout
    tls.settimeout(0.2)
    while not (tls.session is not None and tls.session.has_ticket):
        assert time.monotonic() < deadline, "no session ticket from the service"
        try:
            assert tls.recv(1) == b"", "the service sent data before any request"
            raise AssertionError("the service closed the connection after the handshake")
        except (TimeoutError, ssl.SSLWantReadError):
            pass
    tls.settimeout(5)


def _local_port(r: httpx.Response) -> int:
    stream = r.extensions["network_stream"]
    return int(stream.get_extra_info("client_addr")[1])


# -- connections per client address -------------------------------------------------------------


def _client(svc: Service, source: str = "127.0.0.1") -> httpx.Client:
    transport = httpx.HTTPTransport(verify=svc.context(), local_address=source)
    return httpx.Client(base_url=svc.url, transport=transport, timeout=10)


def test_connections_beyond_the_cap_per_address_are_refused(svc: Service) -> None:
    _settle()
    mark = svc.log_mark()
    clients: list[httpx.Client] = []
    try:
        admitted, answer = 0, None
        for _ in range(MAX_CONNS + 5):  # each client holds one kept-alive connection
            clients.append(_client(svc))
            r = clients[-1].get("/v1/health")
            if r.status_code != 200:
                answer = r
                break
            admitted += 1
        assert admitted == MAX_CONNS
        assert answer is not None and answer.status_code == 503, answer
        assert answer.headers["retry-after"] == "1"  # agents wait it out and retry
        assert answer.json() == {"detail": "too many connections from this address"}
        for _ in range(3):  # more from the same address: refused as well
            with _client(svc) as extra:
                assert extra.get("/v1/health").status_code == 503
        with _client(svc, "127.0.0.2") as elsewhere:  # the cap is per address
            assert elsewhere.get("/v1/health").status_code == 200
        for c in clients[:MAX_CONNS]:  # the connections already open keep working
            assert c.get("/v1/health").status_code == 200
        clients[0].close()  # closing one makes room for one
        _settle()
        with _client(svc) as next_one:
            assert next_one.get("/v1/health").status_code == 200
        assert (
            "refused a connection from 127.0.0.1: 8 connections open from it "
            "(CRV_SERVICE_MAX_CONNS_PER_CLIENT)"
        ) in svc.log_since(mark)
    finally:
        for c in clients:
            c.close()
    _settle()


# -- the log under a flood of refused requests --------------------------------------------------

FLOOD = 2000
REFUSED = "refused GET /v1/admin/clusters: "  # the kind: "refused %s %s: %s"
SHOWN = re.compile(r"crv\.service: refused (?:GET|POST) /")
HELD = re.compile(r"\[(\d+) similar lines suppressed\]")


def _flood(svc: Service, paths: list[str], threads: int = 4) -> None:
    """GET each path without a client certificate (each a 401 and, without the filter, a log
    line), over `threads` kept-alive connections."""
    statuses: list[int] = []

    def run(share: list[str]) -> None:
        with svc.client() as anonymous:
            for p in share:
                for attempt in range(3):  # a machine this loaded may miss the handshake bound
                    try:
                        statuses.append(anonymous.get(p).status_code)
                        break
                    except httpx.ConnectError:
                        if attempt == 2:
                            raise

    workers = [threading.Thread(target=run, args=(paths[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert statuses == [401] * len(paths)


def test_a_flood_of_refused_requests_grows_the_log_by_a_bounded_amount(svc: Service) -> None:
    one_line = len("2026-01-01 00:00:00,000 WARNING crv.service: " + REFUSED) + 60
    mark = svc.log_mark()
    started = time.monotonic()
    _flood(svc, ["/v1/admin/clusters"] * FLOOD)
    took = time.monotonic() - started
    # while the flood's kind is held back, another kind of refusal is still written
    _, csr = make_csr("hard-none-web-0")
    assert post_enrol(svc, "hard-none", "hard-none-web-0", "A" * 43, csr).status_code == 401
    grown = svc.log_mark() - mark
    windows = int(took // LOG_WINDOW) + 1
    bound = (windows * (LOG_BURST + 1) + 2) * one_line
    print(f"flood of {FLOOD} refused requests in {took:.1f} s: the log grew {grown} bytes")
    assert grown <= bound, (grown, bound, svc.log_since(mark)[-3000:])
    assert grown < FLOOD * one_line // 20  # without the filter: FLOOD lines
    flood_log = svc.log_since(mark)
    assert "this line again is suppressed for " in flood_log
    assert "enrolment refused: " in flood_log

    # once the window has passed, the next line says how many were held back: none is lost
    time.sleep(LOG_WINDOW + 0.5)
    with svc.client() as anonymous:
        assert anonymous.get("/v1/admin/clusters").status_code == 401
    text = svc.log_since(mark)
    shown = len(SHOWN.findall(text))
    held = sum(int(k) for k in HELD.findall(text))
    assert held > 0
    # the flood, the last request, and the refused enrolment's own "refused POST" line
    assert shown + held == FLOOD + 1 + 1, (shown, held)


def test_a_flood_of_refusals_that_all_differ_is_bounded_per_kind(svc: Service) -> None:
    """Paths of the caller's choosing make every line different: the bound on lines of one
    kind holds them, and the count held back is still told."""
    time.sleep(LOG_WINDOW + 0.5)  # a fresh window for the kind
    paths = [f"/v1/admin/clusters/c{i}/events" for i in range(FLOOD // 2)]
    one_line = len("2026-01-01 00:00:00,000 WARNING crv.service: refused GET ") + 80
    mark = svc.log_mark()
    started = time.monotonic()
    _flood(svc, paths)
    took = time.monotonic() - started
    grown = svc.log_mark() - mark
    windows = int(took // LOG_WINDOW) + 1
    print(f"flood of {len(paths)} different refusals in {took:.1f} s: the log grew {grown} bytes")
    assert grown <= (windows * (LOG_PER_KIND + 1) + 1) * one_line, grown
    assert "more lines of this kind are suppressed for " in svc.log_since(mark)
    time.sleep(LOG_WINDOW + 0.5)
    with svc.client() as anonymous:
        assert anonymous.get("/v1/admin/clusters/last/events").status_code == 401
    text = svc.log_since(mark)
    shown = len(re.findall(r"crv\.service: refused GET /v1/admin/clusters/\w+/events: ", text))
    held = sum(int(k) for k in HELD.findall(text))
    assert shown + held == len(paths) + 1, (shown, held)


def test_a_refused_request_with_a_huge_path_writes_one_short_line(svc: Service) -> None:
    path = "/v1/admin/clusters/" + "x" * 20_000 + "/events"
    time.sleep(LOG_WINDOW + 0.5)  # a fresh window: the line is written, not held back
    mark = svc.log_mark()
    with svc.client() as anonymous:
        assert anonymous.get(path).status_code == 401
    lines = [line for line in svc.log_since(mark).splitlines() if "refused GET" in line]
    assert len(lines) == 1, lines
    assert len(lines[0]) <= MAX_LINE + 100, len(lines[0])
    assert lines[0].endswith("more characters)")


# -- one limit, one status ----------------------------------------------------------------------


def test_a_value_too_long_by_characters_or_by_bytes_gets_the_same_status(svc: Service) -> None:
    with svc.admin() as admin:
        cl = enrolled_cluster(svc, admin, "hard-size")
    url = "/v1/attributes/web/blob"
    limit = 64 * 1024
    with cl.client(svc, "hard-size-web-0") as web:
        by_characters = web.put(url, json={"value": "v" * (limit + 1)})
        by_bytes = web.put(url, json={"value": "\U0001f600" * (limit // 4 + 1)})  # few chars
        assert (by_characters.status_code, by_bytes.status_code) == (413, 413), (
            by_characters.text,
            by_bytes.text,
        )
        # the limits themselves pass, counted either way
        assert web.put(url, json={"value": "v" * limit}).status_code == 204
        assert web.put(url, json={"value": "\U0001f600" * (limit // 4)}).status_code == 204
        # the recipe output of a status report: too many characters, or a body too large
        status = {"role": "web", "release": 1, "state": "running", "exit_code": None}
        r = web.post("/v1/status", json={**status, "output": "o" * (limit + 1)})
        assert r.status_code == 413, r.text
        r = web.post("/v1/status", json={**status, "output": "o" * (1 << 20)})
        assert r.status_code == 413, r.text
        # a name too long in a path is a bad name, not a size: still 400 (or 404)
        assert web.put("/v1/attributes/web/" + "k" * 64, json={"value": "x"}).status_code in (
            400,
            404,
        )


def test_an_enrolment_csr_too_long_by_characters_or_by_bytes_gets_the_same_status(
    svc: Service, tmp_path: Path
) -> None:
    with svc.admin() as admin:
        tokens = setup_cluster(svc, admin, "hard-csr")
    node = "hard-csr-web-0"
    body = {"cluster": "hard-csr", "node": node, "token": tokens[node]}
    with svc.client() as anonymous:
        by_characters = anonymous.post("/v1/enrol", json={**body, "csr": "c" * (16 * 1024 + 1)})
        by_bytes = anonymous.post("/v1/enrol", json={**body, "csr": "c" * (1 << 20)})
    assert (by_characters.status_code, by_bytes.status_code) == (413, 413)
    _, csr = make_csr(node)  # and the token was not spent on either
    assert post_enrol(svc, "hard-csr", node, tokens[node], csr).status_code == 200
