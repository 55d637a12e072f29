"""crv.base.retry: the one retry policy's `call`, its deadline and `Retry-After` parsing."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import pytest

from crv.base.errors import CrvError, PermanentError, TemporaryError
from crv.base.retry import RetryPolicy, parse_retry_after

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


# ---- the deadline (F4: a storm is ridden out or given up in bounded time) -----------------


def test_waits_are_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(retries=6, base=1.0, factor=2.0, cap=10.0, jitter=0.5)
    assert policy.delays() == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    waits = {policy.delay(3) for _ in range(50)}
    assert len(waits) > 40  # jittered: a thousand nodes that failed together spread out
    assert all(4.0 <= w <= 12.0 for w in waits)


def test_without_a_deadline_only_the_attempts_bound_the_retries() -> None:
    policy = RetryPolicy(retries=2, base=1.0, jitter=0.0)
    assert policy.after(0, TemporaryError("busy"), elapsed=10_000.0).wait == 1.0
    assert policy.after(1, TemporaryError("busy"), elapsed=10_000.0).wait == 2.0
    last = policy.after(2, TemporaryError("busy"), elapsed=3.0)
    assert last.wait is None
    assert last.why == "3 attempts in 3.0 s"
    assert policy.after(0, PermanentError("refused"), elapsed=0.0).wait is None


def test_a_wait_past_the_deadline_is_cut_to_end_at_it_then_retries_stop() -> None:
    policy = RetryPolicy(retries=10, base=8.0, jitter=0.0, deadline=10.0)
    assert policy.after(0, TemporaryError("busy"), elapsed=0.0).wait == 8.0
    assert policy.after(1, TemporaryError("busy"), elapsed=8.0).wait == 2.0  # 16 s cut to 2
    over = policy.after(2, TemporaryError("busy"), elapsed=10.0)
    assert over.wait is None
    assert over.why == "3 attempts in 10.0 s, the retry deadline of 10 s passed"


def test_an_asked_wait_past_the_deadline_gives_up_at_once() -> None:
    """Waiting less than the provider asked is pointless, waiting past the deadline is not
    allowed: no sleep at all, and the reason says both numbers."""
    policy = RetryPolicy(retries=10, base=1.0, jitter=0.0, deadline=60.0)
    step = policy.after(0, TemporaryError("throttled", delay=600.0), elapsed=0.5)
    assert step.wait is None
    assert (
        step.why
        == "asked to wait 600 s, past the retry deadline of 60 s (59.5 s left after 1 attempt)"
    )
    # within the deadline an asked wait is honoured in full
    assert policy.after(0, TemporaryError("throttled", delay=30.0), elapsed=0.5).wait == 30.0


def test_call_stops_at_the_deadline_with_the_last_error() -> None:
    policy = RetryPolicy(retries=1000, base=0.05, factor=1.0, jitter=0.0, deadline=0.3)
    attempt = Flaky(*(temporary(f"busy {i}") for i in range(1000)))
    started = time.monotonic()
    with pytest.raises(CrvError, match="busy"):
        asyncio.run(policy.call(attempt))
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.0
    assert 4 <= attempt.attempts <= 8  # ~ deadline / base + the last try at the deadline


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 2 ", 2.0),
        ("0", 0.0),
        ("1.5", 1.5),  # not RFC delta-seconds, but what some providers send
        (formatdate(NOW + 90, usegmt=True), 90.0),  # an HTTP-date: seconds from now
        (formatdate(NOW + 90), 90.0),  # with a numeric zone
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # in the past: at once
        ("", None),
        ("soon", None),
        ("-5", None),
        ("nan", None),
        ("inf", None),
        (None, None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds
