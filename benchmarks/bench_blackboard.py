"""The blackboard under load: 1,000 agents, each with its own certificate and one kept-alive
mutual-TLS connection, polling `/v1/work` and reading attributes as fast as they can.

The real crv service, started as `crv up` starts it (without Prefect) under a temporary
CRV_HOME, and one cluster of N nodes registered through the admin API. Every node enrols over
the real `POST /v1/enrol` with its own P-256 key and CSR, as the agent does; half of them then
set one attribute (`PUT /v1/attributes/web/kJ`, J such that each key has --values values). The
agents are split among --clients load-generator processes (asyncio on uvloop, hand-written
HTTP/1.1: a general client costs more CPU per request than the service and would measure
itself). Each agent alternates `GET /v1/work?after=G&wait=0` and `GET /v1/attributes/web/kJ`
back to back for --seconds after a warm-up; every request's latency and status is recorded.
Meanwhile the main process checks `GET /v1/health` on a new connection (TLS handshake
included, the crv CA pinned) every 0.5 s. Prints requests/s, latency percentiles, errors by
status, the health check's latency, the CPU per request of the service (its processes and
their children) and of the load generators, and the ratios to the targets of issue 21: at
least 5,000 requests/s with p99 under 50 ms, and a health check under 100 ms throughout, on
2 cores. The load generators share the machine with the service.

The benchmark's environment is the service's: `--database URL` sets CRV_DATABASE_URL and
`--processes N` CRV_SERVICE_PROCESSES for it (several processes need PostgreSQL). On
PostgreSQL the cluster is deleted at the end (the database outlives the run).

    python -m benchmarks.bench_blackboard [--agents 1000] [--seconds 20] [--clients 2]
        [--warmup 2] [--values 10] [--database URL] [--processes N] [--json]
    python -m benchmarks.bench_blackboard --smoke    # 20 agents, 2 s, 1 client (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

from benchmarks import exit_on_sigterm
from crv.base.home import Home
from crv.base.running import DaemonError, read_record, service_record
from crv.service.client import AsyncService, ServiceError
from crv.service.database import ENV_DATABASE_URL, database_url, redact
from crv.service.guard import DEFAULT_MAX_CONNS, ENV_MAX_CONNS
from crv.service.settings import ENV_PROCESSES, ServiceConfigError, service_processes
from crv_cli import daemons

TARGET_RPS = 5000.0
TARGET_P99_MS = 50.0
TARGET_HEALTH_MS = 100.0
HEALTH_EVERY = 0.5  # seconds between health checks on a new connection
ROLE = "web"
SETUP_CONCURRENCY = 16  # enrolments and handshakes in flight per load generator
SETUP_TIMEOUT = 600.0  # seconds for every agent of a load generator to enrol, or to connect
END_GRACE = 10.0  # seconds a request in flight at the end may take before it counts as hung
TICK = os.sysconf("SC_CLK_TCK")

Failures = dict[str, int]  # what went wrong ("503", "ConnectionResetError") -> how often


# -- one agent's side: the wire ---------------------------------------------------------------


class Http:
    """HTTP/1.1 over one kept-alive TLS connection, just enough for the crv service (uvicorn
    answers with Content-Length, or chunked): requests are pre-built bytes, the answer is
    read by its length. Raises OSError, ssl.SSLError or asyncio's stream errors below HTTP."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.host, self.port, self.ctx = host, port, ctx
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ctx, server_hostname=self.host
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            await self.open()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            body = await reader.readexactly(int(head[at + 17 : head.index(b"\r\n", at + 2)]))
        elif b"\r\ntransfer-encoding: chunked" in head:
            chunks = bytearray()
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunks += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
            body = bytes(chunks)
        else:
            body = b""
        if b"\r\nconnection: close" in head:
            self.close()
        return status, body


def request(method: str, path: str, host: str, payload: Any = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: crv-bench\r\n"
    if payload is None:
        return f"{head}\r\n".encode()
    data = json.dumps(payload).encode()
    return (
        f"{head}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )


TRANSPORT_ERRORS = (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


# -- one load-generator process ---------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one simulated agent is: its node and token, the key it sets (if any), the key it
    reads."""

    node: str
    token: str
    writes: str | None
    reads: str


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    cluster: str
    ca_pem: str


@dataclass
class Agent:
    plan: Plan
    http: Http
    generation: int = 0


@dataclass
class Tally:
    """What a load generator measured: latencies (s) of the requests inside the window, and
    everything that went wrong from the start of the load (warm-up included)."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    failures: Failures = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)  # a failure -> its first detail

    def fail(self, what: str, detail: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1
        self.samples.setdefault(what, detail[:300])


class SetupError(Exception):
    pass


async def enrol(target: Target, plan: Plan, ca: ssl.SSLContext) -> ssl.SSLContext:
    """What the agent does at first boot: a key of its own, a CSR naming the node, the token;
    the certificate back. Its mutual-TLS context (the pair in an anonymous memory file:
    ssl loads only from a path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, plan.node)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(plan.node)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    body = {
        "cluster": target.cluster,
        "node": plan.node,
        "token": plan.token,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
    }
    wire = request("POST", "/v1/enrol", target.host, body)
    deadline = time.monotonic() + 120
    while True:
        http = Http(target.host, target.port, ca)
        try:
            status, content = await http.exchange(wire)
        except TRANSPORT_ERRORS as e:
            status, content = 0, f"{type(e).__name__}: {e}".encode()
        finally:
            http.close()
        if status == 200:
            break
        if (status and status < 500 and status != 409) or time.monotonic() > deadline:
            raise SetupError(f"enrolment of {plan.node}: {status} {content[:300]!r}")
        await asyncio.sleep(0.25)  # 409 (not provisioned yet), 5xx, the network: again
    pair = json.loads(content)["certificate"].encode() + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ctx = ssl.create_default_context(cadata=target.ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    fd = os.memfd_create(f"crv-bench-{plan.node}", os.MFD_CLOEXEC)
    try:
        os.write(fd, pair)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


async def connect(target: Target, agent: Agent) -> None:
    """The agent's kept-alive connection, its generation, and the attribute it sets."""
    http, host = agent.http, target.host
    status, body = await http.exchange(request("GET", "/v1/work?after=0&wait=0", host))
    if status != 200:
        raise SetupError(f"{agent.plan.node}: GET /v1/work: {status} {body[:300]!r}")
    agent.generation = int(json.loads(body)["generation"])
    if agent.plan.writes is not None:
        path = f"/v1/attributes/{ROLE}/{agent.plan.writes}"
        payload = {"value": f"http://{agent.plan.node}.example:8080/"}
        status, body = await http.exchange(request("PUT", path, host, payload))
        if status != 204:
            raise SetupError(f"{agent.plan.node}: PUT {path}: {status} {body[:300]!r}")


async def bounded(
    items: list[Any], call: Callable[[Any], Any], limit: int = SETUP_CONCURRENCY
) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(item: Any) -> Any:
        async with gate:
            return await call(item)

    return list(await asyncio.wait_for(asyncio.gather(*map(one, items)), SETUP_TIMEOUT))


async def drive(agent: Agent, host: str, start: float, end: float, tally: Tally) -> None:
    """One agent as fast as it can: its work (wait=0: answered at once) and a read, in turn.
    Latencies are kept for the requests that start and end inside [start, end)."""
    http, clock, keep = agent.http, time.perf_counter, tally.latencies.append
    read = request("GET", f"/v1/attributes/{ROLE}/{agent.plan.reads}", host)
    generation = agent.generation
    work = request("GET", f"/v1/work?after={generation}&wait=0", host)
    reading = False
    while True:
        began = clock()
        if began >= end:
            return
        try:
            status, body = await http.exchange(read if reading else work)
        except TRANSPORT_ERRORS as e:
            http.close()  # the next exchange dials again (a new handshake)
            tally.fail(type(e).__name__, str(e))
            await asyncio.sleep(0.1)
            continue
        ended = clock()
        if began >= start and ended <= end:
            keep(ended - began)
        if not 200 <= status < 300:
            tally.fail(str(status), body.decode(errors="replace"))
        elif not reading and (seen := int(json.loads(body)["generation"])) != generation:
            generation = seen
            work = request("GET", f"/v1/work?after={generation}&wait=0", host)
        reading = not reading


async def generate(target: Target, agents: list[Agent], start: float, end: float) -> Tally:
    tally = Tally()
    tasks = [asyncio.ensure_future(drive(a, target.host, start, end, tally)) for a in agents]
    _, hung = await asyncio.wait(tasks, timeout=end - time.perf_counter() + END_GRACE)
    for task in hung:
        task.cancel()
        tally.fail("hung", f"no answer within {END_GRACE:g} s after the end")
    await asyncio.gather(*hung, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            e = task.exception()
            tally.fail(type(e).__name__, str(e))
    for agent in agents:
        agent.http.close()
    return tally


def load_generator(target: Target, plans: list[Plan], pipe: Connection) -> None:
    """A load-generator process: enrol its agents, connect them when told, run the load in
    the window it is given (time.monotonic() values), send back its Tally. Each step answers
    ("ok", seconds) or ("error", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def step(what: Callable[[], Any]) -> Any:
        began = time.monotonic()
        try:
            result = loop.run_until_complete(what())
        except Exception as e:  # SetupError, a timeout, the network: the main process says it
            pipe.send(("error", f"{type(e).__name__}: {e}"))
            raise SystemExit(1) from None
        pipe.send(("ok", time.monotonic() - began))
        return result

    ca = ssl.create_default_context(cadata=target.ca_pem)
    ca.minimum_version = ssl.TLSVersion.TLSv1_2

    async def enrol_all() -> list[Agent]:
        contexts = await bounded(plans, lambda p: enrol(target, p, ca))
        return [
            Agent(p, Http(target.host, target.port, ctx))
            for p, ctx in zip(plans, contexts, strict=True)
        ]

    agents: list[Agent] = step(enrol_all)
    pipe.recv()  # connect
    step(lambda: bounded(agents, lambda a: connect(target, a)))
    start, end = pipe.recv()
    offset = time.perf_counter() - time.monotonic()
    tally = loop.run_until_complete(generate(target, agents, start + offset, end + offset))
    pipe.send(tally)
    loop.close()


# -- the main process: the service, the cluster, the health checks ---------------------------


def session_cpu(leader: int) -> float:
    """User + system CPU seconds of the live processes of the session `leader` leads (the
    service and its children, which `crv up` starts in a session of its own)."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[3]) == leader:  # field 6: the session
                    total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def process_cpu(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the machine since boot (busy: all but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK, sum(values) / TICK


def health_check(host: str, port: int, ctx: ssl.SSLContext) -> float:
    """Seconds for GET /v1/health on a new connection, TCP connect and TLS handshake
    included; raises OSError (ssl.SSLError among them) or ValueError."""
    began = time.perf_counter()
    with (
        socket.create_connection((host, port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(request("GET", "/v1/health", host)[:-2] + b"Connection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise ValueError("the connection closed before the answer")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lowered = head.lower()
        at = lowered.find(b"\r\ncontent-length:")
        length = int(lowered[at + 17 :].split(b"\r\n")[0]) if at >= 0 else 0
        while len(body) < length and (chunk := s.recv(65536)):
            body += chunk
    status = int(head[9:12])
    if status != 200:
        raise ValueError(f"GET /v1/health: {status} {body[:200]!r}")
    return time.perf_counter() - began


def percentile(ordered: list[float], q: float) -> float:
    """Nearest rank; 0 for no values."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def cluster_spec() -> dict[str, Any]:
    return {
        "appliance": "blackboard",
        "source": "/bench/blackboard",
        "pool": "sim",
        "parameters": {},
        "roles": {ROLE: {"recipe": "a0/roles/web.sh", "appdir": "a0", "env": {}}},
        "bundle": "",
    }


def plans(tokens: dict[str, str], nodes: list[str], values: int) -> list[Plan]:
    """Every second node sets one attribute; `values` of them share each key, and agent i
    reads key i mod (number of keys): every read answers `values` values (the last key fewer
    when they do not divide evenly)."""
    writers = nodes[::2]
    keys = max(1, math.ceil(len(writers) / values))
    writes = {node: f"k{j // values}" for j, node in enumerate(writers)}
    return [
        Plan(node, tokens[node], writes.get(node), f"k{i % keys}") for i, node in enumerate(nodes)
    ]


async def register(url: str, home: Home, cluster: str, n: int) -> dict[str, str]:
    """The cluster and its nodes (provisioned, with an address: free to enrol); a token each."""
    admin = AsyncService(home, url)
    try:
        await admin.put_cluster(cluster, cluster_spec())
        nodes = [
            {
                "name": f"{cluster}-{ROLE}-{i}",
                "group": ROLE,
                "roles": [ROLE],
                "pool": "sim",
                "address": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{(i & 255) or 1}",
                "state": "provisioned",
            }
            for i in range(n)
        ]
        for at in range(0, n, 1000):
            await admin.put_nodes(cluster, nodes[at : at + 1000])
        names = [str(node["name"]) for node in nodes]
        tokens: dict[str, str] = {}
        for at in range(0, n, 1000):
            tokens.update(await admin.tokens(cluster, names[at : at + 1000], 3600))
        return tokens
    finally:
        await admin.close()


async def forget(url: str, home: Home, cluster: str) -> None:
    admin = AsyncService(home, url)
    try:
        await admin.delete_cluster(cluster)
    finally:
        await admin.close()


@dataclass
class Settings:
    agents: int
    seconds: float
    warmup: float
    clients: int
    values: int


@dataclass
class Window:
    """What the main process saw while the load ran: health checks, and the CPU seconds
    (service, load generators, (machine busy, machine all)) at the window's two ends."""

    checks: list[float] = field(default_factory=list)
    failures: Failures = field(default_factory=dict)
    cpu: list[tuple[float, float, tuple[float, float]]] = field(default_factory=list)


class Run:
    """One run: a temporary CRV_HOME, the service in it, the cluster, the load generators."""

    def __init__(self, settings: Settings, out: TextIO) -> None:
        self.s = settings
        self.out = out
        self.root = Path(tempfile.mkdtemp(prefix="crv-bench-blackboard-"))
        self.home = Home(self.root)
        self.workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self.cluster = f"bb{os.getpid()}"
        self.url = ""
        self.host, self.port, self.service_pid = "127.0.0.1", 0, 0
        self.ca = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        for process, pipe in self.workers:
            if process.is_alive():
                process.terminate()
            process.join(10)
            pipe.close()
        if self.url and database_url(self.home) is not None:
            with contextlib.suppress(ServiceError, OSError):  # the database outlives the run
                asyncio.run(forget(self.url, self.home, self.cluster))
        daemons.down(self.home)
        shutil.rmtree(self.root, ignore_errors=True)

    def measure(self) -> dict[str, Any]:
        health = self.start_service()
        agents = self.start_agents()
        idle = health_check(self.host, self.port, self.ca)
        window = self.load()
        tallies: list[Tally] = self.gather("the load")
        return summary(self.s, health, idle, window, tallies, agents)

    def start_service(self) -> dict[str, Any]:
        """The service alone, as `crv up` starts it; its health answer."""
        started = time.monotonic()
        self.home.ensure()
        self.url = daemons._start_service(self.home)
        record = read_record(service_record(self.home))
        assert record is not None
        self.service_pid = int(record["pid"])
        self.port = int(self.url.rsplit(":", 1)[1])
        self.ca = ssl.create_default_context(cafile=str(self.home.ca_file))  # the crv CA only
        self.ca.minimum_version = ssl.TLSVersion.TLSv1_2
        import httpx

        health: dict[str, Any] = httpx.get(f"{self.url}/v1/health", verify=self.ca).json()
        self.say(
            f"  service up in {time.monotonic() - started:.1f} s: {health['processes']} "
            f"process(es) on {health['database']}, pid {self.service_pid}"
        )
        return health

    def start_agents(self) -> dict[str, float]:
        """Register the cluster, fork the load generators, have them enrol their agents, then
        connect them (two steps, so that no connection idles through the enrolments)."""
        s = self.s
        started = time.monotonic()
        tokens = asyncio.run(register(self.url, self.home, self.cluster, s.agents))
        nodes = sorted(tokens, key=lambda n: int(n.rsplit("-", 1)[1]))
        agents = plans(tokens, nodes, s.values)
        target = Target(self.host, self.port, self.cluster, self.home.ca_file.read_text())
        fork = multiprocessing.get_context("fork")  # no thread runs here: cheap and safe
        for i in range(s.clients):
            mine, theirs = fork.Pipe()
            process = fork.Process(
                target=load_generator, args=(target, agents[i :: s.clients], theirs), daemon=True
            )
            process.start()
            theirs.close()
            self.workers.append((process, mine))
        self.gather("enrolment")
        enrolled = time.monotonic() - started
        for _, pipe in self.workers:
            pipe.send("connect")
        started = time.monotonic()
        self.gather("connection")
        connected = time.monotonic() - started
        writers = sum(1 for a in agents if a.writes is not None)
        self.say(
            f"  {s.agents} agents enrolled in {enrolled:.1f} s ({s.agents / enrolled:.0f}/s: "
            f"registration, a P-256 key, CSR and certificate each), connected in "
            f"{connected:.1f} s ({s.agents / connected:.0f} mutual-TLS handshakes/s), "
            f"{writers} attributes set"
        )
        return {"enrol_seconds": enrolled, "connect_seconds": connected}

    def gather(self, what: str) -> list[Any]:
        """One answer from every load generator, or SetupError naming the first failure."""
        answers = []
        for process, pipe in self.workers:
            if not pipe.poll(SETUP_TIMEOUT + 60):
                raise SetupError(f"load generator {process.pid}: no answer to {what}")
            try:
                answer = pipe.recv()
            except EOFError:
                raise SetupError(f"load generator {process.pid} died ({what})") from None
            if isinstance(answer, tuple) and answer[0] == "error":
                raise SetupError(f"{what}: {answer[1]}")
            answers.append(answer)
        return answers

    def load(self) -> Window:
        """Start the load, check health every HEALTH_EVERY seconds until it ends (warm-up
        included), and read the CPU counters at the two ends of the measured window."""
        go = time.monotonic()
        start, end = go + self.s.warmup, go + self.s.warmup + self.s.seconds
        for _, pipe in self.workers:
            pipe.send((start, end))
        pids = [p.pid for p, _ in self.workers if p.pid is not None]

        def cpu() -> tuple[float, float, tuple[float, float]]:
            return session_cpu(self.service_pid), sum(map(process_cpu, pids)), machine_cpu()

        window, next_check = Window(), go
        while True:
            now = time.monotonic()
            if not window.cpu and now >= start:
                window.cpu.append(cpu())
            if now >= end:
                window.cpu.append(cpu())
                return window
            if now >= next_check:
                try:
                    window.checks.append(health_check(self.host, self.port, self.ca))
                except (OSError, ValueError) as e:
                    key = type(e).__name__
                    window.failures[key] = window.failures.get(key, 0) + 1
                next_check = max(next_check + HEALTH_EVERY, time.monotonic())
                continue
            time.sleep(max(0.0, min(next_check, end if window.cpu else start) - now))


def summary(
    s: Settings,
    health: dict[str, Any],
    idle: float,
    window: Window,
    tallies: list[Tally],
    agents: dict[str, float],
) -> dict[str, Any]:
    """The figures, as --json prints them."""
    latencies = sorted(x for t in tallies for x in t.latencies)
    failures: Counter[str] = Counter()
    samples: dict[str, str] = {}
    for t in tallies:
        failures.update(t.failures)
        for k, v in t.samples.items():
            samples.setdefault(k, v)
    requests = len(latencies)
    before, after = window.cpu
    service_cpu, client_cpu = after[0] - before[0], after[1] - before[1]
    busy = (after[2][0] - before[2][0]) / max(after[2][1] - before[2][1], 1e-9)
    other = busy * (os.cpu_count() or 1) - (service_cpu + client_cpu) / s.seconds
    checks = sorted(window.checks)
    return {
        "agents": s.agents,
        "clients": s.clients,
        "service_processes": health["processes"],
        "database": health["database"],
        "cpus": os.cpu_count(),
        "seconds": s.seconds,
        "warmup": s.warmup,
        "values_per_read": s.values,
        **{k: round(v, 3) for k, v in agents.items()},
        "requests": requests,
        "requests_per_second": requests / s.seconds,
        "latency_ms": {
            q: 1000 * percentile(latencies, v)
            for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "errors": dict(failures),
        "error_samples": samples,
        "health_ms": {
            "idle": 1000 * idle,
            "checks": len(checks),
            "p50": 1000 * percentile(checks, 0.5),
            "max": 1000 * percentile(checks, 1.0),
            "over_target": sum(1 for c in checks if c * 1000 > TARGET_HEALTH_MS),
            "failures": window.failures,
        },
        "service_cpu_seconds": service_cpu,
        "service_cpu_ms_per_request": 1000 * service_cpu / max(requests, 1),
        "client_cpu_ms_per_request": 1000 * client_cpu / max(requests, 1),
        "machine_busy": busy,
        "other_cpus": max(other, 0.0),
    }


def report(r: dict[str, Any], say: Callable[[str], None]) -> None:
    lat, health = r["latency_ms"], r["health_ms"]
    say(
        f"  load: {r['seconds']:g} s after {r['warmup']:g} s of warm-up, each agent alternating "
        f"GET /v1/work?wait=0 and GET /v1/attributes/{ROLE}/kJ ({r['values_per_read']} values)"
    )
    say(
        f"  requests: {r['requests']} = {r['requests_per_second']:.0f} req/s | latency ms: "
        f"p50 {lat['p50']:.1f}, p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f}, max {lat['max']:.1f}"
    )
    if r["errors"]:
        for what, count in sorted(r["errors"].items()):
            say(f"  ERRORS {what}: {count} (first: {r['error_samples'].get(what, '')})")
    else:
        say("  errors: none")
    failed = "".join(f", FAILED {k}: {v}" for k, v in health["failures"].items())
    say(
        f"  health on a new connection every {HEALTH_EVERY:g} s: {health['checks']} checks, "
        f"p50 {health['p50']:.1f} ms, max {health['max']:.1f} ms, {health['over_target']} over "
        f"{TARGET_HEALTH_MS:g} ms{failed} (idle, before the load: {health['idle']:.1f} ms)"
    )
    say(
        f"  CPU per request: service {r['service_cpu_ms_per_request']:.3f} ms "
        f"({r['service_cpu_seconds'] / r['seconds']:.2f} CPUs), load generators "
        f"{r['client_cpu_ms_per_request']:.3f} ms; machine {100 * r['machine_busy']:.0f} % busy "
        f"of {r['cpus']} CPUs, {r['other_cpus']:.2f} CPUs by everything else (a database "
        f"server, other work on the machine)"
    )
    rps, p99, hmax = r["requests_per_second"], lat["p99"], health["max"]

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    say(
        f"blackboard: req/s {TARGET_RPS:g} target: {rps / TARGET_RPS:.2f}x "
        f"({verdict(rps >= TARGET_RPS)}) | p99 {TARGET_P99_MS:g} ms target: "
        f"{p99 / TARGET_P99_MS:.2f}x ({verdict(p99 < TARGET_P99_MS)}) | health "
        f"{TARGET_HEALTH_MS:g} ms target: {hmax / TARGET_HEALTH_MS:.2f}x "
        f"({verdict(hmax < TARGET_HEALTH_MS and not health['failures'])})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_blackboard", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents (1000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured load (20)")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before measuring (2)")
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes (2)")
    parser.add_argument(
        "--values", type=int, default=10, help="values each attribute read answers (10)"
    )
    parser.add_argument(
        "--database",
        metavar="sqlite|postgresql|URL",
        help=f"sqlite (the default), postgresql (a PostgreSQL of the benchmark's own, Debian's "
        f"package, removed after) or a URL (sets {ENV_DATABASE_URL})",
    )
    parser.add_argument("--processes", type=int, metavar="N", help=f"sets {ENV_PROCESSES}")
    parser.add_argument("--smoke", action="store_true", help="20 agents, 2 s, 1 client (CI)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args([] if argv is None else argv)
    if args.smoke:
        args.agents, args.seconds, args.warmup, args.clients = 20, 2.0, 0.5, 1
    if args.agents < 1 or args.clients < 1 or args.values < 1 or args.seconds <= 0:
        parser.error("--agents, --clients and --values: 1 or more; --seconds: more than 0")
    args.clients = min(args.clients, args.agents)
    settings = Settings(args.agents, args.seconds, args.warmup, args.clients, args.values)
    out = sys.stderr if args.json else sys.stdout

    saved = dict(os.environ)
    local: Any = None
    if args.database == "postgresql":
        from crv_cli.postgres import LocalPostgres

        local = LocalPostgres(Path(tempfile.mkdtemp(prefix="crv-bench-pg-")))
        os.environ[ENV_DATABASE_URL] = local.start()
    elif args.database == "sqlite":
        os.environ.pop(ENV_DATABASE_URL, None)
    elif args.database is not None:
        os.environ[ENV_DATABASE_URL] = args.database
    if args.processes is not None:
        os.environ[ENV_PROCESSES] = str(args.processes)
    # every agent dials from 127.0.0.1: past the service's cap per address, raise it
    wanted = args.agents + 256
    if wanted > DEFAULT_MAX_CONNS and not os.environ.get(ENV_MAX_CONNS):
        os.environ[ENV_MAX_CONNS] = str(wanted)
    run = Run(settings, out)
    try:
        url = database_url(run.home)
        processes = service_processes(url is not None)
        run.say(
            f"crv blackboard benchmark: {args.agents} agents in {args.clients} load "
            f"generator(s); service: {ENV_PROCESSES}={processes}, {ENV_DATABASE_URL}="
            f"{redact(url) if url else '(unset: SQLite)'}; {os.cpu_count()} CPUs; "
            f"CRV_HOME {run.root}"
        )
        result = run.measure()
    except (ServiceConfigError, DaemonError, SetupError, ServiceError) as e:
        raise SystemExit(f"bench_blackboard: {e}") from None
    finally:
        run.close()
        if local is not None:
            local.destroy()
            shutil.rmtree(local.directory, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)
    if args.json:
        print(json.dumps(result))
    report(result, run.say)
    if args.smoke and (
        result["requests"] == 0 or result["errors"] or result["health_ms"]["failures"]
    ):
        raise SystemExit("bench_blackboard --smoke: requests failed, or none was measured")


if __name__ == "__main__":
    exit_on_sigterm()
    main(sys.argv[1:])
