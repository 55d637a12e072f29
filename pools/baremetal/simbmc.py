"""Simulated BMCs: OpenIPMI's `ipmi_sim` speaking real IPMI 2.0 (RMCP+) on a 127.0.0.x UDP port,
with a chassis whose "machine" is a process tree on this host.

Why: the baremetal pool's power code (pools/baremetal/ipmi.py) should be tested against a BMC
that speaks the real protocol - presence ping, RAKP handshake, AES payloads, completion codes -
not against a mock of python-ipmi. `ipmi_sim` does all that and delegates the chassis to a
program named in lan.conf (`chassis_control`), called through popen as
`hook 0x20 get power|boot` (answer `power:0|1`, `boot:none|pxe|default`) and
`hook 0x20 set power|boot|reset VAL`. That program is `hook_main` here, behind a small shell
wrapper in `machine_dir/bmc` that fixes the interpreter, PYTHONPATH and the machine directory.

Facts found by experiment with Debian's openipmi 2.0.33 (`ipmi_sim` 1.0.13):

- No SHA-256: cipher suite 17 is answered with "invalid authentication algorithm"; suites 1, 2
  and 3 (SHA-1) work. Clients of a simulated BMC must pin `cipher_suite=3`. lan.conf has no
  option to restrict the suites (1 and 2 stay enabled).
- Without `allowed_auths_*` lines no IPMI 1.5 session can be opened; RMCP+ still works. So the
  generated lan.conf has none: RMCP+ only.
- Power cycle is `set power 0`, then (after >= 1 s, once `get power` says 0) `set power 1`,
  asynchronously; Chassis Control "hard reset" is `set reset 1`. A cycle of a chassis that is
  off powers it on.
- The hook runs synchronously inside ipmi_sim's only thread: while it runs, the BMC answers
  nothing (a slow power-off shows as a client timeout, retried). A hook exit status other than 0
  becomes completion code 0xFF.
- A slow answer, for tests: `bmc/slow-power-on` holds the seconds the next power-on takes (the
  file is then removed). Above the client's timeout, the answer comes late: the client retries
  while the BMC is still carrying the command out, as on a loaded host or a slow real BMC.
- Users given in lan.conf are ignored once the state directory holds persisted users, so
  `write_config` empties the state directory.
- The persistent bit of Set System Boot Options is ignored by ipmi_sim; "next boot only" is the
  hook's doing: on power-on it records the boot device in `booted-from` (before the machine
  starts, so the machine can read it without a race; also in $CRV_RACK_BOOTDEV) and resets
  `bootdev` to `default`.

The machine: `machine-command.json` (a JSON argv list; `sleep infinity` when missing), started
detached in its own session with stdout+stderr appended to `console.log` and
CRV_RACK_MACHINE=<machine_dir> in its environment, which every descendant inherits - a daemon
that calls setsid leaves the session, not the environment - so power-off finds the whole tree.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crv.base.processes import (
    environ,
    parent,
    pids,
    same_process_alive,
    spawn,
    start_ticks,
    wait_ready,
)
from pools.base import write_atomic

IPMI_SIM = "/usr/bin/ipmi_sim"
MACHINE_MARKER = "CRV_RACK_MACHINE"
DIR_VAR = "CRV_SIMBMC_MACHINE_DIR"  # set by the hook wrapper only
REPO = Path(__file__).resolve().parent.parent.parent
ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
BOOT_DEVICES = ("none", "pxe", "default", "cdrom", "bios")  # ipmi_sim's boot_map
TERM_GRACE = 3.0
KILL_GRACE = 5.0


@dataclass(frozen=True)
class SimBmcSpec:
    machine: str
    address: str
    port: int
    username: str
    password: str = field(repr=False)
    machine_dir: Path


def _bmc_dir(spec: SimBmcSpec) -> Path:
    return spec.machine_dir.resolve() / "bmc"


def _conf_string(what: str, value: str) -> str:
    """A value inside double quotes of lan.conf: ipmi_sim has no escapes, so refuse quotes."""
    if any(c in value for c in '"\\\n\r'):
        raise ValueError(
            f"simulated BMC: the {what} must not contain quotes, backslashes or newlines"
        )
    return f'"{value}"'


def write_config(spec: SimBmcSpec) -> None:
    """lan.conf, the emulator command file, the chassis hook wrapper and an empty state directory
    under `spec.machine_dir / "bmc"` (0700; files holding the password 0600)."""
    if len(spec.password.encode()) > 20 or not spec.password:
        raise ValueError("simulated BMC: the password must have 1 to 20 bytes")
    machine_dir = spec.machine_dir.resolve()
    machine_dir.mkdir(parents=True, exist_ok=True)
    bmc = _bmc_dir(spec)
    bmc.mkdir(mode=0o700, exist_ok=True)
    bmc.chmod(0o700)
    state = bmc / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(mode=0o700)

    hook = bmc / "chassis-hook"
    wrapper = (
        "#!/bin/sh\n"
        "# ipmi_sim's chassis_control program for this machine (pools/baremetal/simbmc.py)\n"
        f"{DIR_VAR}={shlex.quote(str(machine_dir))}; export {DIR_VAR}\n"
        f"PYTHONPATH={shlex.quote(str(REPO))}; export PYTHONPATH\n"
        f'exec {shlex.quote(sys.executable)} -m pools.baremetal.simbmc hook "$@"\n'
    )
    write_atomic(hook, wrapper.encode(), 0o700)

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.machine) or "machine"
    lan = (
        f"# simulated BMC of machine {spec.machine}; written by pools/baremetal/simbmc.py\n"
        f'name "crv-{name}"\n'
        "set_working_mc 0x20\n"
        "  startlan 1\n"
        f"    addr {spec.address} {spec.port}\n"
        "    priv_limit admin\n"
        "    # no allowed_auths_* lines: no IPMI 1.5 sessions, RMCP+ only\n"
        "    guid a123456789abcdefa123456789abcdef\n"
        "  endlan\n"
        f"  chassis_control {_conf_string('hook path', f'{shlex.quote(str(hook))} 0x20')}\n"
        f"  user 2 true {_conf_string('user name', spec.username)} "
        f"{_conf_string('password', spec.password)} admin 4\n"
    )
    write_atomic(bmc / "lan.conf", lan.encode(), 0o600)
    emu = (
        "# the BMC at IPMB 0x20, with chassis device support (0x9f)\n"
        "mc_setbmc 0x20\n"
        "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\n"
        "mc_enable 0x20\n"
    )
    write_atomic(bmc / "emu", emu.encode(), 0o600)


def start(spec: SimBmcSpec, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Start ipmi_sim for `spec` (writing its config first if there is none) and return once it
    answers a presence ping; RuntimeError with the tail of its output otherwise."""
    from pools.baremetal.ipmi import presence_ping  # pyipmi: not needed by the hook

    bmc = _bmc_dir(spec)
    if not (bmc / "lan.conf").exists():
        write_config(spec)
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP}
    command = [IPMI_SIM, "-c", str(bmc / "lan.conf"), "-f", str(bmc / "emu"), "-n"]
    command += ["-s", str(bmc / "state")]
    log = bmc / "ipmi_sim.log"
    proc = spawn(command, log=log, env=env, cwd=bmc)
    if wait_ready(
        proc, lambda: presence_ping(spec.address, spec.port, 0.2), timeout=timeout, interval=0.05
    ):
        return proc
    stop(proc)
    tail = log.read_bytes()[-2000:].decode(errors="replace").strip()
    raise RuntimeError(
        f"simulated BMC of {spec.machine} at {spec.address}:{spec.port} did not start "
        f"(exit status {proc.returncode}): {tail or 'no output'}"
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop ipmi_sim (the machine behind it stays as it is, like a real one's)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


# -- the machine ---------------------------------------------------------------------------------


def _marked(pid: int) -> str | None:
    """The CRV_RACK_MACHINE a live process started with; None if it has none, is gone, is a
    zombie (empty environ) or is not ours to read."""
    return environ(pid, MACHINE_MARKER).get(MACHINE_MARKER)


def _ancestors() -> set[int]:
    """This process and its ancestors: a machine may power itself off through its own BMC,
    and the hook must not kill the chain that runs it."""
    found: set[int] = set()
    pid: int | None = os.getpid()
    while pid is not None and pid > 1 and pid not in found:
        found.add(pid)
        pid = parent(pid)
    return found


def _root(machine_dir: Path) -> int | None:
    """The pid of the machine program as `machine_on` recorded it in power.json, while that very
    process (same start time) lives; a zombie does not count.

    Why: for a moment during an execve the process's environ reads empty, so the marker scan
    misses a process that is exec'ing - and the machine program execs (simmachine becomes the
    agent). A power-off whose scan fell in that moment found nothing and left the machine on.
    The pid and start time survive the execve."""
    try:
        record = json.loads((machine_dir / "power.json").read_text())
    except (OSError, ValueError):
        return None
    pid = record.get("pid")
    return pid if same_process_alive(pid, record.get("start_time")) else None


def _machine_pids(machine_dir: Path) -> list[int]:
    spared = _ancestors()
    target = str(machine_dir)
    found = [p for p in pids() if p not in spared and _marked(p) == target]
    root = _root(machine_dir)
    if root is not None and root not in found and root not in spared:
        found.append(root)
    return found


def _signal(pid: int, machine_dir: Path, sig: int) -> None:
    """Through a pidfd, after checking on that very process the marker, or that it is the
    recorded machine program (same start time): a pid reused between the scan and the signal is
    never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _marked(pid) == str(machine_dir) or _root(machine_dir) == pid:
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def machine_running(machine_dir: Path) -> bool:
    """Power is on while any process of the machine lives."""
    return bool(_machine_pids(machine_dir.resolve()))


def machine_on(machine_dir: Path) -> None:
    """Start the machine program, unless the machine is running."""
    machine_dir = machine_dir.resolve()
    if machine_running(machine_dir):
        return
    try:
        command = json.loads((machine_dir / "machine-command.json").read_text())
    except FileNotFoundError:
        command = ["sleep", "infinity"]
    if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
        raise ValueError("machine-command.json must hold a non-empty JSON list of strings")
    boot = _bootdev(machine_dir)
    # before the start: the machine reads booted-from without racing the reset below
    write_atomic(machine_dir / "booted-from", f"{boot}\n".encode(), 0o644)
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP}
    env[MACHINE_MARKER] = str(machine_dir)
    env["CRV_RACK_BOOTDEV"] = boot
    proc = spawn(command, log=machine_dir / "console.log", env=env, cwd=machine_dir)
    record = {
        "pid": proc.pid,
        "start_time": start_ticks(proc.pid),
        "booted_from": boot,
        "started_at": time.time(),
    }
    write_atomic(machine_dir / "power.json", json.dumps(record).encode() + b"\n", 0o644)
    write_atomic(machine_dir / "bootdev", b"default\n", 0o644)


def machine_off(machine_dir: Path) -> None:
    """SIGTERM every process of the machine, SIGKILL what is left after TERM_GRACE, and return
    once none is alive (RuntimeError if some outlive SIGKILL). Each round scans again, so a
    process forked meanwhile is caught too."""
    machine_dir = machine_dir.resolve()
    sig, delay, began = signal.SIGTERM, 0.005, time.monotonic()
    while True:
        pids = _machine_pids(machine_dir)
        if not pids:
            return
        for pid in pids:
            _signal(pid, machine_dir, sig)
        elapsed = time.monotonic() - began
        if elapsed > TERM_GRACE + KILL_GRACE:
            raise RuntimeError(f"machine {machine_dir}: {pids} outlive SIGKILL")
        if elapsed > TERM_GRACE:
            sig = signal.SIGKILL
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _bootdev(machine_dir: Path) -> str:
    try:
        value = (machine_dir / "bootdev").read_text().strip()
    except FileNotFoundError:
        return "default"
    return value if value in BOOT_DEVICES else "default"


# -- the chassis_control hook --------------------------------------------------------------------


@contextlib.contextmanager
def _locked(machine_dir: Path) -> Iterator[None]:
    """One hook at a time per machine (ipmi_sim runs them one by one; a test's cleanup may not)."""
    path = machine_dir / "bmc" / "hook.lock"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def hook_main(argv: list[str]) -> int:
    """`hook DEV get PARM...` prints `PARM:VALUE` lines; `hook DEV set PARM VAL...` prints
    nothing. Every call is appended to `bmc/hook.log` (wall-clock time, arguments)."""
    where = os.environ.get(DIR_VAR)
    if not where or len(argv) < 2:
        print(f"usage: {DIR_VAR}=DIR hook DEV get|set PARM [VAL]...", file=sys.stderr)
        return 2
    machine_dir = Path(where).resolve()
    try:
        return _hook(machine_dir, argv)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"chassis hook {argv}: {e}", file=sys.stderr)
        return 1


def _hook(machine_dir: Path, argv: list[str]) -> int:
    _, verb, *rest = argv
    with _locked(machine_dir):
        with open(machine_dir / "bmc" / "hook.log", "a") as calls:
            calls.write(f"{time.time():.6f} {' '.join(argv)}\n")
        if verb == "get":
            for parm in rest:
                if parm == "power":
                    print(f"power:{int(machine_running(machine_dir))}")
                elif parm == "boot":
                    print(f"boot:{_bootdev(machine_dir)}")
                else:
                    print(f"unsupported parameter {parm}", file=sys.stderr)
                    return 1
            return 0
        if verb == "check":
            return 0
        if verb != "set" or len(rest) % 2:
            print(f"unsupported call {argv}", file=sys.stderr)
            return 2
        for parm, value in zip(rest[::2], rest[1::2], strict=True):
            if parm == "power" and value == "1":
                slow = machine_dir / "bmc" / "slow-power-on"
                with contextlib.suppress(FileNotFoundError):
                    seconds = float(slow.read_text())
                    slow.unlink()
                    time.sleep(seconds)
                machine_on(machine_dir)
            elif parm == "power":
                machine_off(machine_dir)
            elif parm == "reset":
                if machine_running(machine_dir):
                    machine_off(machine_dir)
                    machine_on(machine_dir)
            elif parm == "shutdown":
                machine_off(machine_dir)
            elif parm == "boot":
                if value not in BOOT_DEVICES:
                    print(f"unsupported boot device {value}", file=sys.stderr)
                    return 1
                write_atomic(machine_dir / "bootdev", f"{value}\n".encode(), 0o644)
            elif parm == "identify":
                pass
            else:
                print(f"unsupported parameter {parm}", file=sys.stderr)
                return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["hook"]:
        return hook_main(argv[1:])
    print("usage: python -m pools.baremetal.simbmc hook DEV get|set PARM [VAL]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
