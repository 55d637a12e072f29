"""Checking a role from outside its node: `{http: URL}`, `{tcp: HOST:PORT}` or `{command: ...}`;
`{on_node: {command: ...}}` is rendered here and run by the node's agent (crv.engine.stages).

Templates see `self` (the attributes the role published on that node), `node` and `params`.
Published attributes come from the node, so they are untrusted: in a `command` every value is
shell-quoted before it is substituted, and commands run with `sh -c` on crv's side, never with
the values spliced in raw.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from crv.appliance import templating
from crv.appliance.spec import Verify
from crv.base.errors import CrvError

TIMEOUT = 10.0
COMMAND_TIMEOUT = 6 * TIMEOUT
OUTPUT_TAIL = 2000
TAIL_LINES = 5  # of a failed command's output, in its one-line error
BODY_PEEK = 512  # bytes of a non-2xx answer's body read for the error
SHOWN = 200  # characters of that body shown
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class VerifyFailed(CrvError):
    """A check that did not pass. Its message is one line whatever the node sent: what the
    check saw (`HTTP 500: ...`, `connection refused`, `exited 1: ...`); the step that ran it
    (crv.engine.stages) puts the role, the node and the rendered check in front."""

    temporary = True  # a service that is still starting passes a moment later

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


@dataclass(frozen=True)
class Check:
    kind: str
    target: str

    def __str__(self) -> str:
        return f"{self.kind} {self.target}"


def one_line(text: str) -> str:
    """`text`'s non-blank lines joined by " | ", control characters (a node's output may hold
    terminal escapes) shown as "?"."""
    lines = (line.strip() for line in text.splitlines())
    return _CONTROL.sub("?", " | ".join(line for line in lines if line))


def tail(output: str) -> str:
    """The end of a command's output for its one-line error: its last TAIL_LINES non-blank
    lines, at most OUTPUT_TAIL characters."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return one_line(" | ".join(lines[-TAIL_LINES:])[-OUTPUT_TAIL:]) or "(no output)"


def exited(code: int | None, output: str) -> str:
    """What a command that failed showed: its exit code and the tail of its output."""
    return f"exited {code}: {tail(output)}"


def _saw(error: BaseException) -> str:
    """What a connection attempt met, in words (`connection refused`, `no answer within 10 s`,
    `name not found: ...`): the innermost OS error of `error`'s chain (httpx wraps it twice)."""
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException)):
        return f"no answer within {TIMEOUT:g} s"
    found: BaseException | None = error
    seen = set()
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        if isinstance(found, socket.gaierror):
            return f"name not found: {found.strerror or found}"
        if isinstance(found, ssl.SSLError):
            return f"TLS failed: {getattr(found, 'verify_message', None) or found.reason or found}"
        if isinstance(found, OSError) and isinstance(found.errno, int) and found.errno > 0:
            return os.strerror(found.errno).lower()  # asyncio's own text names only the address
        found = found.__cause__ or found.__context__
    return f"{type(error).__name__}: {error}"


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
    """Run an `http`, `tcp` or `command` check; VerifyFailed says what it saw when it fails."""
    if check.kind == "http":
        await _http(check.target, http)
    elif check.kind == "tcp":
        await _tcp(check.target)
    else:
        await _command(check.target)


async def _http(url: str, http: httpx.AsyncClient) -> None:
    try:
        async with http.stream("GET", url, timeout=TIMEOUT) as r:
            if 200 <= r.status_code < 300:
                return
            body = b""
            async for chunk in r.aiter_raw():
                body += chunk
                if len(body) >= BODY_PEEK:
                    break
    except httpx.InvalidURL as e:
        raise VerifyFailed(f"not a URL: {e}") from None
    except (httpx.HTTPError, OSError, ValueError) as e:
        raise VerifyFailed(_saw(e)) from None
    saw = f"HTTP {r.status_code}"
    if r.is_redirect:
        saw += f" to {r.headers.get('location', '?')[:SHOWN]}"
    text = one_line(body.decode(errors="replace"))
    if text and r.headers.get("content-encoding", "identity") == "identity":  # not compressed
        saw += f": {text[:SHOWN]}{'...' if len(text) > SHOWN else ''}"
    raise VerifyFailed(saw)


async def _tcp(target: str) -> None:
    host, _, port = target.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), TIMEOUT
        )
    except ValueError:
        raise VerifyFailed("not HOST:PORT") from None
    except (OSError, TimeoutError, asyncio.TimeoutError) as e:
        raise VerifyFailed(_saw(e)) from None
    writer.close()


async def _command(command: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except (TimeoutError, asyncio.TimeoutError):
        proc.kill()
        await proc.wait()
        raise VerifyFailed(f"no exit within {COMMAND_TIMEOUT:g} s; killed") from None
    if proc.returncode != 0:
        raise VerifyFailed(exited(proc.returncode, out.decode(errors="replace")))


def http_client(ca_file: str) -> httpx.AsyncClient:
    """HTTPS checks trust the crv CA (roles serve with their node certificates)."""
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(ca_file)
    return httpx.AsyncClient(
        verify=ctx,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=0),
    )
