"""Node timings: how the store keeps them, how they read, and the bare-metal pool's phases and
phase deadlines (decisions from state; the real boots are in test_baremetal_e2e.py and
test_vm_rack.py)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from crv.engine.timings import seconds_since_start, summary
from crv.service.database import open_engine
from crv.service.store import Store, merge_timings
from pools.baremetal.inventory import Lease
from pools.baremetal.pool import BaremetalOptions, BaremetalPool

ROLES = {"web": {"depends_on": [], "publishes": [], "reads": []}}


def test_the_first_time_of_a_phase_stays_and_a_new_provision_starts_again() -> None:
    assert merge_timings(None, {}) is None
    assert merge_timings(None, {"provision": 1.0}) == {"provision": 1.0}
    old = {"provision": 1.0, "enrolled": 5.0}
    assert merge_timings(old, {}) == old
    assert merge_timings(old, {"enrolled": 9.0, "recipes": 10.0}) == {
        "provision": 1.0, "enrolled": 5.0, "recipes": 10.0,
    }  # fmt: skip
    assert merge_timings(old, {"provision": 20.0}) == {"provision": 20.0}  # made anew
    # a machine that replaced one written off: its boot's times replace the first machine's
    first = {"provision": 1.0, "power_on": 2.0}
    moved = merge_timings(first, {"power_on": 62.0, "script": 80.0, "verified": 120.0})
    assert moved == {"provision": 1.0, "power_on": 62.0, "script": 80.0, "verified": 120.0}


def test_the_store_keeps_timings_and_status_shows_them_in_time_order(tmp_path: Path) -> None:
    store = Store(open_engine(tmp_path / "crv.sqlite"))
    store.put_cluster(
        "c", appliance="x", source="dir", pool="local", parameters={}, roles=ROLES, bundle=b"b"
    )
    item: dict[str, Any] = {"name": "c-g-0", "group": "g", "roles": ["web"], "pool": "local"}
    store.put_nodes("c", [{**item, "state": "provisioning", "timings": {"provision": 100.0}}])
    store.put_nodes("c", [{**item, "timings": {"enrolled": 130.0, "created": 101.5}}])
    store.put_nodes("c", [{**item, "timings": {"enrolled": 999.0}}])  # a re-run: kept
    shown = store.status("c")["nodes"][0]["timings"]
    assert list(shown) == ["provision", "created", "enrolled"]
    assert datetime.fromisoformat(shown["enrolled"]) == datetime.fromtimestamp(130.0, timezone.utc)
    assert seconds_since_start(shown) == {"provision": 0.0, "created": 1.5, "enrolled": 30.0}
    assert summary(shown) == "created +1.5 s, enrolled +30 s"
    store.put_nodes("c", [{**item, "state": "provisioning", "timings": {"provision": 500.0}}])
    assert list(store.status("c")["nodes"][0]["timings"]) == ["provision"]


def test_phases_come_out_in_the_order_of_a_boot_whatever_the_input_order() -> None:
    iso = {p: datetime.fromtimestamp(t, timezone.utc).isoformat()
           for p, t in {"verified": 60, "script": 20, "provision": 0, "power_on": 1}.items()}  # fmt: skip
    assert list(seconds_since_start(iso)) == ["provision", "power_on", "script", "verified"]
    assert seconds_since_start({}) == {}


# -- the bare-metal pool's phases ----------------------------------------------------------------


def _pool(tmp_path: Path, **options: Any) -> BaremetalPool:
    machines = {"machines": [{
        "name": "m1", "macs": ["52:54:00:00:00:01"], "address": "10.0.0.11",
        "bmc": {"address": "127.0.0.9", "username": "u", "password": {"env": "X"}},
    }]}  # fmt: skip
    (tmp_path / "machines.yaml").write_text(yaml.safe_dump(machines))
    values = {
        "machines": str(tmp_path / "machines.yaml"),
        "kernel": "http://10.0.0.1:8067/files/vmlinuz",
        "initrd": "http://10.0.0.1:8067/files/ramdisk.cpio.gz",
        "boot_timeout": 300,
        **options,
    }
    return BaremetalPool("rack", tmp_path / "pools" / "rack", BaremetalOptions(**values))


def _booting(pool: BaremetalPool, since: float) -> Lease:
    lease = Lease("c-g-0", "c", "g", "m1", "booting")
    lease.nonce, lease.since, lease.deadline = "n", since, since + pool.options.boot_timeout
    pool.files.write("m1", ["52:54:00:00:00:01"], "#!ipxe\n", lease.nonce, "10.0.0.11")
    return lease


def test_what_the_boot_service_served_is_the_machines_phases(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    lease = _booting(pool, since=1000.0)
    assert pool.timings(lease) == {"power_on": 1000.0}
    assert pool.files.machine_at("by-mac", "52-54-00-00-00-01") == "m1"
    assert pool.files.machine_at("by-addr", "10.0.0.11") == "m1"
    assert pool.files.machine_at("by-addr", "../../etc") is None
    pool.files.record("m1", "script", 1010.0)
    pool.files.record("m1", "script", 1011.0)  # iPXE asked again: the first time counts
    pool.files.record("m1", "file:vmlinuz", 1012.0)
    pool.files.record("m1", "file:ramdisk.cpio.gz", 1015.0)
    pool.files.record("m1", "file:other.img", 1016.0)  # not the node's kernel or initrd
    pool.files.record("m1", "script", 900.0)  # before this power-on: another boot's
    assert pool.timings(lease) == {
        "power_on": 1000.0, "script": 1010.0, "kernel": 1012.0, "initrd": 1015.0,
    }  # fmt: skip
    assert pool.files.call_back("m1", "n")
    assert "callback" in pool.timings(lease)
    pool.files.remove("m1", ["52:54:00:00:00:01"], "10.0.0.11")
    assert pool.files.machine_at("by-addr", "10.0.0.11") is None
    pool.files.record("m1", "script")  # after the machine's boot: nowhere to write, no error
    assert not (pool.files.root / "m1").exists()


def test_a_phase_past_its_deadline_writes_the_machine_off_before_the_boot_timeout(
    tmp_path: Path,
) -> None:
    pool = _pool(tmp_path, phase_timeouts={"script": 60, "initrd": 200})
    now = time.time()
    assert pool._late(_booting(pool, since=now - 30)) is None
    late = pool._late(_booting(pool, since=now - 61))
    assert late == "did not fetch its boot script within 60 s of power-on"
    lease = _booting(pool, since=now - 120)
    pool.files.record("m1", "script", now - 100)
    assert pool._late(lease) is None  # the script came; the initrd has until 200 s
    lease = _booting(pool, since=now - 250)
    pool.files.record("m1", "script", now - 240)
    assert pool._late(lease) == "did not fetch initrd within 200 s of power-on"
    plain = _pool(tmp_path)
    assert plain._late(_booting(plain, since=now - 301)) == (
        "did not call back within 300 s of power-on"
    )


def test_phase_timeouts_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="above 0"):
        _pool(tmp_path, phase_timeouts={"script": 0})
    with pytest.raises(ValueError):
        _pool(tmp_path, phase_timeouts={"dhcp": 10})  # not a phase crv can see
