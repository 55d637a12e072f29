"""The approval gate: a resize that would remove more nodes than the appliance's
`approval.remove_more_than` waits for a person to approve or reject it.

Why a pause and not a question asked before the run: the resize may come from anywhere (`crv
scale`, the scale-role deployment run from the UI or the REST API, the scheduled autoscale flow,
a guard), and only once its victims are chosen is it known how many nodes it removes. So the
flow run that holds the cluster's change slot pauses itself right there, before any drain,
release or destroy, with Prefect's own pause: `prefect.flow_runs.apause_flow_run(wait_for_input=
Answer..., timeout=..., key=...)`. The Prefect UI then shows the run as Paused with a typed form
(decision: approve / reject, a reason) under a description of the change; `crv approve NAME` and
`crv reject NAME` (crv_cli.approval) resume the same run with the same input through the API
(`POST /flow_runs/{id}/resume` with `run_input`, as the UI does). The cluster's slot stays held
while it waits (no other change interleaves); a rejected change raises `Rejected` before
anything was touched, so the caller's `cluster_change` releases the slot as after any failure.

Who asked and what: before pausing, the run stores the request (`ApprovalRequest`) as a flow run
input under `<pause key>-request`; the pause key is `crv-approval-<digest of the change>` (stable:
the same change asked twice in one run is not asked again, Prefect answers the first answer), so
`crv approve` finds a cluster's waiting change among the Paused runs by the key's prefix and that
input, whichever flow it is and however it was started. `crv approve` also leaves
`<pause key>-answered-by` (`crv approve (user)`): a resume without it came from the UI or the API.

Every outcome is logged, emitted as a Prefect event on the cluster (`crv.change.approval-requested`,
`crv.change.approved`, `crv.change.rejected`; payload: group, before, after, victims, by, and the
answer) and is one line: the gate's return value when approved, the `Rejected` error's text when
rejected or unanswered, which the autoscale flow records as its decision's outcome.

What Prefect 3.8.8 does that matters here (read in its source, then seen in the tests):
- `apause_flow_run` polls the run's state every `poll_interval` (we ask POLL_SECONDS, not its
  10 s) and raises `prefect.exceptions.FlowPauseTimeout` when `timeout` ran out; the run is then
  still Paused on the server, and past its pause deadline the server turns *any* next state but
  Cancelling into `Failed("The flow was paused and never resumed.")` (HandleResumingPausedFlows),
  and keeps new task runs Paused. So after a timeout the gate puts the run back to Running itself
  (`force=True`: the deadline has passed) before raising `Rejected`: the run then fails with
  crv's own line, and an autoscale run that records the rejection goes on and completes.
- A resume whose input does not validate against the saved form is refused by the server (the run
  stays Paused); a resume that comes after the deadline is refused and fails the run.
- Pausing needs a flow run context only: it works the same in a flow run the CLI runs in its own
  process (`crv scale`) and in one a served deployment or a worker runs (the process stays alive,
  blocked in the poll; `suspend_flow_run` would end it, and needs persisted results).
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Literal
from uuid import UUID

import pydantic
from prefect import get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, PrefectHTTPStatusError
from prefect.flow_runs import apause_flow_run
from prefect.input import RunInput
from prefect.input.run_input import Keyset, keyset_from_paused_state
from prefect.states import Paused, Running
from pydantic import Field

from crv.appliance.spec import Approval
from crv.base.errors import CrvError
from flows import events

APPROVAL_REQUESTED = "crv.change.approval-requested"
APPROVED = "crv.change.approved"
REJECTED = "crv.change.rejected"
CHANGE_EVENTS = frozenset({APPROVAL_REQUESTED, APPROVED, REJECTED})

KEY_PREFIX = "crv-approval-"  # every pause of the gate; flow run input keys: [a-z0-9-] only
REQUEST_SUFFIX = "-request"
ANSWERED_BY_SUFFIX = "-answered-by"
UI = "in the Prefect UI"
POLL_SECONDS = 2  # how soon an answer is seen (Prefect's default: 10 s)
REASON_MAX = 500


class Rejected(CrvError):
    """A change that needed approval was rejected, or not answered in time: nothing of it was
    done. Permanent: asking again is a new change (run the command again)."""


class Answer(RunInput):
    """The form the Prefect UI shows on the paused run, and what `crv approve` sends."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: the change goes on; reject: nothing changes"
    )
    reason: str = Field("", max_length=REASON_MAX, description="Why (recorded with the answer)")


class ApprovalRequest(pydantic.BaseModel):
    """What waits for approval: stored on the paused run for `crv approve` to find and show."""

    model_config = pydantic.ConfigDict(extra="ignore")

    cluster: str
    group: str
    before: int
    after: int
    victims: list[str]
    by: str  # who asked for the change: "crv scale", "autoscale", "guard: lease", ...
    timeout: float  # seconds it waits for an answer

    def change(self) -> str:
        """The change in a few words: "shrinking worker from 3 to 1 nodes"."""
        return f"shrinking {self.group} from {self.before} to {self.after} nodes"

    def removing(self) -> str:
        """The victims, the first ten named."""
        named = ", ".join(self.victims[:10])
        more = len(self.victims) - 10
        return named + (f" and {more} more" if more > 0 else "")

    def describe(self) -> str:
        """The whole change on one line, victims included."""
        removing = self.removing()
        return f"cluster {self.cluster}: {self.change()} (removing {removing}), asked by {self.by}"


# Called with (request, flow run id) once the run is Paused, in the process that runs the flow:
# `crv scale` prints how to answer (crv_cli.approval.announce_waits).
WAITING_LISTENERS: list[Callable[[ApprovalRequest, UUID], None]] = []


def removal_limit(approval: Approval, before: int) -> int:
    """The most nodes of a group of `before` that a change may remove without approval: the
    number, or the share of `before` rounded down ("50%" of 3 is 1)."""
    limit = approval.remove_more_than
    if isinstance(limit, str):
        return before * int(limit.rstrip("%")) // 100
    return limit


def needs_approval(approval: Approval | None, before: int, removed: int) -> bool:
    """Whether removing `removed` of `before` nodes waits for approval: more than the limit."""
    return approval is not None and removed > removal_limit(approval, before)


def pause_key(request: ApprovalRequest) -> str:
    """Stable per change (cluster, group, size, victims): the same change asked again in one run
    is answered by its first answer (Prefect does not pause twice on one key)."""
    change = [request.cluster, request.group, request.before, sorted(request.victims)]
    digest = hashlib.sha256(json.dumps(change).encode()).hexdigest()[:24]
    return f"{KEY_PREFIX}{digest}"


def keyset(key: str) -> Keyset:
    """Prefect's input keys of the pause `key` (its form's schema, description, response)."""
    return keyset_from_paused_state(Paused(pause_key=key))


def duration(seconds: float) -> str:
    """Seconds as the appliance writes them: 1h, 5m, 90s."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def one_line(text: str, limit: int = REASON_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def answered_by_cli(command: str) -> str:
    """Who answers from this terminal (`command`: approve or reject), as the gate records it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown user"
    return f"by crv {command} ({user})"


async def gate(
    cluster: str,
    group: str,
    before: int,
    victims: Sequence[str],
    approval: Approval | None,
    *,
    by: str,
    appliance: str = "",
    pool: str = "",
) -> str | None:
    """Wait for approval when removing `victims` of the `before` nodes of `group` is more than
    `approval` allows (None: no gate, nothing to wait for). Returns None when no approval was
    needed, else one line saying who approved it; raises `Rejected` (one line) when a person
    rejected it or nobody answered within `approval.timeout`. Call it inside the flow run that
    holds the cluster's change slot, before anything of the change is done."""
    if approval is None or not needs_approval(approval, before, len(victims)):
        return None
    request = ApprovalRequest(
        cluster=cluster,
        group=group,
        before=before,
        after=before - len(victims),
        victims=list(victims),
        by=by,
        timeout=approval.timeout,
    )
    logger = get_run_logger()
    resource = events.cluster_resource(cluster, appliance, pool)
    limit = removal_limit(approval, before)
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:  # resize is always called in a flow run
        raise Rejected(f"{request.change()} needs approval, and only a flow run can wait for it")
    run_id = UUID(str(context.flow_run.id))
    key = pause_key(request)
    logger.warning(
        "%s removes %d nodes, more than approval.remove_more_than %s (%d): waiting up to %s "
        "for approval (`crv approve %s` / `crv reject %s`, or this run's form in the Prefect UI)",
        request.describe(), len(victims), approval.remove_more_than, limit,
        duration(approval.timeout), cluster, cluster,
    )  # fmt: skip
    payload = request.model_dump(exclude={"cluster"})
    events._emit(APPROVAL_REQUESTED, resource, [], {**payload, "limit": limit})
    async with get_client() as client:
        try:
            await client.create_flow_run_input(
                run_id, key + REQUEST_SUFFIX, request.model_dump_json()
            )
        except PrefectHTTPStatusError as exc:  # 409: asked before in this run (same key)
            if exc.response.status_code != 409:
                raise
    form = Answer.with_initial_data(
        description=f"**Approve or reject**: {request.describe()}.\n\n"
        f"Rejecting, or no answer within {duration(approval.timeout)}, leaves the cluster as "
        f"it is. From a terminal: `crv approve {cluster}` or `crv reject {cluster}`."
    )
    announcing = (
        asyncio.ensure_future(_announce_when_paused(request, run_id)) if WAITING_LISTENERS else None
    )
    try:
        answer: Answer | None = await apause_flow_run(
            wait_for_input=form,
            timeout=max(1, math.ceil(approval.timeout)),
            poll_interval=POLL_SECONDS,
            key=key,
        )
    except FlowPauseTimeout:
        answer = await _after_timeout(run_id, key)
    except pydantic.ValidationError:  # the same key paused before in this run, never answered
        answer = None
    finally:
        if announcing is not None:
            announcing.cancel()
    if answer is None:
        line = f"{request.change()}: no answer within {duration(approval.timeout)}: rejected"
        logger.warning("cluster %s: %s", cluster, line)
        events._emit(REJECTED, resource, [], {**payload, "decision": "timeout", "reason": line})
        raise Rejected(line)
    who = await _answered_by(run_id, key)
    reason = one_line(answer.reason)
    verb = "approved" if answer.decision == "approve" else "rejected"
    line = f"{request.change()} {verb} {who}" + (f": {reason}" if reason else "")
    answered = {**payload, "decision": answer.decision, "answered_by": who, "reason": reason}
    if answer.decision != "approve":
        logger.warning("cluster %s: %s", cluster, line)
        events._emit(REJECTED, resource, [], answered)
        raise Rejected(line)
    logger.info("cluster %s: %s", cluster, line)
    events._emit(APPROVED, resource, [], answered)
    return line


async def _announce_when_paused(request: ApprovalRequest, run_id: UUID) -> None:
    """Tell the listeners once the run is Paused (so that an answer given right away finds it)."""
    async with get_client() as client:
        for _ in range(300):
            run = await client.read_flow_run(run_id)
            if run.state is not None and run.state.is_paused():
                break
            await asyncio.sleep(0.1)
        else:
            return
    for listener in WAITING_LISTENERS:
        listener(request, run_id)


async def _after_timeout(run_id: UUID, key: str) -> Answer | None:
    """No answer seen within the timeout: put the run back to Running (past its pause deadline
    Prefect's server would turn any next state into its own failure, and keep new task runs
    paused), then take an answer that came in at the last moment, if any."""
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        if run.state is not None and run.state.is_paused():
            await client.set_flow_run_state(
                run_id, Running(message="no answer to the approval: rejected"), force=True
            )
        try:
            value = await client.read_flow_run_input(run_id, keyset(key)["response"])
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == 404:
                return None
            raise
    try:
        return Answer.model_validate_json(value)
    except pydantic.ValidationError:
        return None


async def _answered_by(run_id: UUID, key: str) -> str:
    async with get_client() as client:
        try:
            value = await client.read_flow_run_input(run_id, key + ANSWERED_BY_SUFFIX)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == 404:
                return UI
            raise
    try:
        who = json.loads(value)
    except ValueError:
        return UI
    return one_line(who, 100) if isinstance(who, str) and who else UI
