"""`crv approve NAME` and `crv reject NAME`: answer, from a terminal, the change of a cluster that
waits for approval (flows.approval), as the form of its paused flow run in the Prefect UI does.

The waiting change is found in Prefect, not in crv's store: among the Paused flow runs, the one
whose pause key is the gate's (`crv-approval-...`) and whose stored request names the cluster
(whichever flow it is: scale-role run by `crv scale` or by a served deployment, autoscale, a
guard). It is resumed through Prefect's API with the typed input (decision, reason), exactly as
the UI resumes it, after leaving who answered (`crv approve (user)`) on the run for the gate's
record. A Paused run past its deadline is not waiting any more (the server would refuse it).

Prefect is imported only once the Prefect client is pointed at this CRV_HOME's server.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated

import typer

from crv.base.errors import CrvError
from crv_cli import daemons
from crv_cli.common import err_console, user_errors
from crv_cli.common import home as cli_home

if TYPE_CHECKING:
    from uuid import UUID

    from flows.approval import ApprovalRequest

WAITING_RUNS_LIMIT = 200  # Paused runs looked at, newest first


class NothingWaiting(CrvError):
    """No change of the cluster waits for approval (exit 2, as bad input)."""


class AnswerRefused(Exception):
    """Prefect refused the resume for another reason (exit 1)."""


@dataclass(frozen=True)
class Waiting:
    run_id: UUID
    run_name: str
    key: str
    request: ApprovalRequest


ClusterArg = Annotated[str, typer.Argument(help="Cluster name.")]
ReasonOption = Annotated[
    str,
    typer.Option("--reason", metavar="TEXT", help="Why (recorded with the answer)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def register(app: typer.Typer) -> None:
    """Add `crv approve` and `crv reject` to the `crv` command."""

    @app.command()
    def approve(name: ClusterArg, reason: ReasonOption = "", as_json: JsonOption = False) -> None:
        """Approve the change of a cluster that waits for approval (a resize removing more nodes
        than the appliance's `approval.remove_more_than`): it goes on."""
        _answer(name, "approve", reason, as_json)

    @app.command()
    def reject(name: ClusterArg, reason: ReasonOption = "", as_json: JsonOption = False) -> None:
        """Reject the change of a cluster that waits for approval: it ends without changing
        anything (its command fails with the rejection)."""
        _answer(name, "reject", reason, as_json)


def _answer(cluster: str, decision: str, reason: str, as_json: bool) -> None:
    home = cli_home()
    with user_errors():
        daemons.prefect_settings()  # a refused CRV_PREFECT_HOST/AUTH: one line
        endpoints = daemons.running(home)
        if endpoints is None:
            raise NothingWaiting(f"no change of cluster {cluster} waits for approval (crv is not "
                                 "running)")  # fmt: skip
        os.environ.update(daemons.prefect_env(home, endpoints.prefect_api_url))
        try:
            found = asyncio.run(answer(cluster, decision, reason))
        except AnswerRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(1) from None
    r = found.request
    if as_json:
        print(json.dumps({
            **r.model_dump(), "decision": decision, "reason": reason,
            "flow_run": str(found.run_id), "flow_run_name": found.run_name,
        }))  # fmt: skip
        return
    verb = "approved" if decision == "approve" else "rejected"
    print(f"{verb}: {r.describe()}" + (f"; reason: {reason}" if reason else ""))


async def waiting_changes(cluster: str) -> list[Waiting]:
    """The changes of `cluster` that wait for approval now, newest first (one, unless a process
    that waited was killed: its run stays Paused until its deadline)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import PrefectHTTPStatusError
    from pydantic import ValidationError

    from flows.approval import KEY_PREFIX, REQUEST_SUFFIX, ApprovalRequest

    paused = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    found: list[Waiting] = []
    now = datetime.now(timezone.utc)
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=paused, sort=FlowRunSort.START_TIME_DESC, limit=WAITING_RUNS_LIMIT
        )
        for run in runs:
            details = run.state.state_details if run.state is not None else None
            key = details.pause_key if details is not None else None
            if details is None or not key or not key.startswith(KEY_PREFIX):
                continue
            if details.pause_timeout is not None and details.pause_timeout < now:
                continue  # its wait ran out: a resume would be refused
            try:
                value = await client.read_flow_run_input(run.id, key + REQUEST_SUFFIX)
                request = ApprovalRequest.model_validate_json(value)
            except (PrefectHTTPStatusError, ValidationError):
                continue  # not (or no longer) a request of the gate
            if request.cluster == cluster:
                found.append(Waiting(run.id, run.name, key, request))
    return found


async def answer(cluster: str, decision: str, reason: str) -> Waiting:
    """Resume the newest change of `cluster` waiting for approval with `decision` (approve or
    reject) and `reason`, as the Prefect UI's form does. NothingWaiting when there is none (or it
    stopped waiting meanwhile); AnswerRefused when Prefect refuses the answer otherwise."""
    from prefect import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.approval import ANSWERED_BY_SUFFIX, Answer, answered_by_cli, one_line

    body = Answer(decision=decision, reason=one_line(reason))
    found = await waiting_changes(cluster)
    if not found:
        raise NothingWaiting(f"no change of cluster {cluster} waits for approval")
    waiting = found[0]
    marker = waiting.key + ANSWERED_BY_SUFFIX
    async with get_client() as client:
        try:
            await client.create_flow_run_input(
                waiting.run_id, marker, json.dumps(answered_by_cli(decision))
            )
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 409:
                raise
            # another answer from a terminal at the same time: the first resume decides
        result = await client.resume_flow_run(waiting.run_id, run_input=body.model_dump())
        if result.status == SetStateStatus.ACCEPT:
            return waiting
        await client.delete_flow_run_input(waiting.run_id, marker)
    why = getattr(result.details, "reason", None)
    if result.status == SetStateStatus.ABORT or (result.state and result.state.is_failed()):
        raise NothingWaiting(
            f"no change of cluster {cluster} waits for approval any more ({why or 'ended'})"
        )
    raise AnswerRefused(f"Prefect refused the answer to flow run {waiting.run_name}: {why}")


def announce_waits(prefect_ui_url: str) -> None:
    """In this process (a flow run by `crv scale`): say when the change waits for approval and
    how to answer it."""
    from flows.approval import WAITING_LISTENERS, duration

    def say(request: ApprovalRequest, run_id: UUID) -> None:
        name = request.cluster
        err_console.print(
            f"{request.describe()}: waits for approval (up to {duration(request.timeout)}): "
            f"`crv approve {name}` or `crv reject {name}` (--reason TEXT), or this run's form in "
            f"the Prefect UI: {prefect_ui_url}/runs/flow-run/{run_id}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )

    WAITING_LISTENERS.append(say)
