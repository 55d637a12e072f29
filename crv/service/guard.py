"""What keeps slow and hostile clients from holding the service's connections or filling its
log (docs/service-api.md, "Slow and hostile clients").

- `HardenedLoop`: uvloop, but every TLS server it creates drops a connection whose handshake is
  not done within a bound (asyncio's default is 60 s and uvicorn passes none).
- `ConnectionGuard`: the open connections per client address, and the bound on them; the
  protocol (crv.service.server) asks it on each connection and arms the header timeout.
- `RateLimitedLog`: a logging filter that lets a few warning lines of each message, and a
  bounded number of each kind, through per window, then says how many it held back, so refused
  requests cannot grow the log without bound.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import uvloop

ENV_HANDSHAKE_TIMEOUT = "CRV_SERVICE_HANDSHAKE_TIMEOUT"
ENV_HEADER_TIMEOUT = "CRV_SERVICE_HEADER_TIMEOUT"
ENV_MAX_CONNS = "CRV_SERVICE_MAX_CONNS_PER_CLIENT"
ENV_LOG_BURST = "CRV_SERVICE_LOG_BURST"
ENV_LOG_WINDOW = "CRV_SERVICE_LOG_WINDOW"
ENV_LOG_PER_KIND = "CRV_SERVICE_LOG_PER_KIND"

# One address legitimately opens many connections: the local pool's agents all dial from
# 127.0.0.1 (one kept-alive connection each, and one more for a heartbeat or a renewal), and
# the sim pool plays every node of a benchmark from one process, one connection per node
# (1,000 at the default benchmark size), besides the flow's own pool of 20. The default leaves
# room for that; benchmarks at larger sizes raise it (benchmarks/bench_deploy.py).
DEFAULT_MAX_CONNS = 4096
MAX_LINE = 1000  # characters of one rate-limited line (the rest is cut)
SAME_LINE = "this line again is suppressed for %.0f s: %r"
SAME_KIND = "more lines of this kind are suppressed for %.0f s: %r"


def _env_number(name: str, default: float, *, minimum: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not value >= minimum:  # NaN too
        raise ValueError(f"{name}={text!r}: at least {minimum:g}")
    return value


@dataclass(frozen=True)
class Limits:
    """The settings, from the service's environment (docs/service-api.md)."""

    handshake_timeout: float = 5.0  # seconds from TCP accept to the end of the TLS handshake
    header_timeout: float = 5.0  # seconds from a request's start (or the connection) to its headers
    max_conns_per_client: int = DEFAULT_MAX_CONNS  # open TLS connections per client address
    log_burst: int = 20  # warning lines of one message per window before suppressing
    log_window: float = 60.0  # seconds
    log_per_kind: int = 200  # warning lines of one kind (message template) per window

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            handshake_timeout=_env_number(ENV_HANDSHAKE_TIMEOUT, 5.0, minimum=0.1),
            header_timeout=_env_number(ENV_HEADER_TIMEOUT, 5.0, minimum=0.1),
            max_conns_per_client=int(_env_number(ENV_MAX_CONNS, DEFAULT_MAX_CONNS, minimum=1)),
            log_burst=int(_env_number(ENV_LOG_BURST, 20, minimum=1)),
            log_window=_env_number(ENV_LOG_WINDOW, 60.0, minimum=0.1),
            log_per_kind=int(_env_number(ENV_LOG_PER_KIND, 200, minimum=1)),
        )


class HardenedLoop(uvloop.Loop):
    """uvloop whose TLS servers get `ssl_handshake_timeout` (a client that connects and never
    finishes the handshake is dropped after it), since uvicorn calls `create_server` without;
    and the same bound on waiting for a client's close_notify when closing (30 s by default)."""

    handshake_timeout: float = Limits.handshake_timeout

    async def create_server(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None:
            if kwargs.get("ssl_handshake_timeout") is None:
                kwargs["ssl_handshake_timeout"] = self.handshake_timeout
            # closing a connection waits for the client's close_notify at most this long too
            if kwargs.get("ssl_shutdown_timeout") is None:
                kwargs["ssl_shutdown_timeout"] = self.handshake_timeout
        return await super().create_server(*args, **kwargs)


def loop_factory(limits: Limits) -> type[HardenedLoop]:
    """A loop class (a factory without arguments) with this handshake timeout."""
    return type("HardenedLoop", (HardenedLoop,), {"handshake_timeout": limits.handshake_timeout})


class ConnectionGuard:
    """Open TLS connections per client address, in one service process."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: Counter[str] = Counter()

    def admit(self, address: str) -> bool:
        if self.open[address] >= self.limits.max_conns_per_client:
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


class _Window:
    """Lines of one key in the current window: written, and held back since the last report."""

    __slots__ = ("held", "start", "written")

    def __init__(self, now: float) -> None:
        self.start, self.written, self.held = now, 0, 0

    def roll(self, now: float, window: float) -> int:
        """Starts a new window once this one is over; returns the count it held back."""
        if now - self.start < window:
            return 0
        held, self.start, self.written, self.held = self.held, now, 0, 0
        return held


class RateLimitedLog(logging.Filter):
    """Rate limits for lines at WARNING and above, per `window` seconds: at most `burst` lines
    of one message (the same refusal again and again), and at most `per_kind` lines of one
    kind (logger and message template: a set bounded by the code, whatever callers send), so a
    flood of refusals that differ (a path of the caller's choosing) is bounded as well, while a
    flood of one refusal does not hide the others. The first line held back by a limit is
    replaced by a line saying so; the next line written after its window says how many were
    held back. Lines are cut at MAX_LINE characters (a refused request's path is the caller's)."""

    MAX_MESSAGES = 10_000  # distinct messages remembered at once

    def __init__(self, burst: int = 20, window: float = 60.0, per_kind: int | None = None) -> None:
        super().__init__()
        self.burst, self.window = burst, window
        self.per_kind = 10 * burst if per_kind is None else per_kind
        self._kinds: dict[tuple[str, str], _Window] = {}
        self._messages: dict[tuple[str, str, int], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        try:
            text = record.getMessage()
        except Exception:
            return True  # a bad format is logging's to report, not ours
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + f"... ({len(text) - MAX_LINE} more characters)"
        now = time.monotonic()
        kind = self._window(self._kinds, (record.name, template), now)
        message = self._window(self._messages, (record.name, template, hash(text)), now)
        held = message.roll(now, self.window) + kind.roll(now, self.window)
        message.written += 1
        if message.written > self.burst:
            message.held += 1
            kind.held += held  # not lost: told with this kind's first line after its window
            if message.written == self.burst + 1 and kind.written < self.per_kind:
                kind.written += 1
                self._notice(record, SAME_LINE, text, message, now)
                return True
            return False
        kind.written += 1
        if kind.written > self.per_kind:
            kind.held += 1 + held
            if kind.written == self.per_kind + 1:
                self._notice(record, SAME_KIND, template, kind, now)
                return True
            return False
        if held:
            text += f" [{held} similar lines suppressed]"
        record.msg, record.args = text, None
        return True

    def _window(self, table: dict[Any, _Window], key: Any, now: float) -> _Window:
        found = table.get(key)
        if found is None:
            if len(table) >= self.MAX_MESSAGES:  # forget the windows that are over, or all
                for k in [k for k, w in table.items() if now - w.start >= self.window]:
                    del table[k]
                if len(table) >= self.MAX_MESSAGES:
                    table.clear()
            found = table[key] = _Window(now)
        return found

    def _notice(
        self, record: logging.LogRecord, form: str, text: str, w: _Window, now: float
    ) -> None:
        record.msg = form
        record.args = (max(self.window - (now - w.start), 0.0), text[:200])


def install_log_filter(limits: Limits) -> RateLimitedLog:
    """The filter on every handler the service's lines go through: the root logger's (crv's
    own, asyncio's) and uvicorn's, which do not propagate."""
    flt = RateLimitedLog(limits.log_burst, limits.log_window, limits.log_per_kind)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(flt)
    return flt
