"""moto's EC2 server as a real separate process on loopback, for pool tests.

`moto_ec2` is a module-scoped pytest fixture (import it into a test module to use it): it starts
`moto_server -H 127.0.0.1 -p PORT` from the venv on a free port, with AMI and instance-type
validation on (so an unknown image or size is refused as by AWS), waits until it answers, and
kills it at the end. Tests keep apart through distinct cluster names; `reset` empties the
server for a test that needs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
START_TIMEOUT = 30.0

# The server the active `moto_ec2` fixture runs (for helpers such as make_pool).
CURRENT: MotoServer | None = None


@dataclass(frozen=True)
class MotoServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reset(self) -> None:
        """Forget every resource (moto's own reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as answer:
            answer.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def moto_ec2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    if not MOTO_SERVER.exists():
        pytest.skip(f"{MOTO_SERVER} not installed (pip install 'moto[server]')")
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {
        **os.environ,
        "MOTO_ENABLE_AMI_VALIDATION": "true",
        "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
    }
    for _ in range(3):  # the free port may be taken between bind and the server's start
        server = MotoServer("127.0.0.1", free_port())
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", server.host, "-p", str(server.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(server.url):
                break
            time.sleep(0.1)
        if proc.poll() is None and _answers(server.url):
            break
        proc.kill()
        proc.wait()
    else:
        raise RuntimeError(f"moto_server did not start; see {log}")
    global CURRENT
    CURRENT = server
    try:
        yield server
    finally:
        CURRENT = None
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
