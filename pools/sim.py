"""The sim pool: simulated nodes whose agents speak the real protocol to the real crv service.

For measuring the deploy itself (benchmarks/bench_deploy.py) at sizes no machine here can
boot. `create_node` returns at once (state "pending", a made-up 10.x.y.z address); the node
"boots" after the `provision` latency, waits `certify`, then its simulated agent does what
agent/crv_agent.py does, over mutual TLS with its own key and certificate: enrol with the
bootstrap token and a CSR, long-poll `GET /v1/work`, and for each released role wait the
role's `contextualize` latency, `PUT` its `url` attribute, `POST /v1/status` done. Recipes are
never run (nor fetched). The `url` points at a small HTTP server of the sim that answers
`GET /verify/<seconds>/<node>` with 200 after that many seconds, so an appliance whose verify
is `{http: "{{ self.url }}"}` gets a real check with a real latency.

Latencies (seconds) come from the constructor or `CRV_SIM_LATENCY`, e.g.
`provision=10,certify=1,contextualize=5,verify=1,contextualize.lb=3,jitter=0.1`: a kind, or
`kind.role` for one role; `jitter=J` scales every latency by a uniform factor in [1-J, 1+J].
pools.yaml may name more sim pools (`driver: sim`, each its own host), for example with
`max_nodes` to give one a capacity (`capacity()`).

The agents run in one asyncio process per pool state dir (the "sim host", started by the first
`create_node`), not in the caller's process, so a benchmark measures the flow's own CPU. The
driver talks to it over a Unix socket in the state dir, one JSON line each way per call. The
host keeps its nodes in memory (its exit is every node's power cut) and exits on `shutdown()`,
on SIGTERM, when its socket file is removed, or after IDLE_EXIT seconds without nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from crv.base.flock import exclusive
from crv.base.processes import spawn, wait_ready
from pools.base import TAG_CLUSTER, TAG_NODE, MaxNodes, NodeInfo, NodeSpec, PoolError

NAME = "sim"
ENV_LATENCY = "CRV_SIM_LATENCY"
ENV_PROFILE = "CRV_SIM_PROFILE"  # cProfile the sim host to this file
KINDS = ("provision", "certify", "contextualize", "verify")
DEFAULT_LATENCY: Mapping[str, float] = {
    "provision": 10.0,
    "certify": 1.0,
    "contextualize": 5.0,
    "verify": 1.0,
}
SOCKET = "host.sock"
CALL_TIMEOUT = 30.0
START_TIMEOUT = 20.0
IDLE_EXIT = 600.0  # seconds without nodes before the host exits on its own
POLL_WAIT = 25  # as the real agent: the service holds a long poll for at most 30 s
BACKOFF_CAP = 5.0
MAX_VERIFY_SECONDS = 600.0
REPO = Path(__file__).resolve().parent.parent
HOST_ENV = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "XDG_RUNTIME_DIR", "PYTHONPATH"}
HOST_ENV.add(ENV_PROFILE)

Json = dict[str, Any]


def parse_latency(text: str) -> dict[str, float]:
    """`kind=S` or `kind.role=S` pairs separated by commas, plus `jitter=J` (0 <= J < 1)."""
    out: dict[str, float] = {}
    for item in text.replace(";", ",").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        kind = key.partition(".")[0]
        if not sep or (kind not in KINDS and key != "jitter"):
            raise ValueError(
                f"{item.strip()!r}: expected KIND=SECONDS, KIND.ROLE=SECONDS or jitter=J"
            )
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{item.strip()!r}: {value.strip()!r} is not a number") from None
        if not 0 <= seconds <= 86400 or (key == "jitter" and seconds >= 1):
            raise ValueError(f"{item.strip()!r}: out of range")
        out[key] = seconds
    return out


def latency_for(latency: Mapping[str, float], kind: str, role: str | None = None) -> float:
    """The configured seconds for one step (role-specific first), jitter applied."""
    base = latency.get(f"{kind}.{role}") if role else None
    if base is None:
        base = latency.get(kind, DEFAULT_LATENCY[kind])
    jitter = latency.get("jitter", 0.0)
    return base * random.uniform(1 - jitter, 1 + jitter) if jitter else base


def _socket_path(root: Path) -> str:
    """`<root>/host.sock`, or a 0700 per-user directory when that path is too long for AF_UNIX."""
    path = str(root / SOCKET)
    if len(path.encode()) < 100:
        return path
    base = (
        Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"crv-sim-{os.getuid()}"
    )
    base.mkdir(mode=0o700, exist_ok=True)
    return str(base / (hashlib.sha256(str(root).encode()).hexdigest()[:20] + ".sock"))


# -- the driver (in the flow's process) ------------------------------------------------------


class SimOptions(BaseModel):
    """The options of a `driver: sim` entry of pools.yaml."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_nodes: int | None = Field(default=None, ge=0, le=1_000_000)  # none: no limit
    # where the sim host lives (its socket, its log), instead of CRV_HOME/pools/<name>: a path
    # every process using the pool reaches, such as Prefect workers of this machine that have
    # no CRV_HOME (docs/workers.md)
    state_dir: str | None = Field(default=None, max_length=4096)

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(value):
            raise ValueError("an absolute path, the same for every process that uses the pool")
        return value


def configured(name: str, state_dir: Path, options: SimOptions) -> SimPool:
    """A sim pool that pools.yaml names (pools/config.py DRIVERS)."""
    root = Path(options.state_dir) if options.state_dir else state_dir
    return SimPool(root, name=name, max_nodes=options.max_nodes)


class SimPool(MaxNodes):
    """Nodes in the sim host of `root` (CRV_HOME/pools/sim); at most `max_nodes` at a time
    (None: no limit), which `capacity()` tells."""

    def __init__(
        self,
        root: Path,
        latency: Mapping[str, float] | str | None = None,
        python: str = sys.executable,
        *,
        name: str = NAME,
        max_nodes: int | None = None,
    ) -> None:
        self.name = name
        self.max_nodes = max_nodes
        self.root = Path(os.path.abspath(root))
        self.python = python
        self._latency_error: str | None = None
        self.latency: dict[str, float] = dict(DEFAULT_LATENCY)
        text = os.environ.get(ENV_LATENCY, "") if latency is None else latency
        try:
            self.latency.update(parse_latency(text) if isinstance(text, str) else text)
        except ValueError as e:
            self._latency_error = str(e)
        self._start_lock = threading.Lock()
        self._host: subprocess.Popen[bytes] | None = None

    def validate(self) -> None:
        if self._latency_error is not None:
            raise PoolError(NAME, f"{ENV_LATENCY}: {self._latency_error}")
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.root} is not writable")
        except OSError as e:
            raise PoolError(NAME, f"state directory {self.root}: {e}") from e

    def list_nodes(self, cluster: str | None = None) -> list[NodeInfo]:
        answer = self._call({"op": "list", "cluster": cluster}, start=False)
        return [_info(n) for n in answer["nodes"]] if answer else []

    def get_node(self, name: str) -> NodeInfo | None:
        answer = self._call({"op": "get", "name": name}, start=False)
        return _info(answer["node"]) if answer and answer.get("node") else None

    def create_node(self, spec: NodeSpec) -> NodeInfo:
        request = {
            "op": "create",
            "name": spec.name,
            "cluster": spec.cluster,
            "group": spec.group,
            "bootstrap": dict(spec.bootstrap),
            "tags": {**spec.tags, TAG_CLUSTER: spec.cluster, TAG_NODE: spec.name},
            "latency": self.latency,
        }
        answer = self._call(request, start=True)
        assert answer is not None
        return _info(answer["node"])

    def destroy_node(self, name: str) -> None:
        self._call({"op": "destroy", "name": name}, start=False)

    # -- beyond the contract: for benchmarks and tests ----------------------------------------

    def host(self) -> Json | None:
        """{pid, verify_port, nodes} of the running sim host, None when there is none."""
        return self._call({"op": "ping"}, start=False)

    def start(self) -> Json:
        """Start the sim host now rather than at the first create_node; {pid, ...} as host()."""
        answer = self._call({"op": "ping"}, start=True)
        assert answer is not None
        return answer

    def shutdown(self) -> bool:
        """Stop the sim host (every node goes with it); False when none was running."""
        answer = self._call({"op": "shutdown"}, start=False)
        if self._host is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._host.wait(timeout=10)
            self._host = None
        return answer is not None

    # -- talking to the host -------------------------------------------------------------------

    def _call(self, request: Json, *, start: bool) -> Json | None:
        """One request, one answer. No host: None, or start one first when `start`."""
        path = _socket_path(self.root)
        data = (json.dumps(request) + "\n").encode()
        for attempt in range(2):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(CALL_TIMEOUT)
                    s.connect(path)
                    s.sendall(data)
                    with s.makefile("rb") as f:
                        line = f.readline()
            except (FileNotFoundError, ConnectionRefusedError):
                if not start or attempt:
                    return None
                self._start_host(path)
                continue
            except OSError as e:
                raise PoolError(NAME, f"{request['op']}: sim host: {e}", temporary=True) from e
            if not line:
                raise PoolError(NAME, f"{request['op']}: the sim host hung up", temporary=True)
            answer: Json = json.loads(line)
            if not answer.get("ok"):
                temporary = bool(answer.get("temporary"))
                raise PoolError(NAME, str(answer.get("error")), temporary=temporary)
            return answer
        return None

    def _ping(self, path: str) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                s.connect(path)
                s.sendall(b'{"op": "ping"}\n')
                with s.makefile("rb") as f:
                    return bool(f.readline())
        except OSError:
            return False

    def _start_host(self, path: str) -> None:
        """One host per state dir, whatever the number of threads or processes asking."""
        self.validate()
        with self._start_lock, exclusive(self.root / ".host.lock"):
            if self._ping(path):
                return
            # what a node would see, never crv's own environment (it may hold credentials)
            env = {k: v for k, v in os.environ.items() if k in HOST_ENV}
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
            )
            argv = [self.python, "-m", "pools.sim", "host", str(self.root), path]
            proc = spawn(argv, log=self.root / "host.log", env=env, cwd=self.root)
            self._host = proc
            if wait_ready(proc, lambda: self._ping(path), timeout=START_TIMEOUT, interval=0.05):
                return
            if proc.returncode is not None:
                raise PoolError(NAME, f"the sim host exited at start; see {self.root}/host.log")
            raise PoolError(NAME, "the sim host did not answer", temporary=True)


def _info(n: Json) -> NodeInfo:
    return NodeInfo(
        name=n["name"],
        cluster=n["cluster"],
        state=n["state"],
        address=n["address"],
        tags=n["tags"],
        extra=n["extra"],
    )


# -- the sim host (its own process) ----------------------------------------------------------


class Refused(Exception):
    """The service will not take this node (bad token, revoked): the agent stops."""


class Http:
    """HTTP/1.1 over one kept-alive TLS connection, just enough for the crv service (uvicorn
    answers with Content-Length or chunked). Far cheaper per request than a general client,
    which matters when one process plays a thousand agents on a shared machine."""

    def __init__(self, url: str, ctx: ssl.SSLContext) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 443
        self.ctx = ctx
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(
        self, method: str, path: str, body: Json | None = None, timeout: float = 30.0
    ) -> tuple[int, dict[str, str], bytes]:
        """Raises OSError (or a TimeoutError) below HTTP; a kept-alive connection that the
        service closed while idle is retried once on a fresh one."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: application/json\r\nUser-Agent: crv-sim\r\n"
            + (
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                if body is not None
                else ""
            )
            + "\r\n"
        ).encode()
        for attempt in range(2):
            reused = self._writer is not None
            try:
                return await asyncio.wait_for(self._exchange(head + payload), timeout)
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as e:
                self.close()
                if not reused or attempt:
                    raise OSError(f"{method} {path}: {type(e).__name__}: {e}") from None
            except asyncio.TimeoutError:
                self.close()
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ctx, server_hostname=self.host
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            content = bytes(body)
        else:
            content = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, content


@dataclass
class SimNode:
    name: str
    cluster: str
    group: str
    address: str
    tags: dict[str, str]
    latency: dict[str, float]
    bootstrap: dict[str, str] = field(repr=False)
    created: float = field(default_factory=time.time)
    state: str = "pending"
    agent: str = "booting"
    task: asyncio.Task[None] | None = None

    def describe(self) -> Json:
        extra = {"group": self.group, "created": self.created, "agent": self.agent}
        return {
            "name": self.name,
            "cluster": self.cluster,
            "state": self.state,
            "address": self.address,
            "tags": self.tags,
            "extra": extra,
        }


class Agent:
    """What agent/crv_agent.py does for one node, minus running recipes."""

    def __init__(self, host: Host, node: SimNode) -> None:
        self.host, self.node = host, node
        self.boot = node.bootstrap
        self.service = self.boot["service"]

    async def run(self) -> None:
        node = self.node
        await asyncio.sleep(latency_for(node.latency, "provision"))
        node.state = "running"
        node.agent = "enrolling"
        await asyncio.sleep(latency_for(node.latency, "certify"))
        ca = self.host.ca_context(self.boot["ca"], self.boot["ca_sha256"])
        http = Http(self.service, ca)
        try:
            ctx = await self.enrol(http)
        finally:
            http.close()
        node.agent = "enrolled"
        http = Http(self.service, ctx)
        try:
            await self.serve(http)
        finally:
            http.close()

    async def call(
        self,
        http: Http,
        method: str,
        path: str,
        body: Json | None = None,
        *,
        timeout: float = 30.0,
        retry: tuple[int, ...] = (),
    ) -> tuple[int, bytes]:
        """The first answer not worth waiting out; transport errors, 5xx and `retry` statuses
        are retried with backoff (Retry-After wins), for as long as the node lives."""
        delay = 0.25
        while True:
            wait: float | None = None
            try:
                status, headers, content = await http.request(method, path, body, timeout)
                if status < 500 and status not in retry:
                    return status, content
                with contextlib.suppress(ValueError):
                    wait = min(max(float(headers.get("retry-after", "")), 0.0), 60.0)
            except (OSError, asyncio.TimeoutError) as e:
                self.host.log(f"{self.node.name}: {e}; retrying")
            if wait is None:
                wait, delay = delay * random.uniform(0.5, 1.0), min(delay * 2, BACKOFF_CAP)
            await asyncio.sleep(wait)

    async def enrol(self, http: Http) -> ssl.SSLContext:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        name = self.node.name
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        body = {
            "cluster": self.boot["cluster"],
            "node": name,
            "token": self.boot.get("token", ""),
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        }
        status, content = await self.call(http, "POST", "/v1/enrol", body, retry=(409,))
        if status != 200:
            raise Refused(f"enrolment refused: {status} {content[:200]!r}")
        self.boot.pop("token", None)  # single-use: nothing to keep
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        certificate = json.loads(content)["certificate"].encode()
        ctx = ssl.create_default_context(cadata=self.boot["ca"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # the pair never touches a disk: ssl only loads from a path, so an anonymous memory file
        fd = os.memfd_create(f"crv-sim-{name}", os.MFD_CLOEXEC)
        try:
            os.write(fd, certificate + key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx

    async def serve(self, http: Http) -> None:
        generation, done = 0, dict[str, int]()
        while True:
            path = f"/v1/work?after={generation}&wait={POLL_WAIT}"
            status, content = await self.call(http, "GET", path, timeout=POLL_WAIT + 15)
            if status in (401, 403, 404):
                raise Refused(f"GET /v1/work: {status} {content[:200]!r}")
            if status != 200:
                self.host.log(f"{self.node.name}: GET /v1/work: {status}; retrying")
                await asyncio.sleep(1.0)
                continue
            work = json.loads(content)
            if work.get("stop"):
                self.node.agent = "stopped"
                return
            generation = int(work["generation"])
            for role in work["roles"]:
                if role["release"] > done.get(role["role"], 0):
                    await self.run_role(http, role["role"], int(role["release"]))
                    done[role["role"]] = int(role["release"])

    async def run_role(self, http: Http, role: str, release: int) -> None:
        self.node.agent = f"running {role}"
        await self.report(http, role, release, "running", "")
        await asyncio.sleep(latency_for(self.node.latency, "contextualize", role))
        seconds = latency_for(self.node.latency, "verify", role)
        url = f"http://127.0.0.1:{self.host.verify_port}/verify/{seconds:g}/{self.node.name}"
        status, content = await self.call(http, "PUT", f"/v1/attributes/{role}/url", {"value": url})
        if status in (401, 403, 404):
            raise Refused(f"PUT /v1/attributes/{role}/url: {status} {content[:200]!r}")
        await self.report(http, role, release, "done", "simulated recipe done\n")
        self.node.agent = f"{role} done"

    async def report(self, http: Http, role: str, release: int, state: str, output: str) -> None:
        body = {
            "role": role,
            "release": release,
            "state": state,
            "exit_code": None,
            "output": output,
        }
        if state == "done":
            body["exit_code"] = 0
        status, content = await self.call(http, "POST", "/v1/status", body)
        if status in (401, 403, 404):
            raise Refused(f"POST /v1/status: {status} {content[:200]!r}")
        if status == 409:
            self.host.log(f"{self.node.name}: status of {role} release {release} is stale")


class Host:
    """The sim host: nodes, their agents, the verify server and the control socket."""

    def __init__(self, root: Path, path: str) -> None:
        self.root, self.path = root, path
        self.nodes: dict[str, SimNode] = {}
        self.verify_port = 0
        self._allocated = 0
        self._stop = asyncio.Event()
        self._idle_since = time.monotonic()
        self._ca: dict[str, ssl.SSLContext] = {}

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        sys.stderr.write(f"{stamp} crv-sim: {message}\n")

    def ca_context(self, pem: str, sha256: str) -> ssl.SSLContext:
        """The enrolment context: trusts the pinned CA only (as the real agent checks)."""
        ctx = self._ca.get(sha256)
        if ctx is None:
            der = ssl.PEM_cert_to_DER_cert(pem.strip())
            if hashlib.sha256(der).hexdigest() != sha256.lower().replace(":", ""):
                raise Refused("the bootstrap CA does not match ca_sha256")
            ctx = ssl.create_default_context(cadata=pem)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ca[sha256] = ctx
        return ctx

    def address(self) -> str:
        while True:
            self._allocated += 1
            i = self._allocated
            if 0 < i & 255 < 255:
                return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"

    async def main(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        verify = await asyncio.start_server(self._verify, "127.0.0.1", 0, backlog=4096)
        self.verify_port = int(verify.sockets[0].getsockname()[1])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead host's socket (the driver holds the start lock)
        control = await asyncio.start_unix_server(self._control, self.path, backlog=4096)
        os.chmod(self.path, 0o600)
        inode = os.stat(self.path).st_ino
        self.log(f"pid {os.getpid()} on {self.path}, verify on port {self.verify_port}")
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 2.0)
            try:
                if os.stat(self.path).st_ino != inode:
                    break  # another host took over the path
            except FileNotFoundError:
                break  # the state dir was removed: nobody can reach us any more
            if self.nodes:
                self._idle_since = time.monotonic()
            elif time.monotonic() - self._idle_since > IDLE_EXIT:
                break
        for node in list(self.nodes.values()):
            self._destroy(node.name)
        control.close()
        verify.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == inode:
                os.unlink(self.path)
        self.log("stopped")

    async def _life(self, node: SimNode) -> None:
        try:
            await Agent(self, node).run()
        except asyncio.CancelledError:
            raise
        except Refused as e:
            node.agent = f"refused: {e}"
            self.log(f"{node.name}: {e}")
        except Exception as e:  # a simulator bug must show, not hang the deploy silently
            node.agent = f"crashed: {type(e).__name__}: {e}"
            self.log(f"{node.name}: agent crashed: {type(e).__name__}: {e}")

    def _create(self, request: Json) -> Json:
        name, cluster = str(request["name"]), str(request["cluster"])
        if not re.fullmatch(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?", name):
            return {"ok": False, "error": f"unusable node name {name!r}"}
        node = self.nodes.get(name)
        if node is not None:
            if node.cluster != cluster:
                error = f"node {name} exists in cluster {node.cluster!r}, not {cluster!r}"
                return {"ok": False, "error": error}
            return {"ok": True, "node": node.describe()}
        node = SimNode(
            name=name,
            cluster=cluster,
            group=str(request["group"]),
            address=self.address(),
            tags=dict(request.get("tags") or {}),
            latency={k: float(v) for k, v in (request.get("latency") or {}).items()},
            bootstrap=dict(request["bootstrap"]),
        )
        node.task = asyncio.get_running_loop().create_task(self._life(node))
        self.nodes[name] = node
        return {"ok": True, "node": node.describe()}

    def _destroy(self, name: str) -> None:
        node = self.nodes.pop(name, None)
        if node is None:
            return
        if node.task is not None:
            node.task.cancel()

    def _handle(self, request: Json) -> Json:
        op = request.get("op")
        if op == "ping":
            return {
                "ok": True,
                "pid": os.getpid(),
                "verify_port": self.verify_port,
                "nodes": len(self.nodes),
            }
        if op == "create":
            return self._create(request)
        if op == "get":
            node = self.nodes.get(str(request.get("name")))
            return {"ok": True, "node": node.describe() if node else None}
        if op == "list":
            cluster = request.get("cluster")
            nodes = [n.describe() for n in self.nodes.values() if cluster in (None, n.cluster)]
            return {"ok": True, "nodes": nodes}
        if op == "destroy":
            self._destroy(str(request.get("name")))
            return {"ok": True}
        if op == "shutdown":
            self._stop.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown operation {op!r}"}

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    answer = self._handle(json.loads(line))
                except (ValueError, KeyError, TypeError) as e:
                    answer = {"ok": False, "error": f"bad request: {type(e).__name__}: {e}"}
                writer.write((json.dumps(answer) + "\n").encode())
                await writer.drain()
        except (OSError, ValueError):
            pass
        finally:
            writer.close()

    async def _verify(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """`GET /verify/<seconds>/<node>[/anything]`: 200 after that many seconds (404 for a
        node the host does not hold; a suffix such as `/health` is ignored); one request per
        connection."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
            m = re.fullmatch(r"/verify/([0-9.]+)/([a-z0-9-]+)(/[^?#]*)?([?#].*)?", target)
            if m and m.group(2) in self.nodes:
                await asyncio.sleep(min(float(m.group(1)), MAX_VERIFY_SECONDS))
                status, body = "200 OK", b"ok\n"
            else:
                status, body = "404 Not Found", b"no such node\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}"
                "\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            OSError,
            ValueError,
            IndexError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.TimeoutError,
        ):
            pass
        finally:
            writer.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "host":
        sys.stderr.write("usage: python -m pools.sim host STATE_DIR SOCKET\n")
        return 2
    profile = os.environ.get(ENV_PROFILE)
    if profile:  # where the simulator's own CPU goes (benchmarks/bench_deploy.py --profile)
        import cProfile

        with cProfile.Profile() as profiler:
            asyncio.run(Host(Path(argv[1]), argv[2]).main())
        profiler.dump_stats(profile)
    else:
        asyncio.run(Host(Path(argv[1]), argv[2]).main())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
