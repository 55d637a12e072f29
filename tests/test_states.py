"""crv.base.states: the one list of node, role and machine states, as the plain words they are
stored and sent as."""

from __future__ import annotations

import json

from crv.base.states import DRAIN_STATES, REMADE_FROM, MachineState, NodeState, RoleState
from crv.service import store


def test_states_are_their_words_on_the_wire() -> None:
    assert NodeState.LEAVING == "leaving"
    assert json.dumps({"state": RoleState.VERIFY_FAILED}) == '{"state": "verify_failed"}'
    assert f"{MachineState.RUNNING}" == "running"


def test_the_store_uses_the_one_list() -> None:
    assert tuple(store.ROLE_STATES) == tuple(RoleState)
    assert tuple(store.DRAIN_STATES) == DRAIN_STATES
    assert store.LEAVING is NodeState.LEAVING
    assert tuple(store.REMADE_FROM) == REMADE_FROM
