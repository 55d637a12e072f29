"""An exclusive lock on a file between processes: flock(2) on a file descriptor of our own.

Two opens of the same file by two threads are two locks that exclude each other as well, so one
lock serves threads and processes alike. The lock goes with the descriptor: it is released when
the block ends, and by the kernel when the holder dies (no stale lock after a SIGKILL). Lock files
are never deleted: unlinking one races with its waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

POLL_SECONDS = 0.05  # how often an async waiter tries again


def _open(path: Path) -> int:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the lock on `path` (created 0600, with its directory) for the block; blocks until
    it is free."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.asynccontextmanager
async def exclusive_async(path: Path) -> AsyncIterator[None]:
    """`exclusive` for an event loop: waits without blocking the loop, and a cancelled waiter
    leaves nothing behind (it tries without blocking, rather than waiting in a thread that
    would go on waiting after the cancel)."""
    fd = _open(path)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(POLL_SECONDS)
        yield
    finally:
        os.close(fd)
