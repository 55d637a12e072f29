"""Runs the service: uvicorn over HTTPS with optional client certificates, verified by the CA.

uvicorn does not hand the client certificate to the application, so a small protocol subclass
puts the verified peer certificate (DER) into each request's state; routes then authorize by it.
The same subclass bounds what one client can hold (crv.service.guard): connections per address
and the time to send a request's headers; the loop bounds the TLS handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import Engine
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from crv.base.errors import PkiError
from crv.base.home import Home
from crv.base.netns import listen_in
from crv.service.app import create_app
from crv.service.database import conninfo, database_url, open_engine, redact
from crv.service.guard import (
    ENV_HEADER_TIMEOUT,
    ENV_MAX_CONNS,
    ConnectionGuard,
    Limits,
    install_log_filter,
    loop_factory,
)
from crv.service.pki import CertificateAuthority, node_ttl_from_env
from crv.service.settings import service_processes, store_threads
from crv.service.store import Store

log = logging.getLogger("crv.service")


_BUSY = b'{"detail": "too many connections from this address"}'
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
    + str(len(_BUSY)).encode()
    + b"\r\n\r\n"
    + _BUSY
)


STALL = 0.5  # seconds late a header timer fires when the service's loop was held up
STALL_GRACE = 1.0  # seconds more such a connection gets to have its bytes read


class TlsPeerHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn does not pass the client certificate to the app: each connection puts the
    verified peer certificate (DER) into its requests' state.

    It also refuses a connection beyond the cap on its client address (503 with Retry-After,
    which agents wait out, then closed), and closes one whose request headers are not complete
    within the header timeout, counted from the connection (a client that sends nothing) or
    from the request's first byte (slow-loris). uvicorn's keep-alive timeout covers the idle
    time between requests."""

    guard: ClassVar[ConnectionGuard] = ConnectionGuard(Limits())

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._address: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_deadline = 0.0
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        # per connection: the shared app_state dict is copied, not mutated
        self.app_state = {**self.app_state, "tls_peer_cert": der}
        address = self.client[0] if self.client else ""
        if not self.guard.admit(address):
            log.warning(
                "refused a connection from %s: %d connections open from it (%s)",
                address,
                self.guard.open[address],
                ENV_MAX_CONNS,
            )
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._address = address
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._address is not None:
            self.guard.release(self._address)
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._address is None:  # refused: nothing it sends is read
            return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # unless the connection's own is still running

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self, delay: float | None = None) -> None:
        if self._header_timer is None:
            delay = self.guard.limits.header_timeout if delay is None else delay
            self._header_deadline = self.loop.time() + delay
            self._header_timer = self.loop.call_later(delay, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.loop.time() - self._header_deadline > STALL:
            # the service itself was busy (a blocking store call, a paused process): bytes the
            # client sent meanwhile are not read yet. A moment more lets the loop read them
            self._arm_header_timer(STALL_GRACE)
            return
        log.warning(
            "closed a connection from %s: no complete request headers within %g s (%s)",
            self._address,
            self.guard.limits.header_timeout,
            ENV_HEADER_TIMEOUT,
        )
        self.transport.abort()  # at once: no TLS close_notify exchange with a slow client


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _still_valid(cert_path: Path, margin: timedelta = timedelta(days=7)) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc > datetime.now(timezone.utc) + margin


def _names(cert_path: Path, address: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return ipaddress.ip_address(address) in san.get_values_for_type(x509.IPAddress)


def ensure_credentials(
    home: Home, ca: CertificateAuthority, also: Sequence[str] = ()
) -> tuple[Path, Path]:
    """The server's TLS pair and the admin client pair, renewed when near expiry. The server
    certificate names localhost, 127.0.0.1 and this host, which is what agents dial, the
    address in CRV_SERVICE_ADDRESS (where real machines reach the service), if set, and the
    addresses in `also` (the service's listeners inside the lab)."""
    home.ensure()
    server_crt, server_key = home.service_dir / "server.crt", home.service_dir / "server.key"
    env = os.environ.get("CRV_SERVICE_ADDRESS", "").strip()
    extra = sorted({a for a in (env, *also) if a})
    if not _still_valid(server_crt) or not all(_names(server_crt, a) for a in extra):
        addresses = ["127.0.0.1", "::1", *extra]
        try:  # the host name too, when it is a valid DNS name
            key_pem, cert = ca.issue_server_certificate(
                ["localhost", socket.gethostname().lower()], addresses
            )
        except PkiError:
            key_pem, cert = ca.issue_server_certificate(["localhost"], addresses)
        _write_private(server_key, key_pem)
        server_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if not _still_valid(home.admin_cert):
        key_pem, cert = ca.issue_admin_certificate()
        _write_private(home.admin_key, key_pem)
        home.admin_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return server_crt, server_key


def ssl_context(home: Home, server_crt: Path, server_key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(server_crt, server_key)
    ctx.load_verify_locations(home.ca_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL  # enrolment has no certificate yet; routes decide
    return ctx


def _raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one: the cap per client address is only a
    cap below it (the sim pool does the same for its side)."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


RESTART_PAUSE = 1.0  # seconds before a service process that died is started again


def serve(
    home: Home,
    host: str,
    port: int,
    netns: Sequence[tuple[Path, str]] = (),
    processes: int | None = None,
) -> None:
    """Serve on (host, port), and on the same port at each (namespace, address) of `netns`:
    a listener inside a lab's network namespace (crv.base.netns), where its guests dial.

    With several processes (PostgreSQL) this one binds the sockets, migrates the store and
    supervises the processes that serve: each accepts on the same sockets, and one that dies
    is started again."""
    _logging()
    _raise_open_files_limit()
    ca = CertificateAuthority.create_or_load(home.ca_dir)
    ensure_credentials(home, ca, [address for _, address in netns])
    url = database_url(home)
    n = processes or service_processes(url is not None)
    engine = open_engine(url or home.database)  # the schema up to date, before anyone serves
    sockets = [_listen(host, port)] + [listen_in(path, addr, port) for path, addr in netns]
    if n == 1:
        _serve(home, sockets, engine, n)
        return
    engine.dispose()
    log.info("serving with %d processes on %s (%s)", n, home.root, redact(url or ""))
    _supervise(home, sockets, n)


def _logging(several: bool = False) -> None:
    """The daemon's log: with several processes each line names the process that wrote it."""
    who = "[%(process)d] " if several else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"
    )


def _serve(home: Home, sockets: list[socket.socket], engine: Engine | None, processes: int) -> None:
    """One service process: the app on `sockets` until SIGTERM."""
    limits = Limits.from_env()
    ca = CertificateAuthority.create_or_load(home.ca_dir)
    server_crt, server_key = home.service_dir / "server.crt", home.service_dir / "server.key"
    url = database_url(home)
    threads = store_threads(url is not None)
    if engine is None:
        engine = open_engine(url or home.database, migrate=False, pool_size=threads)
    store = Store(engine)
    app = create_app(
        store,
        ca,
        node_ttl=node_ttl_from_env(),
        threads=threads,
        bus=conninfo(url) if url is not None and processes > 1 else None,
        processes=processes,
    )
    config = uvicorn.Config(
        app,
        http=TlsPeerHttpToolsProtocol,
        loop="uvloop",
        log_level="warning",
        timeout_keep_alive=60,
        ssl_certfile=str(server_crt),  # makes uvicorn report https; the context is ours
        ssl_keyfile=str(server_key),
    )
    config.load()
    config.ssl = ssl_context(home, server_crt, server_key)
    install_log_filter(limits)  # after uvicorn.Config, which sets up uvicorn's handlers
    TlsPeerHttpToolsProtocol.guard = ConnectionGuard(limits)
    server = uvicorn.Server(config)
    # Server.run() would make a plain uvloop loop: ours bounds the TLS handshake
    factory = loop_factory(limits)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(server.serve(sockets=sockets))
    else:
        loop = factory()
        try:
            loop.run_until_complete(server.serve(sockets=sockets))
        finally:
            loop.close()


def _process(home: Home, sockets: list[socket.socket], processes: int) -> None:
    """The target of a supervised service process (spawned: a fresh interpreter)."""
    _logging(several=True)
    _raise_open_files_limit()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent decides
    _serve(home, sockets, None, processes)


def _supervise(home: Home, sockets: list[socket.socket], n: int) -> None:
    """Start `n` service processes on the shared sockets, start again one that dies, and stop
    them all on SIGTERM or SIGINT."""
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def stop(signum: int, _: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    running: dict[int, multiprocessing.process.BaseProcess] = {}

    def start(i: int) -> None:
        p = context.Process(target=_process, args=(home, sockets, n), name=f"crv-service-{i}")
        p.start()
        running[i] = p

    for i in range(n):
        start(i)
    while not stopping.wait(0.5):
        for i, p in list(running.items()):
            if not p.is_alive() and not stopping.is_set():
                log.warning("service process %s exited (%s); starting another", p.pid, p.exitcode)
                stopping.wait(RESTART_PAUSE)
                if not stopping.is_set():
                    start(i)
    for p in running.values():
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 15
    for p in running.values():
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
