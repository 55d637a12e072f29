"""Machine emulators: the booting guest of a pool's machines, for end-to-end tests.

Why. The libvirt and libcloud pools make machines that boot a cloud image, whose cloud-init
writes the agent and its bootstrap from the user-data the pool handed over and starts the agent
as a systemd service. In tests nothing boots: libvirt's `test:///default` driver is an in-memory
hypervisor and moto's EC2 only records instances. An emulator plays the guest: it watches the
pool's hypervisor or cloud API (a daemon thread, every `POLL` seconds) and, for each crv machine
that is running, reads back the user-data the machine would boot with, lays out the files as
cloud-init would (the agent script, `<home>/bootstrap.json` mode 0600 in a 0700 home) and runs
the agent (`crv-agent run --home HOME`) as a local process, in its own process group. A machine
that is no longer running (destroyed, terminated, powered off) loses its agent: its process
group gets SIGTERM, then SIGKILL after `KILL_AFTER` seconds, like a power-off.

What is real: the exact bytes the pool handed to the machine (read back through the same API a
hypervisor or cloud would give them to the guest: the seed ISO the domain's cdrom names, EC2's
`userData` attribute), the agent program taken from them, and the service it enrols with.

What is not: there is no machine, so no network address of its own. The agent runs on this
host and reaches the service on loopback; the service knows the node by the address the pool
reported (whatever the tests registered). cloud-init itself does not run (`cloudinit.parse`
reads the document), there is no systemd (an agent that exits is not restarted) and the agent
runs as the test user, not root.

Usage::

    with Ec2Machines(url, "us-east-1", "testing", "testing", tmp_path, cluster=c) as machines:
        info = pool.create_node(spec)
        machines.wait(lambda: info.extra["id"] in machines.running(), 30, "the boot")

The ids are the provider's machine ids: the EC2 instance id (`NodeInfo.extra["id"]`), the libvirt
domain UUID (`NodeInfo.extra["uuid"]`), so a node destroyed and made again is a new machine. Agents are stopped on leaving the context, and by an
atexit hook should the test process end without leaving it (a killed test process cannot clean
up: the agents, in their own sessions, would outlive it; they give up enrolling after their
`--deadline`).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import libvirt  # type: ignore[import-untyped]  # libvirt-python ships no type hints
import pycdlib

from pools import cloudinit
from pools.base import TAG_CLUSTER
from pools.libvirt import NAMESPACE

POLL = 0.2  # seconds between two looks at the hypervisor / cloud
KILL_AFTER = 3.0  # seconds between SIGTERM and SIGKILL of a powered-off machine's agent
ENROL_DEADLINE = 120.0  # the agent's --deadline: an orphaned agent gives up enrolling


class Machines:
    """The emulator: subclasses say which machines run and what user-data each boots with."""

    def __init__(self, base_dir: Path | str, *, deadline: float = ENROL_DEADLINE) -> None:
        self.base_dir = Path(base_dir)
        self.deadline = deadline
        self.last_error: BaseException | None = None  # of discover(), or of booting a machine
        self.errors: dict[str, str] = {}  # id -> why it could not boot (not retried)
        self._lock = threading.RLock()
        self._booted: set[str] = set()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._fetch: dict[str, list[str]] = {}  # id -> its first boot's agent fetch (runcmd)
        self._stopping: dict[str, float] = {}  # id -> when SIGKILL is due
        self._present: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what subclasses provide --------------------------------------------------------------

    def discover(self) -> dict[str, bytes]:
        """Machine id -> raw user-data, for the machines that are running now."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the API connection (called once the polling thread has stopped)."""

    # -- the public view ----------------------------------------------------------------------

    @property
    def booted(self) -> set[str]:
        """Every id an agent was ever started for."""
        with self._lock:
            return set(self._booted)

    def running(self) -> set[str]:
        """The ids whose agent process is alive."""
        with self._lock:
            return {i for i, p in self._procs.items() if p.poll() is None}

    def home(self, machine: str) -> Path:
        return self.base_dir / machine / "home"

    def log_path(self, machine: str) -> Path:
        return self.base_dir / machine / "agent.log"

    def pid(self, machine: str) -> int | None:
        """The agent's process id (also its process group and session), None if never booted."""
        with self._lock:
            proc = self._procs.get(machine)
            return proc.pid if proc is not None else None

    def log(self, machine: str) -> str:
        """The agent's stdout and stderr so far ('' before it started)."""
        try:
            return self.log_path(machine).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
        """Until `condition()` holds; AssertionError (with the emulator's state) after timeout."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}: {self}")
            time.sleep(0.05)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} booted={sorted(self.booted)} running={sorted(self.running())}"
            f" errors={self.errors} last_error={self.last_error!r}>"
        )

    # -- the context manager --------------------------------------------------------------------

    def __enter__(self) -> Machines:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        _LIVE.add(self)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"{type(self).__name__}-poll", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop polling, then every agent (SIGTERM, SIGKILL after KILL_AFTER seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._kill_all()
        with contextlib.suppress(Exception):
            self.close()
        _LIVE.discard(self)

    # -- the polling thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # a flaky API must not end the emulation: retry
                self.last_error = exc
            self._stop.wait(POLL)

    def poll_once(self) -> None:
        """One look: boot the machines that appeared, power off those that went away."""
        found = self.discover()  # raises: nothing changes, the next poll retries
        with self._lock:
            previous, self._present = self._present, set(found)
            for machine in sorted(previous - set(found)):
                self._power_off(machine)
            for machine in sorted(set(found) - previous):
                if machine in self.errors:
                    continue
                try:
                    self._boot(machine, found[machine])
                except Exception as exc:
                    self.last_error = exc
                    self.errors[machine] = f"{type(exc).__name__}: {exc}"
            self._reap()

    def _boot(self, machine: str, user_data: bytes) -> None:
        old = self._procs.get(machine)
        if old is not None and old.poll() is None:
            return  # powered off and on again before its agent went: it keeps running
        root = self.base_dir / machine
        home = self.home(machine)
        agent = root / "crv-agent"
        if not (home / "bootstrap.json").exists():  # cloud-init's write_files: first boot only
            files = cloudinit.parse(user_data)
            carried = (
                cloudinit.AGENT_PATH if cloudinit.AGENT_PATH in files else cloudinit.FETCH_PATH
            )
            missing = {carried, cloudinit.BOOTSTRAP_PATH} - set(files)
            if missing:
                raise ValueError(f"user-data of {machine} writes no {sorted(missing)}")
            root.mkdir(parents=True, exist_ok=True)
            home.mkdir(mode=0o700, exist_ok=True)
            home.chmod(0o700)
            if carried == cloudinit.AGENT_PATH:
                agent.write_bytes(files[cloudinit.AGENT_PATH])
                agent.chmod(0o755)
            else:  # cloud-init's runcmd fetches it from the service first: the real fetcher
                (root / "crv-agent-fetch").write_bytes(files[cloudinit.FETCH_PATH])
                (fetch,) = (c for c in cloudinit.runcmd(user_data) if cloudinit.FETCH_PATH in c)
                self._fetch[machine] = [
                    sys.executable, str(root / "crv-agent-fetch"), str(home / "bootstrap.json"),
                    str(agent), fetch[-1],
                ]  # fmt: skip
            fd = os.open(home / "bootstrap.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(files[cloudinit.BOOTSTRAP_PATH])
        command = [sys.executable, str(agent), "run", "--home", str(home)]
        command += ["--deadline", str(self.deadline)]
        if not agent.exists() and machine in self._fetch:  # the first boot's runcmd, then run
            command = [
                "sh",
                "-c",
                f"{shlex.join(self._fetch[machine])} && exec {shlex.join(command)}",
            ]
        with open(self.log_path(machine), "ab") as log:
            self._procs[machine] = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                start_new_session=True,
            )
        self._booted.add(machine)
        self._stopping.pop(machine, None)

    def _power_off(self, machine: str) -> None:
        proc = self._procs.get(machine)
        if proc is None or proc.poll() is not None or machine in self._stopping:
            return
        _signal_group(proc, signal.SIGTERM)
        self._stopping[machine] = time.monotonic() + KILL_AFTER

    def _reap(self) -> None:
        now = time.monotonic()
        for machine, due in list(self._stopping.items()):
            proc = self._procs[machine]
            if proc.poll() is not None:
                _signal_group(proc, signal.SIGKILL)  # what the agent left in its group
                del self._stopping[machine]
            elif now >= due:
                _signal_group(proc, signal.SIGKILL)

    def _kill_all(self) -> None:
        with self._lock:
            procs = [p for p in self._procs.values() if p.poll() is None]
            for proc in procs:
                _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + KILL_AFTER
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, deadline - time.monotonic()))
            for proc in procs:  # only groups seen alive: an old pid may be someone else's now
                _signal_group(proc, signal.SIGKILL)  # the laggards and any leftover children
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            self._stopping.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the agent's process group (its session: pgid == pid), even once the agent itself
    has exited, as long as the group lives on."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


_LIVE: weakref.WeakSet[Machines] = weakref.WeakSet()


@atexit.register
def _stop_everything() -> None:
    for machines in list(_LIVE):
        machines._stop.set()
        machines._kill_all()


# -- EC2 ------------------------------------------------------------------------------------------


class Ec2Machines(Machines):
    """EC2 instances (moto's server, or any endpoint) carrying crv's cluster tag, by instance
    id; user-data from `DescribeInstanceAttribute` (gzip-compressed by the pool: `parse` takes
    it so). `cluster` limits the emulation to one cluster's instances."""

    def __init__(
        self,
        endpoint_url: str,
        region: str,
        key: str,
        secret: str,
        base_dir: Path | str,
        *,
        cluster: str | None = None,
        deadline: float = ENROL_DEADLINE,
    ) -> None:
        super().__init__(base_dir, deadline=deadline)
        import boto3  # type: ignore[import-untyped]  # moto's dependency, here only
        from botocore.config import Config  # type: ignore[import-untyped]

        self.cluster = cluster
        self._client: Any = boto3.client(
            "ec2",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=10),
        )
        self._user_data: dict[str, bytes] = {}  # an instance's user-data never changes

    def discover(self) -> dict[str, bytes]:
        filters = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
        if self.cluster is None:
            filters.append({"Name": "tag-key", "Values": [TAG_CLUSTER]})
        else:
            filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [self.cluster]})
        ids = []
        for page in self._client.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                ids += [i["InstanceId"] for i in reservation["Instances"]]
        found = {}
        for instance in sorted(ids):
            if instance not in self._user_data:
                answer = self._client.describe_instance_attribute(
                    InstanceId=instance, Attribute="userData"
                )
                value = answer.get("UserData", {}).get("Value")
                if not value:
                    continue  # no user-data: no agent to run (nor a crv machine)
                self._user_data[instance] = base64.b64decode(value)
            found[instance] = self._user_data[instance]
        return found

    def close(self) -> None:
        self._client.close()


# -- libvirt --------------------------------------------------------------------------------------


class LibvirtMachines(Machines):
    """Active libvirt domains with crv's metadata, by domain UUID; user-data from the NoCloud
    seed ISO their cdrom names. The connection is opened in this process, so for
    `test:///default` it sees the same in-memory hypervisor as the pool. Only seeds that are
    files (seed mode "file") can be read; a seed volume is an error for that machine."""

    def __init__(
        self,
        uri: str,
        base_dir: Path | str,
        *,
        cluster: str | None = None,
        deadline: float = ENROL_DEADLINE,
    ) -> None:
        super().__init__(base_dir, deadline=deadline)
        self.uri = uri
        self.cluster = cluster
        self._conn: Any = None

    def _connect(self) -> Any:
        if self._conn is None:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors raise anyway
            self._conn = libvirt.open(self.uri)
        return self._conn

    def discover(self) -> dict[str, bytes]:
        conn = self._connect()
        found = {}
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
                uuid = dom.UUIDString()
                if uuid in found or uuid in self.errors:
                    continue
                cluster = ET.fromstring(meta).findtext("cluster")
                if not cluster or (self.cluster is not None and cluster != self.cluster):
                    continue
                if uuid in self._present:
                    found[uuid] = b""  # already booted: its user-data is not read again
                    continue
                try:
                    found[uuid] = self._seed_user_data(dom.XMLDesc(0))
                except (NotImplementedError, ValueError, OSError) as exc:
                    self.last_error = exc  # this machine cannot boot; the others can
                    self.errors[uuid] = f"{type(exc).__name__}: {exc}"
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in (
                    libvirt.VIR_ERR_NO_DOMAIN_METADATA,  # not a crv domain
                    libvirt.VIR_ERR_NO_DOMAIN,  # gone in between
                ):
                    continue
                raise
        return found

    @staticmethod
    def _seed_user_data(domain_xml: str) -> bytes:
        """`user-data` of the seed ISO on the domain's cdrom."""
        for disk in ET.fromstring(domain_xml).iter("disk"):
            if disk.get("device") != "cdrom":
                continue
            source = disk.find("source")
            path = source.get("file") if source is not None else None
            if disk.get("type") != "file" or not path:
                raise NotImplementedError(
                    f"the seed is a {disk.get('type')} cdrom, not a file: LibvirtMachines reads "
                    "only seed mode 'file'"
                )
            iso = pycdlib.PyCdlib()
            iso.open(path)
            try:
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, joliet_path="/user-data")
                return out.getvalue()
            finally:
                iso.close()
        raise ValueError("the domain has no cdrom (no cloud-init seed)")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
