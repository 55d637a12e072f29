"""Autoscaling end to end, through the CLI and the scheduled `autoscale/<cluster>` deployment
against the real Prefect server, service and local pool: a web farm deployed with --autoscale
grows under a bounded loopback load and shrinks back to `min` (idle node kept last) when it
stops; a run that finds another change of the cluster skips; a paused deployment makes no
decisions; a metric that goes stale is recorded as such; disable removes the deployment (even
with a serve-process pass or a taken run under way), and so does destroy, with no run failing. And
`crv autoscale enable/disable/status` on a cluster that does not exist, or whose appliance has
no scaling section, is exit 2 with one `error:` line."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_autoscale import Load, fast_farm
from crv.base.flock import exclusive
from crv.base.home import Home
from crv.service.client import Service
from crv_cli.daemons import running
from tests.conftest import CATALOG, REPO
from tests.test_deploy_e2e import Crv

CLUSTER = "asfarm"


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


class Farm:
    def __init__(self, crv: Crv) -> None:
        self.crv = crv

    def autoscale(self, last: int = 200) -> dict[str, Any]:
        r = self.crv("autoscale", "status", CLUSTER, "--json", "--last", str(last))
        assert r.returncode == 0, r.stderr
        found: dict[str, Any] = json.loads(r.stdout)
        return found

    def newest(self) -> int:
        """The seq of the newest decision (0: none yet)."""
        found = self.autoscale(last=1)["decisions"]
        return int(found[0]["seq"]) if found else 0

    def decisions(self) -> list[dict[str, Any]]:
        return list(self.autoscale()["decisions"])

    def runs_of(self, after: int) -> list[dict[str, Any]]:
        """The flow runs that took the decisions after seq `after`: name, auto_scheduled,
        expected_start_time, start_time (ISO, UTC), state."""
        ids = {d["flow_run"] for d in self.decisions() if d["seq"] > after and d["flow_run"]}
        found = self.prefect(
            "import json\n"
            "from prefect import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            f"    runs = [c.read_flow_run(i) for i in {sorted(ids)!r}]\n"
            "print(json.dumps([{'name': r.name, 'auto_scheduled': r.auto_scheduled,\n"
            "    'expected_start_time': str(r.expected_start_time),\n"
            "    'start_time': r.start_time.isoformat() if r.start_time else None,\n"
            "    'state': r.state_name} for r in runs]))\n"
        )
        runs: list[dict[str, Any]] = json.loads(found)
        return runs

    def wait_quiet(self, before: int) -> int:
        """Wait until the runs under way have ended: 15 s without a new decision (within 180 s);
        the newest decision's seq."""
        deadline, last = time.monotonic() + 180, self.newest()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 15:
            assert time.monotonic() < deadline, f"decisions kept coming: {self.runs_of(before)}"
            time.sleep(1)
            if self.newest() != last:
                last, quiet_since = self.newest(), time.monotonic()
        return last

    def started_after(self, before: int, at: datetime) -> list[dict[str, Any]]:
        """The scheduled runs that decided after seq `before` and started after `at`."""
        return [
            r for r in self.runs_of(before)
            if r["auto_scheduled"]
            and (r["start_time"] is None or datetime.fromisoformat(r["start_time"]) > at)
        ]  # fmt: skip

    def taken_scheduled_run(self, deployment_id: str | None = None) -> str:
        """A run of the autoscale deployment (or of the deployment `deployment_id`, deleted)
        as the runner leaves one it has taken from the schedule: auto-scheduled, PENDING.
        Prefect's API makes no auto-scheduled runs (its scheduler does), so that flag is set in
        the server's database."""
        run_id = self.prefect(
            "from prefect import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            f"    deployment = {deployment_id!r} or str(\n"
            f"        c.read_deployment_by_name('autoscale/{CLUSTER}').id)\n"
            "    body = {'deployment_id': deployment,\n"
            "        'flow_id': str(c.read_flow_by_name('autoscale').id),\n"
            f"        'parameters': {{'name': {CLUSTER!r}}}, 'state': {{'type': 'PENDING'}}}}\n"
            "    print(c._client.post('/flow_runs/', json=body).json()['id'])\n"
        ).strip()
        with contextlib.closing(sqlite3.connect(self.crv.home / "prefect" / "prefect.db")) as db:
            db.execute("PRAGMA busy_timeout = 60000")
            with db:
                changed = db.execute(
                    "UPDATE flow_run SET auto_scheduled = 1 WHERE id = ?", (run_id,)
                ).rowcount
        assert changed == 1, run_id
        return run_id

    def deployment_there(self) -> bool:
        """Whether the Prefect server has `autoscale/<CLUSTER>` (after the cluster is gone)."""
        found = self.prefect(
            "from crv_cli.autoscale import _deployment\n"
            f"print('there' if _deployment({CLUSTER!r}) else 'gone')\n"
        )
        return found.strip() == "there"

    def flow_run(self, run_id: str) -> dict[str, Any]:
        found = self.prefect(
            "import uuid\n"
            "from prefect import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            f"    print(c.read_flow_run(uuid.UUID({run_id!r})).model_dump_json())\n"
        )
        run: dict[str, Any] = json.loads(found)
        return run

    def run_taken(self, run_id: str) -> list[Any]:
        """Run the flow run `run_id` as the runner's process would (Prefect's flow engine, the
        autoscale flow): [what the flow returned, the run's final state type]."""
        result = self.prefect(
            "import asyncio, json, uuid\n"
            "from prefect import get_client\n"
            "from prefect.flow_engine import run_flow_async\n"
            "from flows.autoscale import autoscale\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            f"        run = await c.read_flow_run(uuid.UUID({run_id!r}))\n"
            "        out = await run_flow_async(autoscale, flow_run=run, parameters=run.parameters)\n"
            "        print(json.dumps([out, (await c.read_flow_run(run.id)).state_type.value]))\n"
            "asyncio.run(main())\n",
            timeout=300,
        )
        found: list[Any] = json.loads(result)
        return found

    def runs_started_after(self, at: datetime) -> list[dict[str, Any]]:
        """The autoscale flow's runs that started after `at`: name, state and their logs."""
        found = self.prefect(
            "import json\n"
            "from datetime import datetime\n"
            "from prefect import get_client\n"
            "from prefect.client.schemas.filters import *\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = c.read_flow_runs(\n"
            "        flow_filter=FlowFilter(name=FlowFilterName(any_=['autoscale'])),\n"
            "        flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(\n"
            f"            after_=datetime.fromisoformat({at.isoformat()!r}))))\n"
            "    print(json.dumps([{'name': r.name, 'state': r.state_type.value, 'logs': [\n"
            "        g.message for g in c.read_logs(log_filter=LogFilter(\n"
            "            flow_run_id=LogFilterFlowRunId(any_=[r.id])))]} for r in runs]))\n"
        )
        runs: list[dict[str, Any]] = json.loads(found)
        return runs

    def running_autoscale(self, cluster: str) -> bool:
        """Whether a run of the autoscale flow for `cluster` is RUNNING."""
        found = self.prefect(
            "from prefect import get_client\n"
            "from prefect.client.schemas.filters import *\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = c.read_flow_runs(\n"
            "        flow_filter=FlowFilter(name=FlowFilterName(any_=['autoscale'])),\n"
            "        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(\n"
            "            type=FlowRunFilterStateType(any_=['RUNNING']))))\n"
            f"print(any(r.parameters.get('name') == {cluster!r} for r in runs))\n"
        )
        return found.strip() == "True"

    def workers(self) -> list[dict[str, Any]]:
        return [n for n in self.crv.status(CLUSTER)["nodes"] if n["group"] == "worker"]

    def lb_url(self) -> str:
        lb = next(n for n in self.crv.status(CLUSTER)["nodes"] if n["group"] == "front")
        return f"http://{lb['address']}:8080/"

    def prefect_env(self) -> dict[str, str]:
        """The settings of a Prefect client of this home (as the CLI sets them)."""
        status = json.loads((self.crv.home / "prefect" / "daemon.json").read_text())
        home = str(self.crv.home / "prefect")
        return {
            **self.crv.env,
            "PREFECT_API_URL": status["url"],
            "PREFECT_API_AUTH_STRING": ":".join(self.crv.prefect_auth),
            "PREFECT_HOME": home,
        }

    def prefect(self, code: str, timeout: float = 120) -> str:
        """Run Python with a Prefect client of this home."""
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True,
            env=self.prefect_env(), cwd=REPO, timeout=timeout,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    root = tmp_path_factory.mktemp("autoscale")
    crv = Crv(root / "home")
    crv.up()
    app = fast_farm(root, CLUSTER)
    try:
        r = crv(
            "deploy", str(app), "--set", "workers=1", "--set", "rate-every=3",
            "--autoscale", "--autoscale-every", "5s", timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert "autoscaling every 5 s" in r.stdout
        yield Farm(crv)
    finally:
        try:
            crv("destroy", CLUSTER, timeout=300)
        finally:  # a destroy that timed out must not leave the daemons running
            crv("down")
            for pid in crv.node_processes():  # what a failed test left behind
                os.kill(pid, 9)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("command", ["enable", "disable", "status"])
def test_an_unknown_cluster_is_exit_2_naming_it(farm: Farm, command: str) -> None:
    r = farm.crv("autoscale", command, "no-such-cluster")
    assert r.returncode == 2, r.stdout + r.stderr
    assert one_error_line(r.stderr) == (
        f"error: crv autoscale {command}: NAME: no cluster 'no-such-cluster'"
    )


def record_cluster(crv: Crv, name: str, appliance: str) -> None:
    """A cluster record (nothing deployed) whose recorded appliance is a catalog one."""
    home = Home(crv.home)
    endpoints = running(home)
    assert endpoints is not None
    spec = {"appliance": appliance, "source": str(CATALOG / appliance), "pool": "local",
            "parameters": {}, "roles": {}, "bundle": ""}  # fmt: skip
    Service(home, endpoints.service_url).call("PUT", f"/v1/admin/clusters/{name}", json=spec)


def test_a_cluster_without_a_scaling_section_is_exit_2(farm: Farm) -> None:
    crv = farm.crv
    record_cluster(crv, "noscale", "ganglia")
    for command in ("enable", "disable", "status"):
        r = crv("autoscale", command, "noscale")
        assert r.returncode == 2, r.stdout + r.stderr
        line = one_error_line(r.stderr)
        assert line.endswith(": nodes: no node group has a scaling section"), line
    r = crv("autoscale", "status", "noscale", "--json")
    assert r.returncode == 2 and r.stdout == ""


def test_deploy_with_autoscale_makes_a_scheduled_deployment(farm: Farm) -> None:
    found = wait_for("the autoscale deployment", lambda: farm.autoscale()["deployment"], 60)
    assert found == f"autoscale/{CLUSTER}"
    status = farm.autoscale()
    assert status["enabled"] and status["every"] == 5 and status["paused"] is False
    assert status["groups"] == [
        {"group": "worker", "nodes": 1, "min": 1, "max": 3,
         "metric": "sum of lb.requests_per_second, 5 per node"},
    ]  # fmt: skip
    # the schedule is Prefect's: an interval of 5 s on the deployment, runs made by its scheduler
    schedules = farm.prefect(
        "from prefect import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        f"    d = c.read_deployment_by_name('autoscale/{CLUSTER}')\n"
        "    print([(s.schedule.interval.total_seconds(), s.active) for s in d.schedules])\n"
    )
    assert schedules.strip() == "[(5.0, True)]"
    # runs come from the schedule: decisions ("none": the farm is idle) are recorded. The
    # first ones may come before the lb has published its first rate ("no metric: ..."), or
    # while the deploy still holds the cluster's change slot ("skipped: ...")
    wait_for("a decision", lambda: farm.decisions(), 60)
    measured = wait_for(
        "a decision on a measured metric",
        lambda: [d for d in farm.decisions() if d["metric"] is not None],
        60,
    )
    assert measured[0]["action"] == "none" and measured[0]["group"] == "worker"
    assert "no change" in measured[0]["reason"], measured[0]
    early = [d["reason"] for d in farm.decisions() if d["metric"] is None]
    assert all(r.startswith(("no metric: ", "skipped: ")) for r in early), early


def test_grows_under_load_and_shrinks_to_min_idle_first(farm: Farm) -> None:
    with contextlib.ExitStack() as keep_serving:
        with Load(farm.lb_url(), rate=25, limit=180):
            wait_for("3 workers", lambda: len(farm.workers()) == 3, 150, 1)
            grown = [d for d in farm.decisions() if d["action"] == "grow"]
            assert grown and all(d["outcome"] and "nodes" in d["outcome"] for d in grown)
            assert grown[-1]["current"] == 1 and grown[-1]["target"] <= 3  # oldest first
            assert "5 per node" in grown[-1]["reason"]
            workers = sorted(n["name"] for n in farm.workers())
            assert workers == [f"{CLUSTER}-worker-{i}" for i in range(3)]
            # the newest worker keeps serving (requests straight to it, not through the lb, so
            # the metric drops): it publishes `busy` > 0 and the shrink takes the idle ones
            # first. Its load starts before the lb's stops, so its reports show it well before
            # the shrink (a CI run that started it after a few slow CLI calls saw the shrink
            # read worker-2 at 0, like the others, and keep worker-0). The nodes report over
            # 3 s windows (rate-every=3), so a load thread stalled for a second still shows.
            newest = next(n for n in farm.workers() if n["name"] == f"{CLUSTER}-worker-2")
            keep_serving.enter_context(Load(f"http://{newest['address']}:8080/", rate=5, limit=300))
        wait_for("the group back at min", lambda: len(farm.workers()) == 1, 200, 1)
    shrunk = [d for d in farm.decisions() if d["action"] == "shrink"]
    kept = [n["name"] for n in farm.workers()]
    assert kept == [f"{CLUSTER}-worker-2"], [d["outcome"] for d in shrunk]
    assert shrunk and all("removed" in (d["outcome"] or "") for d in shrunk)
    assert all("low for" not in d["reason"] for d in shrunk)  # only after the delay
    waiting = [d for d in farm.decisions() if "low for" in d["reason"]]
    assert waiting, "the scale-down delay was never waited out"
    # the cluster is whole: the lb sends to the one worker left
    status = farm.crv.status(CLUSTER)
    assert status["ready"]


def test_a_run_that_finds_another_change_skips(farm: Farm) -> None:
    """Hold the cluster's change slot (as a deploy or resize would) from another process: the
    scheduled runs meanwhile record "skipped" and change nothing. The slot is held until a skip
    is seen (at most 120 s): on a loaded machine a flow run can take longer to start than a
    fixed hold would last."""
    before = len(farm.decisions())
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio, sys\n"
         "from flows.locks import cluster_change\n"
         "async def main():\n"
         f"    async with cluster_change({CLUSTER!r}, wait=60):\n"
         "        print('held', flush=True)\n"
         "        await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), 120)\n"
         "asyncio.run(main())\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env=farm.prefect_env(),
    )  # fmt: skip

    def skipped() -> list[dict[str, Any]]:
        decisions = farm.decisions()
        new = decisions[: len(decisions) - before]  # newest first
        return [d for d in new if d["reason"].startswith("skipped")]

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        found = wait_for("a skipped decision", skipped, 110)
        assert "another change" in found[0]["reason"] and found[0]["action"] == "none"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # lets the slot go
        holder.wait(timeout=60)
    assert len(farm.workers()) == 1


def test_paused_in_prefect_makes_no_decisions_and_enable_resumes(farm: Farm) -> None:
    """No scheduled run that starts after the pause decides (the flow checks at its start).
    Judged by the runs' start times, not by a quiet period alone: on a loaded machine the runs
    that had started before the pause may still be deciding a minute later."""
    before = farm.newest()
    farm.prefect(
        "from prefect import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        f"    c.pause_deployment(c.read_deployment_by_name('autoscale/{CLUSTER}').id)\n"
    )
    paused_at = datetime.now(timezone.utc)
    try:
        assert farm.autoscale()["paused"] is True
        last = farm.wait_quiet(before)
        late = farm.started_after(before, paused_at)
        assert not late, f"scheduled runs started after the pause ({paused_at}) decided: {late}"
        assert farm.autoscale()["paused"] is True
        # a run started by hand of the paused deployment still decides
        state = farm.prefect(
            "from prefect.deployments import run_deployment\n"
            f"print(run_deployment('autoscale/{CLUSTER}', timeout=240).state.type.value)\n",
            timeout=300,
        )
        assert state.strip() == "COMPLETED"
        assert farm.newest() > last
        last = farm.newest()
    finally:
        r = farm.crv("autoscale", "enable", CLUSTER, "--every", "5s")
    assert r.returncode == 0, r.stderr
    assert farm.autoscale()["paused"] is False
    wait_for("a decision after resuming", lambda: farm.newest() > last, 180)


def test_a_stale_metric_is_recorded_and_changes_nothing(farm: Farm) -> None:
    """The lb stops publishing (its process is killed): once its last value is older than
    stale_after (20 s), decisions say so and take no action."""
    lb_home = farm.crv.home / "pools" / "local" / f"{CLUSTER}-front-0" / "work"
    pid = int((lb_home / "lb.pid").read_text())
    os.kill(pid, 9)
    stale = wait_for(
        "a stale-metric decision",
        lambda: [d for d in farm.decisions() if d["reason"].startswith("no metric: stale")],
        60,
    )
    assert stale[0]["action"] == "none" and stale[0]["metric"] is None
    assert len(farm.workers()) == 1


# One pass of the serve process's autoscale watch (deployments.serve) that stops once it has
# read the settings, until the file argv[2] exists; once the file argv[3] exists it prints
# whether the deployment is there.
PAUSED_PASS = f"""
import asyncio, pathlib, sys, time
from prefect.runner import Runner
import deployments.serve as serve
from crv_cli.autoscale import _deployment
read, go, done = (pathlib.Path(a) for a in sys.argv[1:4])
real = serve._enabled

def wait(path):
    end = time.monotonic() + 120
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.05)

def paused():
    found = real()
    read.touch()
    wait(go)
    return found

serve._enabled = paused
asyncio.run(serve.AutoscaleWatch(Runner().aadd_deployment).tick())
wait(done)
print("there" if _deployment({CLUSTER!r}) else "gone")
"""


def test_disable_waits_for_a_pass_under_way_and_removes_the_deployment(
    farm: Farm, tmp_path: Path
) -> None:
    """A pass of the serve process that read "enabled" just before the disable: disable waits
    for it (the settings' lock), and it cannot make the deployment again afterwards."""
    read, go, done = (tmp_path / n for n in ("read", "go", "done"))
    watch = subprocess.Popen(
        [sys.executable, "-c", PAUSED_PASS, str(read), str(go), str(done)],
        env=farm.prefect_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(
            "the pass to read the settings", lambda: read.exists() or watch.poll() is not None, 120
        )
        assert watch.poll() is None, watch.communicate()
        disable = farm.crv.popen("autoscale", "disable", CLUSTER)
        with contextlib.suppress(subprocess.TimeoutExpired):
            disable.wait(10)
        waited = disable.poll() is None  # for the pass (the lock)
        go.touch()
        out = disable.communicate(timeout=180)[0]
        done.touch()
        where, werr = watch.communicate(timeout=120)
    finally:
        go.touch()
        done.touch()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watch.wait(30)
        watch.kill()
    assert disable.returncode == 0, out
    assert watch.returncode == 0, werr
    assert where.strip() == "gone", "the pass made the deployment again after disable"
    assert waited, "disable did not wait for the pass under way"
    assert f"autoscale/{CLUSTER} removed" in out
    status = farm.autoscale()
    assert status["enabled"] is False and status["deployment"] is None
    time.sleep(5)  # a few passes of the serve process: it does not make it again
    assert farm.autoscale()["deployment"] is None
    r = farm.crv("autoscale", "enable", CLUSTER, "--every", "5s")  # for the next test
    assert r.returncode == 0, r.stderr


def test_disable_lets_a_run_taken_from_the_schedule_end_without_deciding(farm: Farm) -> None:
    """A run the runner took from the schedule (PENDING: its process is starting; it loads the
    flow through the deployment) when disable comes: disable pauses the deployment, waits for
    the run to start, then deletes it; the run decides nothing and completes. A run that gets
    to its check after the deletion does the same. Then no scheduled run decides."""
    before = farm.newest()
    taken = farm.taken_scheduled_run()
    disable = farm.crv.popen("autoscale", "disable", CLUSTER)
    try:
        wait_for("the pause", lambda: farm.autoscale()["paused"] or disable.poll() is not None, 120)
        assert disable.poll() is None, disable.communicate()[0]
        assert farm.autoscale()["deployment"] == f"autoscale/{CLUSTER}"  # kept for the run
        last = farm.newest()
        # once the run is RUNNING (the flow loaded), disable may delete the deployment before
        # the run's check: it finds it paused or removed, and either way decides nothing
        returned, state = farm.run_taken(taken)
        assert state == "COMPLETED", returned
        assert returned in (
            {"cluster": CLUSTER, "decisions": [], "paused": True},
            {"cluster": CLUSTER, "decisions": [], "removed": True},
        )
        assert farm.newest() == last
        out = disable.communicate(timeout=120)[0]
    finally:
        disable.kill()
    assert disable.returncode == 0, out
    assert f"autoscale/{CLUSTER} removed" in out
    disabled_at = datetime.now(timezone.utc)
    assert farm.autoscale()["deployment"] is None
    # the deployment's id stays on its runs: one at its check now finds no deployment
    late = farm.taken_scheduled_run(deployment_id=farm.flow_run(taken)["deployment_id"])
    assert farm.run_taken(late) == [
        {"cluster": CLUSTER, "decisions": [], "removed": True},
        "COMPLETED",
    ]
    # runs that had started before may still record their decisions; none starts after, and
    # none failed or crashed
    farm.wait_quiet(before)
    decided = farm.started_after(before, disabled_at)
    assert not decided, f"scheduled runs started after the disable ({disabled_at}): {decided}"
    after = farm.runs_started_after(disabled_at)
    assert all(r["state"] == "COMPLETED" for r in after), after
    assert farm.autoscale()["deployment"] is None  # the serve process did not make it again


def test_destroy_removes_the_deployment_and_no_run_fails(farm: Farm) -> None:
    """The last test: the cluster destroyed while it autoscales every 5 s. The serve process
    removes the deployment; the scheduled runs that start meanwhile decide nothing and end
    COMPLETED (not failed on the missing cluster). One such run is made certain: the test holds
    the settings' lock, so the serve process cannot remove the deployment before it runs."""
    r = farm.crv("autoscale", "enable", CLUSTER, "--every", "5s")
    assert r.returncode == 0, r.stderr
    taken = farm.taken_scheduled_run()
    with exclusive(Home(farm.crv.home).autoscale_lock):
        r = farm.crv("destroy", CLUSTER, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        destroyed_at = datetime.now(timezone.utc)
        assert farm.deployment_there()
        assert farm.run_taken(taken) == [
            {"cluster": CLUSTER, "decisions": [], "disabled": True},
            "COMPLETED",
        ]
    wait_for("the deployment to go", lambda: not farm.deployment_there(), 120)
    time.sleep(15)  # runs the runner had taken end; the serve process does not make it again
    assert not farm.deployment_there()
    after = farm.runs_started_after(destroyed_at)
    assert all(r["state"] == "COMPLETED" for r in after), after


def test_a_run_whose_cluster_is_destroyed_while_it_waits_decides_nothing(
    farm: Farm, tmp_path: Path
) -> None:
    """A run that found its cluster, then waited for the change slot while the cluster's
    destroy held it (the 10-cluster day on PostgreSQL saw one fail on the 404 that followed):
    it decides nothing and completes. The destroy is played by a process that holds the slot and
    removes the cluster's record before it lets go (the cluster's local nodes are killed after).
    """
    name = "asgone"
    r = farm.crv("deploy", str(fast_farm(tmp_path, name)), "--set", "workers=1", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = farm.prefect_env()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio, sys\n"
         "from crv.base.home import Home\n"
         "from crv.service.client import Service\n"
         "from crv_cli.daemons import running\n"
         "from flows.locks import cluster_change\n"
         "async def main():\n"
         f"    async with cluster_change({name!r}, wait=60):\n"
         "        print('held', flush=True)\n"
         "        await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), 200)\n"
         "        home = Home.from_env()\n"
         f"        Service(home, running(home).service_url).delete_cluster({name!r})\n"
         "asyncio.run(main())\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    run = None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run = subprocess.Popen(
            [sys.executable, "-c",
             "import asyncio, json\n"
             "from flows.autoscale import autoscale\n"
             f"state = asyncio.run(autoscale({name!r}, wait=150, return_state=True))\n"
             "print(json.dumps([state.type.value, state.result(raise_on_failure=False)],"
             " default=str))\n"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
        )  # fmt: skip
        # its first look at the cluster is done a moment after it runs; then it waits
        wait_for("the autoscale run to start", lambda: farm.running_autoscale(name), 120)
        time.sleep(8)
        assert holder.stdin is not None
        holder.stdin.close()  # "the destroy" removes the record and lets the slot go
        assert holder.wait(timeout=60) == 0
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
        state, result = json.loads(out)
        assert state == "COMPLETED", (result, err[-2000:])
        assert result == {"cluster": name, "decisions": [], "destroyed": True}
        assert "destroyed during this run; it decides nothing more" in err
    finally:
        for proc in (holder, run):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for pid in farm.crv.node_processes():  # asgone's nodes (asfarm is destroyed already)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
