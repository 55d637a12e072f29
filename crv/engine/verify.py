"""Checking a role from outside its node: `{http: URL}`, `{tcp: HOST:PORT}` or `{command: ...}`;
`{on_node: {command: ...}}` is rendered here and run by the node's agent (crv.engine.stages).

Templates see `self` (the attributes the role published on that node), `node` and `params`.
Published attributes come from the node, so they are untrusted: in a `command` every value is
shell-quoted before it is substituted, and commands run with `sh -c` on crv's side, never with
the values spliced in raw.
"""

from __future__ import annotations

import asyncio
import shlex
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from crv.appliance import templating
from crv.appliance.spec import Verify
from crv.base.errors import CrvError

TIMEOUT = 10.0
OUTPUT_TAIL = 2000


class VerifyFailed(CrvError):
    temporary = True  # a service that is still starting passes a moment later


@dataclass(frozen=True)
class Check:
    kind: str
    target: str

    def __str__(self) -> str:
        return f"{self.kind} {self.target}"


def render(
    verify: Verify,
    attributes: Mapping[str, str],
    node: Mapping[str, Any],
    params: Mapping[str, Any],
) -> Check:
    kind = verify.kind
    shell = kind in ("command", "on_node")
    quote = (lambda v: shlex.quote(str(v))) if shell else (lambda v: v)
    variables = {
        "self": {k: quote(v) for k, v in attributes.items()},
        "node": {k: quote(v) for k, v in node.items()},
        "params": {k: quote(v) if isinstance(v, str) else v for k, v in params.items()},
    }
    try:
        return Check(kind, templating.render(verify.template, variables))
    except ValueError as e:
        raise VerifyFailed(f"verify {kind}: {e}") from None


async def run(check: Check, http: httpx.AsyncClient) -> None:
    if check.kind == "http":
        try:
            r = await http.get(check.target, timeout=TIMEOUT)
        except (httpx.HTTPError, ValueError) as e:
            raise VerifyFailed(f"GET {check.target}: {type(e).__name__}: {e}") from None
        if not 200 <= r.status_code < 300:
            raise VerifyFailed(f"GET {check.target}: HTTP {r.status_code}")
    elif check.kind == "tcp":
        host, _, port = check.target.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), TIMEOUT
            )
        except (OSError, ValueError, TimeoutError) as e:
            raise VerifyFailed(f"connect {check.target}: {type(e).__name__}: {e}") from None
        writer.close()
    else:
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            check.target,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 6 * TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise VerifyFailed(f"command {check.target!r} timed out") from None
        if proc.returncode != 0:
            tail = out.decode(errors="replace")[-OUTPUT_TAIL:].strip()
            raise VerifyFailed(f"command exited {proc.returncode}: {tail}")


def http_client(ca_file: str) -> httpx.AsyncClient:
    """HTTPS checks trust the crv CA (roles serve with their node certificates)."""
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(ca_file)
    return httpx.AsyncClient(
        verify=ctx,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=0),
    )
