"""BMC power control (pools/baremetal/ipmi.py) against real IPMI 2.0: OpenIPMI's ipmi_sim with the
chassis hook of pools/baremetal/simbmc.py, whose "machine" is a process tree with a setsid'd
daemon. ipmi_sim has no SHA-256, so these BMCs are reached with cipher suite 3."""

from __future__ import annotations

import itertools
import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pools.baremetal import simbmc
from pools.baremetal.ipmi import Bmc, Power
from pools.base import PoolError
from tests.conftest import chain, needs_ipmi_sim

pytestmark = needs_ipmi_sim

PASSWORD = "Sekr1t-pw-for-test"  # distinctive, so a leak anywhere is found
WRONG = "Wr0ng-pw-distinct"

MACHINE = r"""
import os, sys, time
from pathlib import Path
d = Path(os.environ["CRV_RACK_MACHINE"])
boot = (d / "booted-from").read_text().strip()
(d / "daemon.pid").unlink(missing_ok=True)  # an earlier boot's
if os.fork() == 0:  # a daemon: fork, setsid, fork again, first child exits
    os.setsid()
    if os.fork() == 0:
        (d / "daemon.pid.new").write_text(str(os.getpid()))
        (d / "daemon.pid.new").rename(d / "daemon.pid")
        time.sleep(1000)
    os._exit(0)
os.wait()
while not (d / "daemon.pid").exists():  # the grandchild writes it after its parent exited
    time.sleep(0.01)
with open(d / "boots.log", "a") as f:  # last: once it is written, the daemon is up
    f.write(f"{os.getpid()} {boot}\n")
time.sleep(1000)
"""


def free_endpoint() -> tuple[str, int]:
    """A random 127.0.0.x address and a UDP port free on it right now."""
    address = f"127.0.0.{random.randint(10, 250)}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        return address, sock.getsockname()[1]


@dataclass
class Sim:
    spec: simbmc.SimBmcSpec
    bmc: Bmc
    dir: Path

    def boots(self) -> list[tuple[int, str]]:
        try:
            lines = (self.dir / "boots.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(int(pid), boot) for pid, boot in (line.split() for line in lines)]

    def wait_boots(self, count: int, timeout: float = 10.0) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout
        while len(self.boots()) < count:
            assert time.monotonic() < deadline, f"machine did not boot {count} times"
            time.sleep(0.05)
        return self.boots()

    def hook_calls(self, what: str) -> list[float]:
        lines = (self.dir / "bmc" / "hook.log").read_text().splitlines()
        return [float(line.split()[0]) for line in lines if line.split()[2:4] == what.split()]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def make(name: str = "m1", password: str = PASSWORD) -> Sim:
        address, port = free_endpoint()
        machine_dir = tmp_path / name
        machine_dir.mkdir()
        (machine_dir / "machine.py").write_text(MACHINE)
        command = [sys.executable, str(machine_dir / "machine.py")]
        (machine_dir / "machine-command.json").write_text(json.dumps(command))
        spec = simbmc.SimBmcSpec(name, address, port, "admin", password, machine_dir)
        simbmc.write_config(spec)
        proc = simbmc.start(spec)
        started.append((proc, machine_dir))
        bmc = Bmc(address, port, "admin", password, cipher_suite=3)
        return Sim(spec, bmc, machine_dir)

    yield make
    for proc, machine_dir in started:
        try:
            simbmc.machine_off(machine_dir)
        finally:
            simbmc.stop(proc)


def fast_power(**kwargs: float) -> Power:
    return Power("rack", **{"min_interval": 0.05, "timeout": 1.0, "window": 10.0, **kwargs})


# -- power through a real BMC --------------------------------------------------------------------


def test_on_off_state_round_trip_kills_the_whole_tree(make_sim: Callable[..., Sim]) -> None:
    sim, power = make_sim(), fast_power()
    assert power.state("m1", sim.bmc) == "off"
    power.on("m1", sim.bmc)
    [(pid, boot)] = sim.wait_boots(1)
    assert boot == "default"
    daemon = int((sim.dir / "daemon.pid").read_text())
    record = json.loads((sim.dir / "power.json").read_text())
    assert record["pid"] == pid and alive(pid) and alive(daemon)
    assert power.state("m1", sim.bmc) == "on"
    power.on("m1", sim.bmc)  # already on: nothing new starts
    assert len(sim.boots()) == 1

    power.off("m1", sim.bmc)
    assert not alive(pid) and not alive(daemon)  # the setsid'd daemon too
    assert power.state("m1", sim.bmc) == "off"
    # per operation: session open, command(s), close
    assert power.commands["m1"] == 6 * 3  # six operations


def test_pxe_boot_restarts_a_running_machine_and_starts_a_stopped_one(
    make_sim: Callable[..., Sim],
) -> None:
    sim, power = make_sim(), fast_power()
    power.pxe_boot("m1", sim.bmc)  # off: powers on
    [(first, device)] = sim.wait_boots(1)
    assert device == "pxe"
    power.pxe_boot("m1", sim.bmc)  # on: off, then on again
    boots = sim.wait_boots(2)
    assert boots[1][1] == "pxe"
    assert not alive(first) and alive(boots[1][0])
    assert power.state("m1", sim.bmc) == "on"


def test_power_off_finds_a_machine_in_the_middle_of_an_exec(tmp_path: Path) -> None:
    """While a process execs, its environ reads empty for a moment, so the marker scan misses
    it; simmachine execs the agent. A machine that does nothing but exec itself is powered off
    many times: each time it must be off, found through the pid and start time that power-on
    recorded. (Before, a few in every 50 power-offs returned with the machine still running.)"""
    machine_dir = tmp_path / "m1"
    machine_dir.mkdir()
    loop = machine_dir / "loop.sh"
    loop.write_text('#!/bin/sh\nexec /bin/sh "$0"\n')
    (machine_dir / "machine-command.json").write_text(json.dumps(["/bin/sh", str(loop)]))
    left_on = 0
    try:
        for _ in range(60):
            simbmc.machine_on(machine_dir)
            time.sleep(0.02)
            simbmc.machine_off(machine_dir)
            time.sleep(0.05)  # a missed process has finished its exec by now
            if simbmc.machine_running(machine_dir):
                left_on += 1
                simbmc.machine_off(machine_dir)
    finally:
        simbmc.machine_off(machine_dir)
    assert left_on == 0


def test_pxe_is_for_the_next_boot_only(make_sim: Callable[..., Sim]) -> None:
    sim, power = make_sim(), fast_power()
    power.pxe_boot("m1", sim.bmc)
    assert sim.wait_boots(1)[0][1] == "pxe"
    assert (sim.dir / "booted-from").read_text().strip() == "pxe"
    assert (sim.dir / "bootdev").read_text().strip() == "default"
    power.off("m1", sim.bmc)
    power.on("m1", sim.bmc)
    assert sim.wait_boots(2)[1][1] == "default"


def test_pxe_boot_answered_late_boots_once_from_the_network(
    make_sim: Callable[..., Sim],
) -> None:
    """F9, an answer later than the client's timeout: the power-on takes 2 s and the client waits
    0.5 s, so it retries while the BMC is still carrying the power-on out. The machine boots
    once, from the network. (With Chassis Control "power cycle", the retry found the chassis on
    and cycled it: a second boot 1 s later, without the PXE flag the first boot had used.)"""
    sim, power = make_sim(), fast_power(timeout=0.5, window=30.0)
    (sim.dir / "bmc" / "slow-power-on").write_text("2")
    power.pxe_boot("m1", sim.bmc)
    assert not (sim.dir / "bmc" / "slow-power-on").exists()  # the slow power-on happened
    [(pid, device)] = sim.wait_boots(1)
    assert device == "pxe"
    time.sleep(2.5)  # ipmi_sim powers a cycled chassis on again 1 s after the power-off
    assert sim.boots() == [(pid, "pxe")] and alive(pid)
    power.off("m1", sim.bmc)
    assert power.state("m1", sim.bmc) == "off" and not alive(pid)


# -- refusals ------------------------------------------------------------------------------------


def assert_clean(error: PoolError, *secrets: str) -> None:
    for link in chain(error):
        text = f"{link} {link!r} {link.args!r}"
        for secret in secrets:
            assert secret not in text
    assert error.__cause__ is None and error.__context__ is None


def test_wrong_password_is_permanent_at_once(make_sim: Callable[..., Sim]) -> None:
    sim, power = make_sim(), fast_power(window=30.0)
    bad = Bmc(sim.bmc.address, sim.bmc.port, "admin", WRONG, cipher_suite=3)
    began = time.monotonic()
    with pytest.raises(PoolError) as caught:
        power.state("m1", bad)
    assert time.monotonic() - began < 3
    error = caught.value
    assert not error.temporary
    where = f"{sim.bmc.address}:{sim.bmc.port}"
    assert (
        str(error) == f"pool rack: machine m1: BMC {where} refused the credentials of user 'admin'"
    )
    assert power.commands["m1"] == 1  # one session open, no retry
    assert_clean(error, WRONG, PASSWORD)


def test_unknown_user_is_refused_credentials(make_sim: Callable[..., Sim]) -> None:
    sim, power = make_sim(), fast_power()
    bad = Bmc(sim.bmc.address, sim.bmc.port, "nobody", PASSWORD, cipher_suite=3)
    with pytest.raises(PoolError, match="refused the credentials of user 'nobody'") as caught:
        power.state("m1", bad)
    assert not caught.value.temporary
    assert_clean(caught.value, PASSWORD)


def test_suite_17_is_pinned_not_downgraded(make_sim: Callable[..., Sim]) -> None:
    """ipmi_sim cannot do suite 17; python-ipmi left alone would fall back to 3 silently."""
    sim, power = make_sim(), fast_power()
    default = Bmc(sim.bmc.address, sim.bmc.port, "admin", PASSWORD)
    with pytest.raises(PoolError, match="does not accept cipher suite 17") as caught:
        power.state("m1", default)
    assert not caught.value.temporary


def test_unreachable_bmc_is_temporary_after_retries() -> None:
    address, port = free_endpoint()  # nothing listens there
    power = Power("rack", min_interval=0.05, timeout=0.5, window=3.0)
    began = time.monotonic()
    with pytest.raises(PoolError) as caught:
        power.state("m1", Bmc(address, port, "admin", PASSWORD))
    elapsed = time.monotonic() - began
    error = caught.value
    assert error.temporary
    assert f"machine m1: BMC {address}:{port} not answering after" in str(error)
    assert power.commands["m1"] >= 2 and elapsed < 6
    assert_clean(error, PASSWORD)


@pytest.mark.parametrize(
    ("user", "password", "suite", "message"),
    [
        ("admin", "", 17, "has no password for user 'admin'"),
        ("admin", "Zq9#", 0, "cipher suite 0 has no authentication"),
        ("admin", "Zq9#" * 5 + "!", 17, "is longer than 20 bytes"),  # 21 bytes
        ("admin", "Zq9#", 1, "uses cipher suite 1: allowed are 17, and 3"),  # no integrity
        ("admin", "Zq9#", 2, "uses cipher suite 2: allowed are 17, and 3"),  # no encryption
        ("admin", "Zq9#", 15, "uses cipher suite 15: allowed are 17, and 3"),  # no integrity
        ("admin", "Zq9#", 16, "uses cipher suite 16: allowed are 17, and 3"),  # no encryption
        ("", "Zq9#", 17, "has no user name: an empty \\(NULL\\) user logs in anonymously"),
        ("", "Zq9#", 3, "has no user name"),
        ("\0", "Zq9#", 17, "has a user name with a NUL byte"),
        ("\0admin", "Zq9#", 17, "has a user name with a NUL byte"),
        ("admin" * 3 + "ab", "Zq9#", 17, "user name is longer than 16 bytes"),
    ],
    ids=[
        "no-password",
        "suite-0",
        "password-too-long",
        "suite-1",
        "suite-2",
        "suite-15",
        "suite-16",
        "empty-user",
        "empty-user-suite-3",
        "nul-user",
        "nul-prefixed-user",
        "user-too-long",
    ],
)
def test_refused_without_a_packet(user: str, password: str, suite: int, message: str) -> None:
    bmc = Bmc("127.0.0.9", 623, user, password, cipher_suite=suite)
    power = Power("rack")
    for operation in (power.state, power.on, power.off, power.pxe_boot):
        with pytest.raises(PoolError, match=message) as caught:
            operation("m1", bmc)
        assert not caught.value.temporary
        assert str(caught.value).startswith("pool rack: machine m1: BMC 127.0.0.9:623 ")
        if password:
            assert_clean(caught.value, password)
    assert power.commands["m1"] == 0  # nothing was sent
    assert "Zq9#" not in repr(bmc) and "Zq9#" not in str(bmc)


# -- pacing, ping, logs --------------------------------------------------------------------------


def test_min_interval_between_commands_across_threads(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    power = Power("rack", min_interval=0.3, timeout=2.0, window=20.0)
    threads = [threading.Thread(target=power.state, args=("m1", sim.bmc)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls = sim.hook_calls("get power")
    assert len(calls) == 4
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    # each Get Chassis Status follows a paced session open, so >= 2 intervals apart; allow slack
    assert min(gaps) >= 0.3, gaps
    assert power.commands["m1"] == 4 * 3


def test_ping_needs_no_credentials(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    power = fast_power()
    power.ping("m1", Bmc(sim.bmc.address, sim.bmc.port))
    assert power.commands["m1"] == 1
    address, port = free_endpoint()
    with pytest.raises(PoolError, match="not answering") as caught:
        Power("rack", timeout=0.3, window=2.0).ping("m2", Bmc(address, port))
    assert caught.value.temporary


def test_password_never_logged_nor_chained(
    make_sim: Callable[..., Sim], caplog: pytest.LogCaptureFixture
) -> None:
    sim, power = make_sim(), fast_power()
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pyipmi")
    power.on("m1", sim.bmc)
    power.off("m1", sim.bmc)
    bad = Bmc(sim.bmc.address, sim.bmc.port, "admin", WRONG, cipher_suite=3)
    with pytest.raises(PoolError) as caught:
        power.state("m1", bad)
    assert any(r.name.startswith("pyipmi") for r in caplog.records)  # DEBUG really was on
    assert any("Close Session" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        assert PASSWORD not in text and WRONG not in text
    assert PASSWORD not in caplog.text and WRONG not in caplog.text
    assert_clean(caught.value, WRONG, PASSWORD)


# -- busy ----------------------------------------------------------------------------------------


class BusyBmc(threading.Thread):
    """A real UDP responder, not a BMC: answers the presence ping, and every IPMI 1.5 request
    (Get Channel Authentication Capabilities, the first of a session) with completion code
    0xC0 "node busy", which ipmi_sim cannot be made to send."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.address, _ = free_endpoint()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.address, 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.1)
        self.requests = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            if data[3] == 0x06:  # ASF: presence ping -> pong (tag echoed)
                pong = bytes([0, 0, 0x11, 0xBE, 0x40, data[9], 0, 16])
                pong += bytes([0, 0, 0x11, 0xBE, 0, 0, 0, 0, 0x81, 0]) + bytes(6)
                self.sock.sendto(data[:4] + pong, peer)
            elif data[3] == 0x07 and data[4] == 0x00:  # IPMI 1.5, no authentication
                self.requests += 1
                msg = data[14:]
                rs_sa, netfn_lun, rq_sa, seq_lun, cmd = msg[0], msg[1], msg[3], msg[4], msg[5]
                head = bytes([rq_sa, ((netfn_lun >> 2) | 1) << 2 | (seq_lun & 3)])
                body = bytes([rs_sa, (seq_lun & 0xFC) | (netfn_lun & 3), cmd, 0xC0])
                reply = head + bytes([-sum(head) & 0xFF]) + body + bytes([-sum(body) & 0xFF])
                session = bytes([0]) + bytes(8) + bytes([len(reply)])
                self.sock.sendto(data[:4] + session + reply, peer)

    def close(self) -> None:
        self.stopped.set()
        self.join()
        self.sock.close()


def test_busy_bmc_is_retried_then_temporary() -> None:
    busy = BusyBmc()
    busy.start()
    try:
        power = Power("rack", min_interval=0.05, timeout=0.5, window=2.0)
        with pytest.raises(PoolError) as caught:
            power.state("m1", Bmc(busy.address, busy.port, "admin", PASSWORD, cipher_suite=3))
    finally:
        busy.close()
    error = caught.value
    assert error.temporary
    assert f"machine m1: BMC {busy.address}:{busy.port} busy after" in str(error)
    assert busy.requests >= 2
    assert_clean(error, PASSWORD)
