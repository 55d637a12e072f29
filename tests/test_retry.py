"""crv.base.retry: the one retry policy's `call`."""

from __future__ import annotations

import asyncio

import pytest

from crv.base.errors import CrvError, PermanentError, TemporaryError
from crv.base.retry import RetryPolicy

FAST = RetryPolicy(retries=2, base=0.0)


class Flaky:
    """Fails with `errors` in turn, then returns "ok"; counts the attempts."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def temporary(text: str) -> CrvError:
    error = CrvError(text)
    error.temporary = True
    return error


def test_a_temporary_error_is_tried_again() -> None:
    attempt = Flaky(temporary("busy"), temporary("busy"))
    assert asyncio.run(FAST.call(attempt)) == "ok"
    assert attempt.attempts == 3


def test_the_last_temporary_error_is_raised_after_the_retries() -> None:
    attempt = Flaky(*(temporary(f"busy {i}") for i in range(3)))
    with pytest.raises(CrvError, match="busy 2"):
        asyncio.run(FAST.call(attempt))
    assert attempt.attempts == 3


@pytest.mark.parametrize("error", [CrvError("refused"), ValueError("a bug")])
def test_anything_else_is_raised_at_once(error: Exception) -> None:
    attempt = Flaky(error)
    with pytest.raises(type(error)):
        asyncio.run(FAST.call(attempt))
    assert attempt.attempts == 1


def test_a_temporary_error_that_asks_for_a_delay_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    attempt = Flaky(TemporaryError("throttled", delay=7.5), TemporaryError("busy"))
    assert asyncio.run(FAST.call(attempt)) == "ok"
    assert slept == [7.5, 0.0]  # the asked delay, then the policy's own (base 0 here)


def test_an_asked_delay_never_shortens_the_policy_and_is_capped() -> None:
    policy = RetryPolicy(retries=1, base=10.0, jitter=0.0, asked_cap=60.0)
    assert policy.delay(0, TemporaryError("x", delay=2.0)) == 10.0
    assert policy.delay(0, TemporaryError("x", delay=3600.0)) == 60.0
    assert policy.delay(0, TemporaryError("x")) == 10.0


def test_temporary_and_permanent_errors_say_so() -> None:
    assert RetryPolicy.retryable(TemporaryError("busy"))
    assert not RetryPolicy.retryable(PermanentError("refused"))
    assert TemporaryError("busy", delay=3).delay == 3
