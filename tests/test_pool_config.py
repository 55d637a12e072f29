"""pools.yaml (pools/config.py) and `crv pools list/check`: which pools exist, and a mistake in
the file is one line naming the file, the pool and the option, exit 2, before any side effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crv.base.errors import SpecError
from pools import config, get_pool, pool_names
from tests.conftest import REPO


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRV_HOME": str(home)}
    env.pop("CRV_POOLS_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "crv_cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def test_without_a_file_the_built_in_pools_exist(tmp_path: Path) -> None:
    assert pool_names(tmp_path) == ["local", "sim"]
    r = run(tmp_path, "pools", "list")
    assert r.returncode == 0, r.stderr
    assert "local" in r.stdout and "built-in" in r.stdout
    r = run(tmp_path, "pools", "check", "local", "--connect")
    assert r.returncode == 0, r.stderr
    assert "ok: pool local: reachable; 0 crv nodes" in r.stdout


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("pools:\n  vm: {driver: xen}\n", "pools.vm.driver", "unknown driver 'xen'"),
        ("pools:\n  local: {driver: libvirt}\n", "pools.local", "is a built-in pool"),
        ("pools:\n  vm: {driver: libvirt, option: {}}\n", "pools.vm.option", "unknown field"),
        ("pools:\n  Bad_Name: {driver: libvirt}\n", "pools", ""),
        ("pools: [1, 2]\n", "pools", ""),
        ("pools:\n  vm: {driver: libvirt\n", "", ""),
    ],
)
def test_a_bad_file_is_one_line_naming_file_pool_and_field(
    tmp_path: Path, text: str, where: str, what: str
) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        config.load(path)
    assert caught.value.file == str(path)
    assert caught.value.field.startswith(where)
    assert what in caught.value.message
    r = run(tmp_path, "pools", "check", "vm")
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {path}: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_the_file_can_live_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "elsewhere.yaml"
    other.write_text("pools:\n  vm: {driver: xen}\n")
    monkeypatch.setenv("CRV_POOLS_FILE", str(other))
    assert config.config_file(tmp_path / "home") == other
    with pytest.raises(SpecError, match=r"elsewhere\.yaml: pools\.vm\.driver"):
        get_pool("vm", tmp_path / "home" / "pools" / "vm")


def test_an_unknown_pool_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="unknown pool; known pools: local, sim"):
        get_pool("nowhere", tmp_path / "pools" / "nowhere")
    r = run(tmp_path, "pools", "check", "nowhere")
    assert r.returncode == 2 and "unknown pool" in r.stderr


CONFIGURED = """\
pools:
  vm:
    driver: libvirt
    description: libvirt's test driver
    options: {uri: "test:///default", base_image: /default-pool/base.qcow2,
              storage_pool: default-pool, memory_mb: 512}
  ec2:
    driver: libcloud
    options: {provider: ec2, region: us-east-1, key: {env: CRV_TEST_NO_SUCH_KEY},
              secret: {env: CRV_TEST_NO_SUCH_SECRET}, image: ami-1e749f67, size: t2.micro}
"""


def test_configured_pools_are_listed_checked_and_reached(tmp_path: Path) -> None:
    (tmp_path / "pools.yaml").write_text(CONFIGURED)
    assert pool_names(tmp_path) == ["local", "sim", "vm", "ec2"]
    r = run(tmp_path, "pools", "list")
    assert r.returncode == 0 and "libvirt's test driver" in r.stdout and "libcloud" in r.stdout
    r = run(tmp_path, "pools", "check", "vm", "--connect")
    assert r.returncode == 0, r.stderr
    assert "ok: pool vm: reachable; 0 crv nodes" in r.stdout
    # a credential is a reference; an unset one is named, with its option, and nothing is called
    r = run(tmp_path, "pools", "check", "ec2")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: pool ec2: option key: environment variable CRV_TEST_NO_SUCH_KEY is unset or empty"
    )


def test_an_option_the_driver_refuses_names_pool_and_option(tmp_path: Path) -> None:
    (tmp_path / "pools.yaml").write_text(CONFIGURED.replace("memory_mb: 512", "memory_mb: 1"))
    r = run(tmp_path, "pools", "check", "vm")
    assert r.returncode == 2
    assert "pools.yaml: pools.vm.options.memory_mb: " in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
