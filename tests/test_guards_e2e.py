"""The guards end to end (flows.guards in the autoscale flow), through the CLI against the real
Prefect server, the real service and the local pool, with the real agent. A worker group
publishes its `load` from a file the test writes (a metric attribute, target 1 per node, no
shrink of its own for an hour), so only a guard changes its size when the load stays put.

- a lease of 20 s with a warning 8 s ahead, on the schedule (every 5 s): one warning event
  first, then, at least 8 s later and not before the lease's end, the cluster destroyed; its
  usage ledger is closed and kept;
- idle_after with the load at 0: announced `warn_before` ahead, withdrawn when work comes back,
  announced again, and the group shrunk to its minimum only once the announced time has come;
- a lease with --on-lease shrink: shrunk to the minimum, then growth held with the reason;
- a budget already spent: the growth the load asks for is held with the reason, and made once
  the budget is cleared.
Runs other than the schedule's are `crv autoscale run` (one pass of the real flow), with the
cluster's deployment paused so that nothing else decides meanwhile; Prefect's events are read
through its API.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from crv.base.home import Home
from crv.service.client import Service
from crv_cli.daemons import running
from tests.conftest import cluster_events, write_appliance
from tests.test_deploy_e2e import Crv, prefect_api

pytestmark = pytest.mark.scaling  # .ci/run: ./dev test -m scaling

APPLIANCE = """\
apiVersion: crv/v1
name: guarded
parameters:
  load: {type: string, default: /nonexistent, max_length: 1024}
  workers: {type: integer, default: 2, minimum: 1, maximum: 3}
nodes:
  worker:
    count: "{{ workers }}"
    roles: [web]
    scale: {min: 1, max: 3}
    scaling:
      metric: {attribute: {role: web, key: load, aggregate: max}, stale_after: 30s}
      policy: {target_per_node: 1}
      cooldown: 0
      scale_down_delay: 1h
      max_step: 3
roles:
  web: {recipe: web.sh, publishes: [load]}
"""
# publishes the file's number as `load` every second, for as long as the node runs
WEB = """#!/bin/sh
set -eu
f="$CRV_PARAM_LOAD"
(
  set +e  # a failed set (a busy machine) does not end the loop: it is tried again next second
  while :; do
    if [ -s "$f" ]; then crv-agent set load "$(cat "$f")"; fi
    sleep 1
  done
) >/dev/null 2>&1 &
"""


class Guarded:
    def __init__(self, crv: Crv, root: Path, directory: Path) -> None:
        self.crv, self.root, self.directory = crv, root, directory
        self.api = httpx.Client(base_url=prefect_api(crv), auth=crv.prefect_auth, timeout=30)
        endpoints = running(Home(crv.home))
        assert endpoints is not None
        self.service = Service(Home(crv.home), endpoints.service_url)

    def deploy(self, name: str, workers: int, load: float) -> None:
        self.set_load(name, load, wait=False)
        r = self.crv(
            "deploy", str(self.directory), "--name", name, "--set", f"workers={workers}",
            "--set", f"load={self.root / f'{name}.load'}", timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr

    def set_load(self, name: str, load: float, wait: bool = True) -> None:
        """Write the load and wait until every worker published it."""
        (self.root / f"{name}.load").write_text(f"{load:g}\n")
        if not wait:
            return
        end = time.monotonic() + 30
        while sorted(set(self.loads(name))) != [f"{load:g}"]:
            assert time.monotonic() < end, f"not published within 30 s: {self.loads(name)}"
            time.sleep(0.3)

    def loads(self, name: str) -> list[str]:
        found = self.service.status(name)
        assert found is not None
        return [n["roles"]["web"].get("attributes", {}).get("load", "") for n in found["nodes"]]

    def enable(self, name: str, *options: str) -> str:
        r = self.crv("autoscale", "enable", name, *options)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def pause(self, name: str) -> None:
        """Pause the cluster's deployment: only `crv autoscale run` decides from then on."""
        found = self.api.get(f"/deployments/name/autoscale/{name}")
        assert found.status_code == 200, found.text
        r = self.api.patch(f"/deployments/{found.json()['id']}", json={"paused": True})
        assert r.status_code == 204, r.text

    def run(self, name: str) -> list[dict[str, Any]]:
        """One pass of the autoscale flow now; its decisions."""
        r = self.crv("autoscale", "run", name, "--json", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        decisions: list[dict[str, Any]] = json.loads(r.stdout)["decisions"]
        return decisions

    def status(self, name: str) -> dict[str, Any]:
        r = self.crv("autoscale", "status", name, "--json", "--last", "100")
        assert r.returncode == 0, r.stdout + r.stderr
        found: dict[str, Any] = json.loads(r.stdout)
        return found

    def workers(self, name: str) -> int:
        return sum(1 for n in self.crv.status(name)["nodes"] if n["group"] == "worker")

    def events(self, name: str, event: str, count: int = 0, deadline: float = 20.0) -> list[Any]:
        """Prefect's `event` events on cluster `name`, oldest first; waits for `count` of them."""
        return cluster_events(self.api, name, event, count, deadline)


def occurred(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["occurred"].replace("Z", "+00:00")).timestamp()


def sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.time()))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    root = tmp_path_factory.mktemp("guards")
    crv = Crv(root / "home")
    crv.up()
    directory = write_appliance(root, "guarded", APPLIANCE, ("web.sh",))
    (directory / "web.sh").write_text(WEB)
    try:
        yield Guarded(crv, root, directory)
    finally:
        for name in ("leased", "idler", "shrunk", "thrifty"):
            crv("destroy", name, timeout=300)
        crv("down")
        for pid in crv.node_agents():  # what a failed test left behind
            os.kill(pid, signal.SIGKILL)


def test_a_lease_warns_first_then_destroys_the_cluster_on_the_schedule(guarded: Guarded) -> None:
    guarded.deploy("leased", workers=2, load=1)
    set_at = time.time()
    out = guarded.enable("leased", "--every", "5s", "--lease", "20s", "--warn-before", "8s")
    assert "guards: lease 20 s (destroy at " in out and "announced 8 s before they act" in out
    setting = guarded.status("leased")["guards"]
    assert setting["lease"]["seconds"] == 20 and setting["warn_before"] == 8
    assert set_at - 1 <= setting["lease"]["set_at"] <= time.time()
    end = time.monotonic() + 180
    while guarded.crv("status", "leased", "--json").returncode == 0:
        assert time.monotonic() < end, "the lease's destroy did not come within 180 s"
        time.sleep(1)
    gone = time.time()
    acted = guarded.events("leased", "crv.cluster.guard-acted", 1)
    warnings = guarded.events("leased", "crv.cluster.guard-warning")
    destroyed = guarded.events("leased", "crv.cluster.destroyed", 1)
    assert len(warnings) == 1, warnings  # once, though several runs saw it before it acted
    assert len(acted) == 1 and len(destroyed) == 1, (acted, destroyed)
    w, a = warnings[0], acted[0]
    assert w["payload"]["guard"] == "lease" and w["payload"]["action"] == "destroy"
    assert "the cluster will be destroyed at" in w["payload"]["reason"]
    lease_end = setting["lease"]["ends_at"]
    acts_at = w["payload"]["acts_at_unix"]
    assert acts_at >= lease_end and acts_at - w["payload"]["announced_unix"] >= 8
    assert w["payload"]["announced_unix"] >= lease_end - 8 - 0.001  # not before its window
    # the act: after the warning by warn_before at least, and at or after the announced time
    assert occurred(w) < occurred(a) and occurred(a) - occurred(w) >= 8 - 0.5
    assert acts_at <= occurred(a) <= gone + 1
    assert a["payload"]["action"] == "destroy" and a["payload"]["guard"] == "lease"
    assert re.fullmatch(
        r"destroyed: 2 nodes removed, \d+ certificates revoked", a["payload"]["outcome"]
    )
    assert destroyed[0]["payload"]["by"] == "guard: lease"
    # the usage ledger outlives the cluster: both workers, closed
    usage = guarded.service.usage("leased", since=set_at - 600)
    assert len(usage["nodes"]) == 2 and all(r["ended"] is not None for r in usage["nodes"])
    assert usage["node_hours"] > 0


def test_idle_after_shrinks_to_min_only_after_its_announcement_and_not_while_working(
    guarded: Guarded,
) -> None:
    name = "idler"
    guarded.deploy(name, workers=2, load=1)
    guarded.enable(name, "--every", "1h", "--idle-after", "30s", "--warn-before", "10s")
    guarded.pause(name)
    [d] = guarded.run(name)  # work (load 1): nothing from the guard
    assert d["action"] == "none" and not d["reason"].startswith("guard"), d
    guarded.set_load(name, 0)
    ran = time.time()
    decisions = guarded.run(name)
    idle = guarded.status(name)["guards"]["idle_after"]
    since = idle["idle_since"]
    assert since <= ran and idle["shrinks_from"] == since + 30
    if time.time() < since + 20:  # before the warning's window: nothing at all
        assert [x["reason"] for x in decisions if x["reason"].startswith("guard")] == []
        assert guarded.events(name, "crv.cluster.guard-warning", deadline=2) == []
    assert guarded.workers(name) == 2

    sleep_until(since + 20 + 0.5)
    decisions = guarded.run(name)  # within 10 s of idle: announced
    note = next(x for x in decisions if x["reason"].startswith("guard idle: no work for"))
    assert note["action"] == "none" and "shrunk to its minimum at" in note["reason"]
    [w] = guarded.events(name, "crv.cluster.guard-warning", 1)
    assert (w["payload"]["guard"], w["payload"]["action"]) == ("idle", "shrink")
    assert guarded.workers(name) == 2
    [notice] = guarded.status(name)["guards"]["notices"]
    assert notice["guard"] == "idle" and notice["acts_at"] >= since + 30

    # work comes back before the announced time: withdrawn, nothing removed
    guarded.set_load(name, 1)
    decisions = guarded.run(name)
    assert any(x["reason"].startswith("guard idle: withdrawn: work now") for x in decisions)
    [withdrawn] = guarded.events(name, "crv.cluster.guard-withdrawn", 1)
    assert withdrawn["payload"]["guard"] == "idle"
    assert guarded.status(name)["guards"]["notices"] == []
    assert guarded.workers(name) == 2

    # idle again: a new occurrence, announced again, acted on only at its announced time
    guarded.set_load(name, 0)
    guarded.run(name)
    since = guarded.status(name)["guards"]["idle_after"]["idle_since"]
    sleep_until(since + 20 + 0.5)
    guarded.run(name)
    warnings = guarded.events(name, "crv.cluster.guard-warning", 2)
    assert len(warnings) == 2
    [notice] = guarded.status(name)["guards"]["notices"]
    acts_at = notice["acts_at"]
    assert acts_at - notice["announced"] >= 10 and acts_at >= since + 30
    decisions = guarded.run(name)
    if time.time() < acts_at:  # this run ended before the announced time: it only waited
        assert guarded.workers(name) == 2
        assert all(x["action"] == "none" for x in decisions), decisions
    sleep_until(acts_at + 0.5)
    decisions += guarded.run(name)
    [shrink] = [x for x in decisions if x["action"] == "shrink"]
    assert shrink["reason"].startswith("guard idle: no work for"), shrink
    assert shrink["at"] >= acts_at, (shrink, acts_at)
    assert shrink["target"] == 1 and shrink["outcome"].startswith("2 -> 1 nodes"), shrink
    assert guarded.workers(name) == 1
    [acted] = guarded.events(name, "crv.cluster.guard-acted", 1)
    assert acted["payload"]["guard"] == "idle" and occurred(acted) >= acts_at
    assert occurred(acted) - occurred(warnings[-1]) >= 10 - 0.5
    # recorded in the store with its reason, and the group's own decision came after it
    recorded = guarded.status(name)["decisions"]
    assert any(r["action"] == "shrink" and r["reason"] == shrink["reason"] for r in recorded)
    # at its minimum: nothing more to do
    decisions = guarded.run(name)
    assert all(x["action"] == "none" for x in decisions) and guarded.workers(name) == 1


def test_a_lease_on_shrink_shrinks_to_min_and_then_holds_growth(guarded: Guarded) -> None:
    name = "shrunk"
    guarded.deploy(name, workers=3, load=3)  # the load asks for the 3 it has
    out = guarded.enable(
        name, "--every", "1h", "--lease", "20s", "--on-lease", "shrink", "--warn-before", "8s"
    )
    assert "guards: lease 20 s (shrink at " in out
    guarded.pause(name)
    lease = guarded.status(name)["guards"]["lease"]
    sleep_until(lease["ends_at"] - 8 + 0.5)
    decisions = guarded.run(name)
    # announced, not acted on: "ends in ..." or, on a machine so loaded that the lease ran out
    # before this first run, "ended ... ago" (it then acts warn_before after this announcement)
    assert any(x["reason"].startswith("guard lease: lease of 20 s end") for x in decisions)
    assert all(x["action"] == "none" for x in decisions), decisions
    assert guarded.workers(name) == 3
    [notice] = guarded.status(name)["guards"]["notices"]
    sleep_until(notice["acts_at"] + 0.5)
    decisions = guarded.run(name)
    shrink = next(x for x in decisions if x["action"] == "shrink")
    assert shrink["reason"].startswith("guard lease: lease of 20 s ended"), shrink
    assert (shrink["current"], shrink["target"]) == (3, 1)
    assert guarded.workers(name) == 1
    # the load still asks for 3: the lease has run, so no growth
    [d] = guarded.run(name)
    assert d["action"] == "none" and d["target"] == 1, d
    assert "; held: the lease of 20 s ended at " in d["reason"], d
    assert guarded.workers(name) == 1
    status = guarded.status(name)
    assert status["guards"]["lease"]["ended"] is True and status["guards"]["notices"] == []


def test_a_budget_already_spent_holds_growth_with_the_reason(guarded: Guarded) -> None:
    name = "thrifty"
    guarded.deploy(name, workers=1, load=3)  # asks for 3
    # 0.0001 node-hours is 0.36 node-seconds: spent by the one node before the first run
    out = guarded.enable(name, "--every", "1h", "--budget", "0.0001")
    assert "guards: budget 0.0001 node-hours a day (UTC)" in out
    guarded.pause(name)
    decisions = guarded.run(name)
    d = next(x for x in decisions if not x["reason"].startswith("guard"))
    assert (d["action"], d["current"], d["target"]) == ("none", 1, 1), d
    assert d["reason"].startswith("3 / 1 per node = 3; held: budget of 0.0001 node-hours a day: ")
    assert d["reason"].endswith("used today (UTC), spent"), d
    assert guarded.workers(name) == 1
    [w] = guarded.events(name, "crv.cluster.guard-warning", 1)
    assert (w["payload"]["guard"], w["payload"]["action"]) == ("budget", "hold")
    status = guarded.status(name)
    assert status["guards"]["budget"]["used_today"] > 0.0001
    assert status["usage"]["node_hours"] == pytest.approx(
        status["guards"]["budget"]["used_today"], abs=0.001
    )
    assert status["usage"]["nodes_now"] == 1
    r = guarded.crv("autoscale", "status", name)
    assert "budget 0.0001 node-hours a day: " in r.stdout and "0.00 left" in r.stdout, r.stdout
    # without the budget the same load grows the group at once: it was the budget that held it
    out = guarded.enable(name, "--every", "1h", "--no-budget")
    assert "guards: none" in out
    decisions = guarded.run(name)
    grow = next(x for x in decisions if x["action"] == "grow")
    assert (grow["current"], grow["target"]) == (1, 3), grow
    assert guarded.workers(name) == 3
