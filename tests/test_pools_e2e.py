"""A cluster spanning two pools through the whole DAG: its head on the local pool, its workers on
EC2 (moto's server on loopback) or on libvirt's test driver, through the CLI, the real service,
the real Prefect server and the real agent.

No guest boots in either: tests/machines.py plays the machines. It reads back the exact
bootstrap the pool handed over (EC2's `userData` attribute; the seed ISO on the domain's cdrom)
and runs the agent it carries. So certify, contextualize and verify pass for nodes provisioned
through those pools only if what the pool delivered is all a machine needs. The workers'
recipes publish an attribute the head's recipe reads and the verify checks: they do not listen
on the network, since the machines have no address of their own here (made-up ones from moto,
none from the test driver).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_appliance
from tests.inprocess import MARK
from tests.machines import Ec2Machines
from tests.moto_server import MotoServer, moto_ec2
from tests.test_deploy_e2e import Crv
from tests.test_pool_cloud import KEY_VAR, SECRET_VAR
from tests.test_pool_cloud import options as ec2_options
from tests.test_pool_libvirt import options as libvirt_options

__all__ = ["moto_ec2"]  # the fixture, for pytest

ANYWHERE = """\
apiVersion: crv/v1
name: anywhere
parameters:
  out: {type: string, default: /nonexistent, max_length: 1024}
nodes:
  head: {count: 1, roles: [head]}
  worker: {count: 2, roles: [work], scale: {min: 1, max: 4}}
roles:
  work:
    recipe: work.sh
    publishes: [id]
    verify: {command: "test {{ self.id }} = {{ node.name }}-on-$(echo ok)"}
  head: {recipe: head.sh, depends_on: [work]}
"""
WORK = """#!/bin/sh
set -eu
crv-agent set id "$CRV_NODE-on-ok"
"""
HEAD = """#!/bin/sh
set -eu
crv-agent list work id | sort > "$CRV_PARAM_OUT/head-view.txt"
"""


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory, moto_ec2: MotoServer) -> Iterator[Crv]:
    home = tmp_path_factory.mktemp("crv-home")
    vm = libvirt_options().model_dump(mode="json", exclude_defaults=True)
    bad_image = ec2_options(moto_ec2.port, image="ami-00000000deadbeef")
    pools = {"ec2": {"driver": "libcloud", "options": ec2_options(moto_ec2.port)},
             "ec2-noimage": {"driver": "libcloud", "options": bad_image},
             "vm": {"driver": "libvirt", "options": vm}}  # fmt: skip
    (home / "pools.yaml").write_text(yaml.safe_dump({"pools": pools}))
    c = Crv(home)
    c.env.update({KEY_VAR: "testing", SECRET_VAR: "testing"})
    c.up()
    yield c
    for pid in c.node_processes():
        os.kill(pid, signal.SIGKILL)
    c("down")


def anywhere(tmp_path: Path) -> tuple[Path, Path]:
    directory = write_appliance(tmp_path, "anywhere", ANYWHERE, ("work.sh", "head.sh"))
    (directory / "work.sh").write_text(WORK)
    (directory / "head.sh").write_text(HEAD)
    out = tmp_path / "out"
    out.mkdir()
    return directory, out


def test_workers_on_ec2_deploy_through_every_step(
    crv: Crv,
    moto_ec2: MotoServer,
    tmp_path: Path,
) -> None:
    directory, out = anywhere(tmp_path)
    with Ec2Machines(moto_ec2.url, "us-east-1", "testing", "testing", tmp_path / "machines",
                     cluster="cloudy") as machines:  # fmt: skip
        r = crv("deploy", str(directory), "--name", "cloudy", "--set", f"out={out}",
                "--pool-for", "worker=ec2", "--boot-timeout", "60")  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr + repr(machines)
        status = crv.status("cloudy")
        assert status["ready"] is True
        nodes = {n["name"]: n for n in status["nodes"]}
        assert {n: v["pool"] for n, v in nodes.items()} == {
            "cloudy-head-0": "local", "cloudy-worker-0": "ec2", "cloudy-worker-1": "ec2",
        }  # fmt: skip
        assert not nodes["cloudy-worker-0"]["address"].startswith("127.")  # EC2's, not ours
        assert len(machines.booted) == 2  # one agent per instance, from its user-data
        assert (out / "head-view.txt").read_text().split() == [
            "cloudy-worker-0-on-ok", "cloudy-worker-1-on-ok",
        ]  # fmt: skip
        assert status["drift"] == {"missing": [], "orphans": [], "unreachable": {}}

        r = crv("scale", "cloudy", "worker", "3", "--boot-timeout", "60")
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(machines.booted) == 3
        assert len((out / "head-view.txt").read_text().split()) == 3

        r = crv("destroy", "cloudy")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "4 nodes removed" in r.stdout
        machines.wait(lambda: not machines.running(), 15, "every agent powered off")


def test_workers_on_libvirt_deploy_through_every_step(crv: Crv, tmp_path: Path) -> None:
    """In one process (tests/inprocess.py): the test driver's hypervisor lives in it."""
    directory, out = anywhere(tmp_path)
    commands = [
        ["deploy", str(directory), "--name", "virty", "--set", f"out={out}",
         "--pool-for", "worker=vm", "--boot-timeout", "60"],
        ["status", "virty", "--json"],
        ["destroy", "virty"],
        ["status", "virty", "--json"],
    ]  # fmt: skip
    argv = [sys.executable, "-m", "tests.inprocess", str(tmp_path / "machines"), "virty"]
    for command in commands:
        argv += ["--", *command]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=crv.env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    outputs = r.stdout.split(MARK)
    codes = [int(part.split("\n", 1)[0]) for part in outputs[1:]]
    assert codes == [0, 0, 0, 2], r.stdout + r.stderr
    import json

    status = json.loads(outputs[1].strip().splitlines()[-1])
    assert status["ready"] is True
    assert {n["name"]: n["pool"] for n in status["nodes"]} == {
        "virty-head-0": "local", "virty-worker-0": "vm", "virty-worker-1": "vm",
    }  # fmt: skip
    assert status["drift"] == {"missing": [], "orphans": [], "unreachable": {}}
    assert (out / "head-view.txt").read_text().split() == [
        "virty-worker-0-on-ok", "virty-worker-1-on-ok",
    ]  # fmt: skip
    assert "destroyed virty: 3 nodes removed" in outputs[2]


def test_missing_credentials_are_bad_input_and_nothing_is_made(crv: Crv, tmp_path: Path) -> None:
    directory, _ = anywhere(tmp_path)
    env = {k: v for k, v in crv.env.items() if k != KEY_VAR}
    r = subprocess.run(
        [sys.executable, "-m", "crv_cli", "deploy", str(directory), "--name", "nocreds",
         "--pool-for", "worker=ec2"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert (r.returncode, r.stderr) == (
        2, f"error: pool ec2: option key: environment variable {KEY_VAR} is unset or empty\n"
    )  # fmt: skip
    assert "nocreds" not in crv("list").stdout


def test_an_image_the_cloud_lacks_fails_at_once_and_rolls_back_every_pool(
    crv: Crv, moto_ec2: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crv.base.home import Home
    from crv.engine.placement import Drivers

    directory, out = anywhere(tmp_path)
    r = crv("deploy", str(directory), "--name", "noimage", "--set", f"out={out}",
            "--pool-for", "worker=ec2-noimage", "--on-failure", "rollback")  # fmt: skip
    assert r.returncode == 1
    error = r.stderr.strip().splitlines()[-1]
    # permanent: the first worker to fail did not retry
    assert re.search(r"noimage-worker-\d:provision failed after 1 attempts", error), error
    assert "option image" in error and "rolled back: removed the new cluster" in error
    monkeypatch.setenv(KEY_VAR, "testing")
    monkeypatch.setenv(SECRET_VAR, "testing")
    drivers = Drivers(Home(crv.home))
    assert drivers("ec2-noimage").list_nodes("noimage") == []
    assert drivers("local").list_nodes("noimage") == []
    assert "noimage" not in crv("list").stdout
