"""Autoscaling from a batch queue end to end, through the CLI (`crv autoscale run`, one pass of
the real autoscale flow) against the real Prefect server, service and local pool. A `queue`
role publishes what a Slurm controller would (crv.appliance.spec.QUEUE_KEYS) from a file the
test writes, through the real agent; the compute nodes' drain logs where it ran.

- waiting jobs grow the group by the nodes they ask for (clamped to max, by max_step);
- a shrink removes only nodes that run no job: a `mixed` and an `allocated` node stay even when
  the release order would take them first (the newest), and they are never drained (CLUES #97,
  #14); the group shrinks to what the busy nodes need;
- a queue whose values are stale changes nothing and says why.
The same rules on real Slurm in real guests: tests/test_vm_slurm_autoscale.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import write_appliance
from tests.test_deploy_e2e import Crv, prefect_api

pytestmark = pytest.mark.scaling  # .ci/run: ./dev test -m scaling

BATCH = """\
apiVersion: crv/v1
name: batch
parameters:
  queue: {type: string, default: /nonexistent, max_length: 1024}
nodes:
  ctl: {count: 1, roles: [queue]}
  compute:
    count: 1
    roles: [work]
    scale: {min: 1, max: 4}
    scaling:
      queue: {role: queue, stale_after: 20s}
      cooldown: 0
      scale_down_delay: 0
      max_step: 3
roles:
  queue: {recipe: queue.sh, publishes: [pending_nodes, pending, running, node_states]}
  work: {recipe: work.sh, drain: drain.sh}
"""
# publishes the file's KEY=VALUE lines every second, then writes the file's serial to .done;
# a `crv-agent set` that fails (a busy machine) is written to .errors and tried again next round
QUEUE = """#!/bin/sh
set -eu
q="$CRV_PARAM_QUEUE"
(
  set +e  # nothing ends the loop: a failed read or set is tried again next round
  while :; do
    if [ -s "$q" ]; then
      serial="" published=yes
      while IFS='=' read -r key value; do
        case "$key" in
          serial) serial="$value" ;;
          *) crv-agent set "$key" "$value" 2>>"$q.errors" || published="" ;;
        esac
      done <"$q"
      [ -z "$published" ] || echo "$serial" >"$q.done"
    fi
    sleep 1
  done
) >/dev/null 2>&1 &
"""
WORK = "#!/bin/sh\nexit 0\n"
DRAIN = '#!/bin/sh\necho "$CRV_NODE" >> "$(dirname "$CRV_PARAM_QUEUE")/drained.log"\n'


class Batch:
    def __init__(self, crv: Crv, queue: Path, name: str = "batch") -> None:
        self.crv, self.queue, self.serial, self.name = crv, queue, 0, name

    def publish(
        self, pending_nodes: int, running: int, states: dict[int, str], wait: bool = True
    ) -> None:
        """Write the queue and wait until the queue role has published it."""
        self.serial += 1
        words = " ".join(f"{self.name}-compute-{i}={s}" for i, s in states.items())
        self.queue.write_text(
            f"pending_nodes={pending_nodes}\npending={pending_nodes}\nrunning={running}\n"
            f"node_states={words}\nserial={self.serial}\n"
        )
        done = self.queue.with_name(self.queue.name + ".done")
        errors = self.queue.with_name(self.queue.name + ".errors")
        if not wait:
            return
        end = time.monotonic() + 30
        while not (done.exists() and done.read_text().strip() == str(self.serial)):
            said = errors.read_text()[-2000:] if errors.exists() else ""
            assert time.monotonic() < end, "the queue role did not publish within 30 s" + (
                f"; crv-agent set said: {said}" if said else ""
            )
            time.sleep(0.2)

    def run(self) -> list[dict]:
        r = self.crv("autoscale", "run", self.name, "--json", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        decisions: list[dict] = json.loads(r.stdout)["decisions"]
        return decisions

    def computes(self) -> list[str]:
        nodes = self.crv.status(self.name)["nodes"]
        return sorted(n["name"] for n in nodes if n["group"] == "compute")

    def drained(self) -> list[str]:
        log = self.queue.parent / "drained.log"
        return sorted(log.read_text().split()) if log.exists() else []


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batch]:
    root = tmp_path_factory.mktemp("batch")
    crv = Crv(root / "home")
    crv.up()
    directory = write_appliance(root, "batch", BATCH, ("queue.sh", "work.sh", "drain.sh"))
    for name, text in (("queue.sh", QUEUE), ("work.sh", WORK), ("drain.sh", DRAIN)):
        (directory / name).write_text(text)
    queue = root / "queue.env"
    b = Batch(crv, queue)
    b.publish(0, 0, {0: "idle"}, wait=False)  # published once the role runs
    r = crv("deploy", str(directory), "--name", "batch", "--set", f"queue={queue}")
    assert r.returncode == 0, r.stdout + r.stderr
    yield b
    crv("destroy", "batch")
    crv("destroy", "gated")
    for pid in crv.node_agents():
        os.kill(pid, signal.SIGKILL)
    crv("down")


def test_waiting_jobs_grow_and_only_job_free_nodes_are_removed(batch: Batch) -> None:
    # one node runs a job, 5 more wait: 1 + 5 = 6 wanted, clamped to max 4, 3 at a time
    batch.publish(5, 1, {0: "allocated"})
    [d] = batch.run()
    assert (d["action"], d["current"], d["target"]) == ("grow", 1, 4), d
    assert d["reason"].startswith("5 jobs waiting for 5 nodes, 1 of 1 nodes busy: 6"), d
    assert batch.computes() == [f"batch-compute-{i}" for i in range(4)]
    # the group's plot (nodes against the queue), linked from the cluster's summary artifact
    plot = batch.crv.home / "autoscale" / "batch-compute.png"
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    api, auth = prefect_api(batch.crv), batch.crv.prefect_auth
    query = {"artifacts": {"key": {"any_": ["cluster-batch"]}}, "sort": "CREATED_DESC", "limit": 1}
    [summary] = httpx.post(f"{api}/artifacts/filter", json=query, auth=auth).json()
    assert f"Autoscaling plot: [batch-compute.png]({plot.as_uri()})" in summary["description"]

    # the queue drained: compute-1 is partly used (mixed), compute-3 (the newest, which the
    # release order takes first) runs a job; the idle compute-0 and compute-2 go, and only they
    # are drained
    batch.publish(0, 2, {0: "idle", 1: "mixed", 2: "idle", 3: "allocated"})
    [d] = batch.run()
    assert (d["action"], d["current"], d["target"]) == ("shrink", 4, 2), d
    assert "removing batch-compute-2, batch-compute-0" in d["reason"], d
    assert batch.computes() == ["batch-compute-1", "batch-compute-3"]
    assert batch.drained() == ["batch-compute-0", "batch-compute-2"]

    # both busy, nothing waits: nothing to do, and nobody is drained
    batch.publish(0, 2, {1: "mixed+drain", 3: "completing"})
    [d] = batch.run()
    assert d["action"] == "none" and "2 of 2 nodes busy: 2" in d["reason"], d
    assert batch.computes() == ["batch-compute-1", "batch-compute-3"]

    # every job ended: back to min, the newest first
    batch.publish(0, 0, {1: "idle", 3: "idle"})
    [d] = batch.run()
    assert (d["action"], d["target"]) == ("shrink", 1), d
    assert batch.computes() == ["batch-compute-1"]
    assert batch.drained() == ["batch-compute-0", "batch-compute-2", "batch-compute-3"]


def test_a_stale_queue_changes_nothing_and_says_why(batch: Batch) -> None:
    batch.publish(9, 0, {1: "idle"})
    batch.queue.unlink()  # the role stops publishing: its values age past stale_after (20 s)
    time.sleep(21)
    [d] = batch.run()
    assert d["action"] == "none", d
    assert d["reason"].startswith("no queue: stale: "), d
    assert "(stale after 20 s)" in d["reason"], d
    assert len(batch.computes()) == 1


def test_a_shrink_over_the_approval_limit_unanswered_is_recorded_as_rejected(
    batch: Batch, tmp_path: Path
) -> None:
    """The appliance's approval gate on the autoscaler's shrink: 3 idle nodes to remove, more
    than 1, nobody answers within 3 s: the decision's outcome says rejected, nothing is
    removed or drained, and the run does not fail (the next one decides again)."""
    gated_yaml = BATCH.replace("name: batch", "name: gated").replace(
        "parameters:", "approval: {remove_more_than: 1, timeout: 3s}\nparameters:"
    )
    directory = write_appliance(tmp_path, "gated", gated_yaml, ("queue.sh", "work.sh", "drain.sh"))
    for name, text in (("queue.sh", QUEUE), ("work.sh", WORK), ("drain.sh", DRAIN)):
        (directory / name).write_text(text)
    gated = Batch(batch.crv, tmp_path / "queue.env", "gated")
    gated.publish(3, 1, {0: "allocated"}, wait=False)
    r = batch.crv("deploy", str(directory), "--name", "gated", "--set", f"queue={gated.queue}")
    assert r.returncode == 0, r.stdout + r.stderr
    gated.publish(3, 1, {0: "allocated"})
    [d] = gated.run()
    assert (d["action"], d["target"]) == ("grow", 4), d
    gated.publish(0, 0, {i: "idle" for i in range(4)})
    [d] = gated.run()
    assert (d["action"], d["target"]) == ("shrink", 1), d
    assert d["outcome"].startswith("rejected: "), d
    assert "no answer within 3s: rejected" in d["outcome"], d
    assert len(gated.computes()) == 4
    assert gated.drained() == []
