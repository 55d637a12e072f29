"""Renewal traffic: what one node's certificate renewals cost on the wire, per renewal and per day.

The real service (`python -m crv.service`, default node certificate lifetime: 24 h) behind a
byte-counting TCP relay on loopback, and the real agent's code (agent/crv_agent.py) renewing a
node's certificate again and again: every byte of each renewal (its TLS handshake on a new
connection, the CSR, the certificate chain and CA bundle that come back) is counted. The agent
renews at 62-72 % of the lifetime, about 1.5 times a day at 24 h.

    python -m benchmarks.bench_renewal            # 50 renewals
    python -m benchmarks.bench_renewal --smoke    # 3 (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from benchmarks import exit_on_sigterm
from crv.base.home import Home

REPO = Path(__file__).resolve().parent.parent
DAY = 86400.0


def _agent() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crv_agent", REPO / "agent" / "crv_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crv_agent"] = module
    spec.loader.exec_module(module)
    return module


class Relay:
    """Forwards 127.0.0.1:port to the service and counts the bytes each way."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(renewals: int) -> dict[str, float]:
    agent = _agent()
    with tempfile.TemporaryDirectory() as directory:
        home = Home(Path(directory) / "crv")
        port = _free_port()
        log = open(Path(directory) / "service.log", "wb")  # noqa: SIM115
        env = {**os.environ, "CRV_HOME": str(home.root)}
        env.pop("CRV_NODE_CERT_TTL", None)  # the default lifetime
        proc = subprocess.Popen(
            [sys.executable, "-m", "crv.service", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
        try:
            return _measure(agent, home, port, renewals, Path(directory))
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()


def _measure(
    agent: ModuleType, home: Home, port: int, renewals: int, directory: Path
) -> dict[str, float]:
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            ctx = ssl.create_default_context(cafile=str(home.ca_file))
            ctx.load_cert_chain(home.admin_cert, home.admin_key)
            admin = httpx.Client(base_url=url, verify=ctx, timeout=30)
            admin.get("/v1/health").raise_for_status()
            break
        except (OSError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    spec = {
        "appliance": "bench", "source": "/bench", "pool": "local", "parameters": {},
        "roles": {"web": {"recipe": "a0/web.sh", "appdir": "a0", "env": {}, "depends_on": []}},
        "bundle": "",
    }  # fmt: skip
    admin.put("/v1/admin/clusters/bench", json=spec).raise_for_status()
    node = {"name": "bench-web-0", "group": "web", "roles": ["web"], "pool": "local",
            "address": "127.0.9.1", "state": "provisioned"}  # fmt: skip
    admin.put("/v1/admin/clusters/bench/nodes", json={"nodes": [node]}).raise_for_status()
    token = admin.post("/v1/admin/clusters/bench/tokens", json={"nodes": ["bench-web-0"]}).json()[
        "tokens"
    ]["bench-web-0"]
    ttl = float(admin.get("/v1/health").json()["node_cert_ttl"])

    relay = Relay(port)
    ca_pem = home.ca_file.read_bytes()
    der = x509.load_pem_x509_certificate(ca_pem).public_bytes(Encoding.DER)
    boot = {
        "service": f"https://127.0.0.1:{relay.port}", "ca": ca_pem.decode(),
        "ca_sha256": hashlib.sha256(der).hexdigest(), "cluster": "bench",
        "node": "bench-web-0", "token": token,
    }  # fmt: skip
    node_home = directory / "node"
    node_home.mkdir()
    (node_home / "bootstrap.json").write_text(json.dumps(boot))
    agent.log = lambda message: None  # quiet
    agent.install_ca(node_home, boot)
    agent.enrol(node_home, boot, time.monotonic() + 60)
    identity = agent.Identity(node_home, boot)
    start_up, start_down = relay.counts()
    started = time.perf_counter()
    for _ in range(renewals):
        identity.renew()
    elapsed = time.perf_counter() - started
    time.sleep(0.2)  # the relay's last bytes
    up, down = relay.counts()
    per = (up - start_up + down - start_down) / renewals
    per_day = DAY / (ttl * sum(agent.RENEW_AT) / 2)
    return {
        "ttl": ttl,
        "up": (up - start_up) / renewals,
        "down": (down - start_down) / renewals,
        "bytes": per,
        "per_day": per_day,
        "ms": 1000 * elapsed / renewals,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 renewals (CI)")
    parser.add_argument("--renewals", type=int, default=50)
    args = parser.parse_args(argv if argv is not None else [])
    n = 3 if args.smoke else args.renewals
    r = run(n)
    print(
        f"renewal: {n} renewals at the default lifetime {r['ttl'] / 3600:g} h: "
        f"{r['bytes']:.0f} bytes each on the wire ({r['up']:.0f} up, {r['down']:.0f} down, "
        f"TLS handshake included), {r['ms']:.0f} ms each (the agent's pure-Python key and CSR "
        f"included); {r['per_day']:.2f} renewals per node per day = "
        f"{r['bytes'] * r['per_day'] / 1024:.1f} KiB per node per day"
    )


if __name__ == "__main__":
    exit_on_sigterm()
    main(sys.argv[1:])
