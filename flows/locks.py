"""One change per cluster at a time: a Prefect global concurrency limit used as a mutex.

Every change to a cluster (deploy, destroy, ...), whichever way it was triggered (UI, CLI,
schedule, API), runs its whole body inside `async with cluster_change(name, wait=...)`. The slot
is Prefect's own: a global concurrency limit named `crv-cluster-<name>` with `limit=1` and no
slot decay (a decaying limit frees slots on a timer: a rate limit, not a mutex), held through
`prefect.concurrency.asyncio.concurrency` (the lease-based API). The limit is created on first
use and put back to `limit=1, active, no decay` if someone edited it in the UI. A second change
waits (`wait=None`), waits up to `wait` seconds, or is refused at once (`wait=0`) with
`ClusterBusy`; it never interleaves.

What Prefect 3.8.8 does (read in its source, then measured on this machine):

- A slot is a lease. The server refuses leases shorter than 60 s (422) or longer than a day.
  The holder renews it from a daemon thread at once on entry, then every 75 % of the lease (45 s
  for our 60 s), and releases it on exit, so a live change keeps the slot however long it runs
  (measured: a holder of 100 s kept it; the waiter entered 0.3 s after it let go).
- A holder killed with SIGKILL stops renewing; the server's repossessor (a loop every
  `PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS`, default 15 s) revokes the expired lease.
  The slot is free 15 to 60 s after the kill (the lease left since the last renewal), plus up to
  one repossessor loop, plus the waiter's next retry. Measured, killed 1 s after entry: the
  next holder entered 72 s after the first had (default 15 s loop), 60.4 s (1 s loop, as in
  tests/test_locks.py). 60 s is the floor the server allows, so "within a minute" is the best
  Prefect can do; `PREFECT_SERVER_SETTINGS` shortens the loop.
- The server keeps leases in memory by default while the occupied count is in its database: a
  server restart while a slot is held forgets the lease, not the count, and the slot stays taken
  for good (measured: `active_slots` still 1, 85 s after the restart; the way out is resetting
  the limit's active slots in the UI). With the filesystem lease storage (under PREFECT_HOME,
  see `PREFECT_SERVER_SETTINGS`) the lease survives and expires as usual (measured: free 64 s after
  entry across a restart).
- If renewal fails (the server unreachable for ~3 s of retries, or this process suspended past
  its lease) the slot may already be someone else's: Prefect cancels the body
  (`raise_on_lease_renewal_failure=True`) and we raise `ClusterLockLost` rather than go on and
  interleave. Measured with SIGSTOP for 67 s: another holder took the slot; 4 s after SIGCONT
  the stopped holder got 410 three times and stopped with ClusterLockLost.
- Holders: the lease records who holds it (we pass the flow run as `holder`), but 3.8.8's API
  does not give out the holders of a global limit (`GET /v2/concurrency_limits/{name}` has only
  the count; the v1 tag endpoint lists `task_run` holders of `tag:` limits only). So
  `ClusterBusy` names the cluster, not the holder; that is the cluster's running flow run.
- Waiting: while held, the server answers 423 with a `Retry-After` from the limit's average
  occupancy (at most `PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS`, default
  30 s, with jitter), so after long changes a waiter can start up to ~30 s after the slot frees.
- Inside one process Prefect queues acquisitions of the same limit one after another (a service
  per set of limit names), and `wait` counts from when the queue reaches the caller. Our own
  deadline answers every caller within `wait` + GRACE_SECONDS even when queued behind another
  caller in its process (measured: a `wait=0` caller behind an in-process waiter was refused
  when that waiter got the slot, 4.9 s later). Changes from separate processes (the CLI, each
  flow run a worker starts) do not queue on each other in the client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from uuid import UUID

import anyio
import httpx
from prefect._internal.concurrency.cancellation import CancelledError as PrefectCancelled
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencySlotAcquisitionError,
    concurrency,
)
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from crv.base.errors import CrvError

LIMIT_PREFIX = "crv-cluster-"
# The shortest lease Prefect's server accepts (it answers 422 below 60 s): the fastest recovery
# after a killed holder. Renewal every 45 s costs one small request.
LEASE_SECONDS = 60.0
# How long a bounded wait may overrun `wait` (first contact with the server, Prefect's queue).
GRACE_SECONDS = 10.0

# The Prefect server's settings for these leases (`PREFECT_SERVER_SETTINGS` in crv.base.running,
# with crv's other Prefect environment, so the CLI need not import Prefect to start a server);
# `crv up` starts its server with them:
# concurrency leases kept on disk, so a slot held across a server restart is not taken for good
# (the default keeps leases in memory but the count in the database), and a dead holder's slot
# freed within ~5 s of its lease running out.


class ClusterBusy(CrvError):
    """Another change holds the cluster's change slot (refused at once, or `wait` ran out).

    Prefect 3.8.8 does not say who holds a global concurrency limit, so the message names the
    cluster only. Temporary: the other change finishes, and trying again later can succeed.
    """

    temporary = True

    def __init__(self, cluster: str, waited: float | None) -> None:
        self.cluster = cluster
        self.waited = waited
        after = "" if not waited else f" (waited {waited:g} s)"
        super().__init__(
            f"cluster {cluster} is busy: another change to it is running{after}; "
            "try again when it has finished"
        )

    def __reduce__(self) -> tuple[type[ClusterBusy], tuple[str, float | None]]:
        return (ClusterBusy, (self.cluster, self.waited))  # pickles (Prefect results) round-trip


class ClusterLockError(CrvError):
    """The change slot could not be taken or kept for a reason other than another change."""

    temporary = True


class ClusterLockLost(ClusterLockError):
    """The slot's lease could not be renewed, so the change was stopped before it could overlap
    another one (Prefect's server unreachable for a while, or this process suspended)."""


class _HideRefusals(logging.Filter):
    """Drop Prefect's error log for an attempt refused (423 with `wait=0`) or timed out (`wait=N`):
    that is the refusal we report as `ClusterBusy`, not a failure of its acquisition service."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Service %r failed to process item"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        item = args[1] if len(args) > 1 else None
        future = item[-1] if isinstance(item, tuple) and item else None
        if not isinstance(future, concurrent.futures.Future) or not future.done():
            return True
        if future.cancelled():
            return True
        exc = future.exception()
        if isinstance(exc, TimeoutError):  # `wait=N` ran out: ClusterBusy too
            return False
        return not (isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 423)


logging.getLogger("prefect._internal.concurrency").addFilter(_HideRefusals())


def limit_name(cluster: str) -> str:
    """The Prefect global concurrency limit that is the change slot of `cluster`."""
    return f"{LIMIT_PREFIX}{cluster}"


def _holder() -> ConcurrencyLeaseHolder | None:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=UUID(str(ctx.flow_run.id)))


async def ensure_limit(cluster: str) -> None:
    """Create the cluster's limit if missing, and make it a mutex again if it was edited."""
    name = limit_name(cluster)
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # created by a concurrent change
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(
                        name=name, limit=1, active=True, slot_decay_per_second=0.0
                    )
                )
            return
        if limit.limit != 1 or not limit.active or limit.slot_decay_per_second != 0.0:
            await client.update_global_concurrency_limit(
                name,
                GlobalConcurrencyLimitUpdate(limit=1, active=True, slot_decay_per_second=0.0),
            )


def _is_locked(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


@contextlib.asynccontextmanager
async def cluster_change(cluster: str, *, wait: float | None) -> AsyncIterator[None]:
    """Hold the change slot of `cluster` for the body of the `async with`.

    `wait=None` waits as long as it takes, `wait=0` refuses at once if the slot is held, and
    `wait=N` waits up to N seconds; a refusal raises `ClusterBusy`. Works inside a flow run
    (the lease names the flow run as holder) and outside one; needs PREFECT_API_URL.
    """
    if wait is not None and wait < 0:
        raise ValueError(f"wait must be None or >= 0, not {wait!r}")
    try:
        await ensure_limit(cluster)
    except (httpx.HTTPError, OSError) as e:
        raise ClusterLockError(
            f"cannot set up the change slot of cluster {cluster}: {type(e).__name__}: {e}"
        ) from e

    slot = concurrency(
        limit_name(cluster),
        occupy=1,
        # wait=0: one attempt, a 423 comes back as an error instead of a retry
        timeout_seconds=wait if wait else None,
        max_retries=0 if wait == 0 else None,
        lease_duration=LEASE_SECONDS,
        strict=True,  # a limit deleted under us must fail, not silently skip the lock
        holder=_holder(),
        raise_on_lease_renewal_failure=True,
    )
    # Prefect's entry opens a cancel scope that stays open for the body, and cancel scopes close
    # in reverse order: so our deadline is a scope around the body too, lifted once we hold.
    deadline = math.inf if wait is None else anyio.current_time() + wait + GRACE_SECONDS
    acquired = False
    with anyio.CancelScope(deadline=deadline) as scope:
        try:
            await slot.__aenter__()
        except AcquireConcurrencySlotTimeoutError:
            raise ClusterBusy(cluster, wait) from None
        except ConcurrencySlotAcquisitionError as e:
            if _is_locked(e):
                raise ClusterBusy(cluster, wait) from None
            why = f"{e} ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else str(e)
            raise ClusterLockError(
                f"cannot take the change slot of cluster {cluster}: {why}"
            ) from e
        acquired = True
        scope.deadline = math.inf

        body_error: BaseException | None = None
        try:
            yield
        except BaseException as e:  # handed to Prefect's exit below, then raised again
            body_error = e
        try:
            await slot.__aexit__(
                type(body_error) if body_error else None,
                body_error,
                body_error.__traceback__ if body_error else None,
            )
        except asyncio.CancelledError as e:
            if e is not body_error and _lease_lost(e):
                raise ClusterLockLost(
                    f"lost the change slot of cluster {cluster} (lease renewal failed): "
                    "stopped so as not to overlap another change"
                ) from body_error
            raise
        if body_error is not None:
            raise body_error
    if not acquired:  # our deadline ran out while Prefect was still queueing the request
        raise ClusterBusy(cluster, wait)


def _lease_lost(exc: asyncio.CancelledError) -> bool:
    """Prefect cancelled the body from its lease-renewal thread (not a cancellation from the
    outside, which leaves the task's cancel count raised while it propagates)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python >= 3.11
    return isinstance(exc, PrefectCancelled) and (cancelling is None or cancelling() == 0)
