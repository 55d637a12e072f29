"""The approval gate's pure parts (flows.approval): when a shrink needs approval (a number of
nodes, or a share of the group rounded down; at the limit it does not), the key that identifies a
change, the form the Prefect UI shows, the one-line texts. End to end: tests/test_approval_e2e.py.
"""

from __future__ import annotations

import asyncio

import pytest

from crv.appliance.spec import Approval
from flows.approval import (
    Answer,
    ApprovalRequest,
    duration,
    gate,
    keyset,
    needs_approval,
    pause_key,
    removal_limit,
)


def approval(limit: int | str, timeout: str | float = "1h") -> Approval:
    return Approval.model_validate({"remove_more_than": limit, "timeout": timeout})


@pytest.mark.parametrize(
    ("limit", "before", "removed", "gated"),
    [
        (1, 3, 0, False),
        (1, 3, 1, False),  # at the limit
        (1, 3, 2, True),  # over it
        (0, 3, 1, True),  # any removal
        (2, 10, 3, True),
        ("50%", 3, 1, False),  # 50 % of 3 is 1 (rounded down)
        ("50%", 3, 2, True),
        ("50%", 4, 2, False),  # at the share
        ("50%", 4, 3, True),
        ("40%", 10, 4, False),
        ("40%", 10, 5, True),
        ("0%", 5, 1, True),
        ("100%", 5, 5, False),
        ("34%", 2, 1, True),  # 34 % of 2 is 0: any removal
    ],
)
def test_threshold_count_and_share(
    limit: int | str, before: int, removed: int, gated: bool
) -> None:
    assert needs_approval(approval(limit), before, removed) is gated


def test_no_approval_section_no_gate() -> None:
    assert needs_approval(None, 100, 100) is False


def test_limit_of_a_share_rounds_down() -> None:
    assert removal_limit(approval("50%"), 3) == 1
    assert removal_limit(approval("50%"), 5) == 2
    assert removal_limit(approval(3), 1) == 3


def test_timeout_defaults_to_an_hour_and_reads_durations() -> None:
    assert Approval.model_validate({"remove_more_than": 1}).timeout == 3600.0
    assert approval(1, "5s").timeout == 5.0
    assert [duration(s) for s in (3600, 7200, 300, 90, 5, 2.5)] == [
        "1h", "2h", "5m", "90s", "5s", "2.5s"
    ]  # fmt: skip


def request(**changes: object) -> ApprovalRequest:
    base: dict[str, object] = {
        "cluster": "gated", "group": "worker", "before": 3, "after": 1,
        "victims": ["gated-worker-2", "gated-worker-1"], "by": "crv scale", "timeout": 3600.0,
    }  # fmt: skip
    return ApprovalRequest.model_validate({**base, **changes})


def test_pause_key_is_stable_per_change_and_a_valid_input_key() -> None:
    key = pause_key(request())
    assert key == pause_key(request(by="autoscale", timeout=5))  # the same change
    assert key == pause_key(request(victims=["gated-worker-1", "gated-worker-2"]))
    assert key != pause_key(request(victims=["gated-worker-0", "gated-worker-1"]))
    assert key != pause_key(request(cluster="other"))
    assert key != pause_key(request(group="front"))
    assert key.startswith("crv-approval-")
    # Prefect's flow run input keys: lowercase letters, digits and dashes
    assert all(c.islower() or c.isdigit() or c == "-" for c in key)
    assert keyset(key)["response"] == f"paused-{key}-response"


def test_request_lines() -> None:
    r = request()
    assert r.change() == "shrinking worker from 3 to 1 nodes"
    assert r.describe() == (
        "cluster gated: shrinking worker from 3 to 1 nodes (removing gated-worker-2, "
        "gated-worker-1), asked by crv scale"
    )
    many = request(before=30, after=0, victims=[f"gated-worker-{i}" for i in range(30)])
    assert many.describe().endswith("gated-worker-9 and 20 more), asked by crv scale")


def test_the_form_is_typed() -> None:
    """What the Prefect UI renders on the paused run: a choice approve/reject, a reason."""
    schema = Answer.model_json_schema()
    assert schema["required"] == ["decision"]
    assert schema["properties"]["decision"]["enum"] == ["approve", "reject"]
    assert schema["properties"]["reason"]["type"] == "string"
    with pytest.raises(ValueError):
        Answer.model_validate({"decision": "maybe"})
    with pytest.raises(ValueError):
        Answer.model_validate({"decision": "approve", "extra": 1})


def test_gate_needs_no_flow_run_when_nothing_is_gated() -> None:
    """No approval section, or not over the limit: None at once (no Prefect call)."""
    assert asyncio.run(gate("c", "g", 3, ["c-g-2"], None, by="crv scale")) is None
    assert asyncio.run(gate("c", "g", 3, ["c-g-2"], approval(1), by="crv scale")) is None
    assert asyncio.run(gate("c", "g", 3, [], approval(0), by="crv scale")) is None
