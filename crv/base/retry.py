"""The one retry policy: how often, how long between, and which errors deserve another try.

Only errors that say they are temporary are retried (a refused certificate or a bad appliance
fails at once); delays grow exponentially up to a cap and carry jitter, so a thousand nodes that
failed together do not retry together. An error may ask for a longer wait (`CrvError.delay`, a
cloud's `Retry-After`): it is honoured up to `asked_cap`. Retries are bounded by their number
and, when the policy has one, by a deadline counted from the first attempt: a wait that would
end past it is cut to end at it (one last try), and a wait the other side asked for that ends
past it gives up at once, since trying earlier is pointless. The Prefect tasks use the same
numbers (tasks/policy.py); the cloud pool retries a provider's rate limits with it (pools/cloud).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import mktime_tz, parsedate_tz
from typing import TypeVar

from crv.base.errors import CrvError

T = TypeVar("T")


@dataclass(frozen=True)
class Next:
    """What follows a failed attempt: another one after `wait` seconds, or, when `wait` is None,
    none; `why` then says why in a few words ("" when the error is not worth a retry at all)."""

    wait: float | None
    why: str = ""


def asked_delay(error: BaseException | None) -> float | None:
    """The positive delay an error asked for (`CrvError.delay`), or None."""
    asked = getattr(error, "delay", None)
    if isinstance(asked, int | float) and not isinstance(asked, bool) and asked > 0:
        return float(asked)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2
    base: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    asked_cap: float = 300.0  # the longest wait an error's own `delay` may impose
    deadline: float | None = None  # seconds from the first attempt; None: bounded by `retries`

    def delays(self) -> list[float]:
        """The nominal delays before retry 1..retries, without jitter."""
        return [min(self.cap, self.base * self.factor**i) for i in range(self.retries)]

    def delay(self, attempt: int, error: BaseException | None = None) -> float:
        """The wait before retry `attempt + 1`: the nominal delay with jitter, or longer when
        the error asked for a longer wait (`CrvError.delay`, e.g. a cloud's Retry-After)."""
        nominal = self.delays()[attempt]
        wait = max(0.0, nominal * random.uniform(1 - self.jitter, 1 + self.jitter))
        asked = asked_delay(error)
        if asked is not None:
            wait = max(wait, min(asked, self.asked_cap))
        return wait

    def after(self, attempt: int, error: BaseException, elapsed: float) -> Next:
        """What follows the failure of attempt `attempt` (0 for the first), `elapsed` seconds
        after the first attempt began: the attempts, the deadline and an asked delay decide."""
        if not self.retryable(error):
            return Next(None)
        made = f"{attempt + 1} attempt{'s' if attempt else ''}"
        if attempt >= self.retries:
            return Next(None, f"{made} in {elapsed:.1f} s")
        wait = self.delay(attempt, error)
        if self.deadline is None:
            return Next(wait)
        left = self.deadline - elapsed
        asked = asked_delay(error)
        if asked is not None and asked > left:
            return Next(
                None,
                f"asked to wait {asked:.0f} s, past the retry deadline of {self.deadline:.0f} s "
                f"({max(left, 0.0):.1f} s left after {made})",
            )
        if left <= 0:
            return Next(
                None,
                f"{made} in {elapsed:.1f} s, the retry deadline of {self.deadline:.0f} s passed",
            )
        return Next(min(wait, left))

    @staticmethod
    def retryable(error: BaseException) -> bool:
        return isinstance(error, CrvError) and error.temporary

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, tried again after a retryable error up to `retries` times (and within
        the deadline, if any); the last error is raised."""
        started = time.monotonic()
        tried = 0
        while True:
            try:
                return await attempt()
            except Exception as e:
                step = self.after(tried, e, time.monotonic() - started)
                if step.wait is None:
                    raise
            await asyncio.sleep(step.wait)
            tried += 1


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A `Retry-After` header in seconds from `now` (epoch; default the current time): its
    value is delta-seconds (`120`) or an HTTP-date (`Fri, 31 Dec 1999 23:59:59 GMT`, RFC 9110
    10.2.3). A date in the past is 0; anything else (empty, negative, not a number nor a date)
    is None, as if there were no header."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        parsed = parsedate_tz(text)
        if parsed is None:
            return None
        when = mktime_tz(parsed)
        return max(0.0, when - (time.time() if now is None else now))
    if seconds != seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative, inf
        return None
    return seconds


DEFAULT_POLICY = RetryPolicy()
