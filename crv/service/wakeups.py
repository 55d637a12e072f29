"""Waking long polls, in this process and in the service's other processes.

A long poll (an agent's `/v1/work`, the flows' `/v1/admin/.../events`) waits on a key (a node, a
cluster) until something it may care about changed. One process: `Waiters` wakes it within
milliseconds of the change, and an idle poll costs nothing. Several processes on PostgreSQL
(crv.service.server): the process that made the change also tells the others through
PostgreSQL's LISTEN/NOTIFY (`Bus`), which delivers a notification after the transaction that
sent it commits, to every process listening on the channel, in order. The same channel carries
"forget" messages: each process keeps who a certificate names and a cluster's roles in memory,
and drops them when another process revoked a certificate or changed a cluster.

A lost notification (the listening connection dropped) is covered: on reconnecting, the bus
wakes every poll (each checks the database again) and drops every cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("crv.service")

CHANNEL = "crv_service"
MAX_PAYLOAD = 7000  # bytes per NOTIFY (PostgreSQL's limit is 8000)
RECONNECT = 1.0  # seconds between attempts to listen again


class Waiters:
    """Wake long polls by key (a node, a cluster) when something they may care about changed."""

    def __init__(self) -> None:
        self._waiting: dict[Any, set[asyncio.Future[None]]] = defaultdict(set)

    def notify(self, key: Any) -> None:
        for fut in self._waiting.pop(key, ()):
            if not fut.done():
                fut.set_result(None)

    def notify_all(self) -> None:
        self.notify_where(lambda _: True)

    def notify_where(self, chosen: Callable[[Any], bool]) -> None:
        for key in [k for k in self._waiting if chosen(k)]:
            self.notify(key)

    async def wait_until(
        self, key: Any, ready: Callable[[], Awaitable[bool]], timeout: float
    ) -> None:
        """Return once `ready()` is true or after `timeout` seconds. The waiter is in place
        before each check: a change committed while the check reads the database wakes it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiting[key].add(fut)
            try:
                if await ready():
                    return
                left = deadline - loop.time()
                if left <= 0:
                    return
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                return
            finally:
                waiting = self._waiting.get(key)
                if waiting is not None:
                    waiting.discard(fut)
                    if not waiting:
                        del self._waiting[key]


Message = list[str]  # [kind, *names]: ["node", c, n], ["nodes", c], ["cluster", c], ["forget", *c]


class Bus:
    """LISTEN/NOTIFY between the service's processes (PostgreSQL). `publish` never blocks: the
    messages of one loop turn go out together in one NOTIFY from a sender task; a listener
    task hands what the other processes sent to `deliver`."""

    def __init__(self, conninfo: str, deliver: Callable[[Message], None]) -> None:
        self._conninfo = conninfo
        self._deliver = deliver
        self._origin = f"{os.getpid()}-{id(self):x}"
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()

    def publish(self, message: Message) -> None:
        self._queue.put_nowait(message)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._send())]
        await asyncio.wait_for(self.listening.wait(), 30)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=5, application_name="crv-bus"
        )

    async def _listen(self) -> None:
        first = True
        while True:
            try:
                async with await self._connect() as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if not first:  # what was sent while we did not listen is unknown
                        log.warning("listening for the other service processes again")
                        self._deliver(["all"])
                    first = False
                    async for note in conn.notifies():
                        self._received(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # PostgreSQL restarted, the network dropped: listen again
                log.warning("LISTEN %s: %s; again in %g s", CHANNEL, _first_line(e), RECONNECT)
                await asyncio.sleep(RECONNECT)

    def _received(self, payload: str) -> None:
        try:
            origin, messages = json.loads(payload)
        except (ValueError, TypeError):
            log.warning("ignored a notification that is not crv's: %.80r", payload)
            return
        if origin == self._origin:  # this process delivered its own already
            return
        for message in messages:
            self._deliver(message)

    async def _send(self) -> None:
        conn: Any = None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for payload in self._payloads(batch):
                for attempt in range(3):
                    try:
                        if conn is None or conn.closed:
                            conn = await self._connect()
                        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                        break
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        log.warning("NOTIFY %s: %s", CHANNEL, _first_line(e))
                        conn = None
                        await asyncio.sleep(0.1 * (attempt + 1))

    def _payloads(self, batch: list[Message]) -> list[str]:
        unique = list(dict.fromkeys(json.dumps(m) for m in batch))
        out: list[str] = []
        part: list[str] = []
        for item in unique:
            if part and sum(len(p) + 1 for p in part) + len(item) > MAX_PAYLOAD:
                out.append(self._payload(part))
                part = []
            part.append(item)
        if part:
            out.append(self._payload(part))
        return out

    def _payload(self, items: list[str]) -> str:
        return json.dumps([self._origin, [json.loads(i) for i in items]])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
