"""The one retry policy: how often, how long between, and which errors deserve another try.

Only errors that say they are temporary are retried (a refused certificate or a bad appliance
fails at once); delays grow exponentially up to a cap and carry jitter, so a thousand nodes that
failed together do not retry together. The Prefect tasks use the same numbers (tasks/policy.py).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from crv.base.errors import CrvError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2
    base: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delays(self) -> list[float]:
        """The nominal delays before retry 1..retries, without jitter."""
        return [min(self.cap, self.base * self.factor**i) for i in range(self.retries)]

    asked_cap: float = 300.0  # the longest wait an error's own `delay` may impose

    def delay(self, attempt: int, error: BaseException | None = None) -> float:
        """The wait before retry `attempt + 1`: the nominal delay with jitter, or longer when
        the error asked for a longer wait (`CrvError.delay`, e.g. a cloud's Retry-After)."""
        nominal = self.delays()[attempt]
        wait = max(0.0, nominal * random.uniform(1 - self.jitter, 1 + self.jitter))
        asked = getattr(error, "delay", None)
        if isinstance(asked, int | float) and asked > 0:
            wait = max(wait, min(float(asked), self.asked_cap))
        return wait

    @staticmethod
    def retryable(error: BaseException) -> bool:
        return isinstance(error, CrvError) and error.temporary

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, tried again after a retryable error up to `retries` times; the last
        error is raised."""
        for tried in range(self.retries):
            try:
                return await attempt()
            except Exception as e:
                if not self.retryable(e):
                    raise
                wait = self.delay(tried, e)
            await asyncio.sleep(wait)
        return await attempt()


DEFAULT_POLICY = RetryPolicy()
