"""crv.base.flock: an exclusive file lock between processes and threads, released when its holder
dies; the async waiter does not block the event loop and a cancelled one leaves nothing held."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from crv.base.flock import exclusive, exclusive_async
from tests.conftest import REPO

HOLD = """
import sys, time, pathlib
from crv.base.flock import exclusive
with exclusive(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def holder(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_second_process_waits_until_the_holder_dies(tmp_path: Path) -> None:
    lock = tmp_path / "sub" / "x.lock"  # the directory is made
    proc = holder(lock, 60)
    got = threading.Event()

    def take() -> None:
        with exclusive(lock):
            got.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    assert not got.wait(1.0)  # held by the other process
    proc.kill()  # SIGKILL: the kernel releases it
    proc.wait()
    assert got.wait(30)
    assert (lock.stat().st_mode & 0o777) == 0o600


def test_two_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    inside = 0
    most = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(20):
            with exclusive(lock):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.001)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


def test_the_async_waiter_leaves_the_loop_running_and_a_cancel_holds_nothing(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "x.lock"
    proc = holder(lock, 60)

    async def scenario() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(ticker())

        async def take() -> None:
            async with exclusive_async(lock):
                await asyncio.sleep(3600)

        waiter = asyncio.create_task(take())
        await asyncio.sleep(0.5)
        assert not waiter.done() and ticks >= 10  # waiting, and the loop goes on
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        proc.kill()
        proc.wait()
        async with exclusive_async(lock):  # free: neither the killed holder nor the waiter
            pass
        beat.cancel()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        proc.kill()
