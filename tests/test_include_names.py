"""A recipe of an included appliance names its own appliance's roles as it wrote them: the
bundle tells the agent the include's prefix, and `crv-agent get/list` put it before the name
(found by the first real webshop: mysql-ha's replica asked for `primary`, which in webshop is
`db-primary`, and the service refused it)."""

from __future__ import annotations

import argparse

import pytest

from agent import crv_agent
from crv.appliance.bundle import build
from crv.appliance.loader import load_appliance
from tests.conftest import CATALOG


def test_the_bundle_gives_included_roles_their_prefix() -> None:
    roles = build(load_appliance(CATALOG / "webshop")).roles
    assert roles["db-replica"]["env"]["CRV_ROLE_PREFIX"] == "db-"  # type: ignore[index]
    assert roles["db-primary"]["env"]["CRV_ROLE_PREFIX"] == "db-"  # type: ignore[index]
    assert "CRV_ROLE_PREFIX" not in roles["app"]["env"]  # type: ignore[operator]


@pytest.mark.parametrize(("prefix", "asked", "read"), [("db-", "primary", "db-primary"),
                                                       ("", "db-primary", "db-primary")])  # fmt: skip
def test_get_and_list_read_the_prefixed_role(
    monkeypatch: pytest.MonkeyPatch, prefix: str, asked: str, read: str
) -> None:
    paths: list[str] = []

    class Answer:
        @staticmethod
        def json() -> dict[str, object]:
            return {"values": [{"node": "n", "value": "10.0.0.1"}]}

    def call(_args: object, method: str, path: str, body: object = None) -> tuple[object, dict]:
        paths.append(path)
        return Answer(), {"node": "n"}

    monkeypatch.setattr(crv_agent, "_cli_call", call)
    monkeypatch.setenv("CRV_ROLE_PREFIX", prefix)
    args = argparse.Namespace(role=asked, key="host")
    assert crv_agent.cmd_get(args) == crv_agent.EXIT_OK
    assert crv_agent.cmd_list(args) == crv_agent.EXIT_OK
    assert paths == [crv_agent._attribute_path(read, "host")] * 2
