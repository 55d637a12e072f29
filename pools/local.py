"""The local pool: each node is a directory and a process tree on this machine.

Every node gets its own loopback address (127.0.x.y; Linux routes all of 127/8 to lo), so the
agent and the daemons its recipes start bind the ports they would bind on a real machine without
colliding. Two crv homes on one host allocate independently: give each its own 127.N.0.0/16
with CRV_LOCAL_NET=127.N (the test-suite does, one per parallel worker).

Processes are found again through environment markers that every descendant inherits: a daemon
that calls setsid or double-forks leaves the agent's process group, not its environment, so
destroy (and a reconciler, through `list_nodes`) still finds it.

Besides the built-in `local`, pools.yaml may name more pools of this driver (`driver: local`),
each with its own state directory, for example to cap one with `max_nodes` (its `capacity()`).
The local pools whose state directories are side by side (CRV_HOME/pools/*) share one address
table: none gives out an address another holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from crv.base.processes import environ, pids, proc_stat, same_process_alive, spawn
from pools.base import (
    TAG_CLUSTER,
    TAG_NODE,
    MaxNodes,
    NodeInfo,
    NodeSpec,
    PoolError,
    write_atomic,
)

NAME = "local"
NODE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
POOL_MARKER = "CRV_LOCAL_POOL"
NODE_MARKER = "CRV_LOCAL_NODE"
CLUSTER_MARKER = "CRV_LOCAL_CLUSTER"  # informative only: lets an orphan still name its cluster
TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
KILL_GRACE = 5.0  # seconds after SIGKILL before giving up (a process stuck in the kernel)
LOCAL_MARK = ".local-pool"  # in the state dir of each local pool: its addresses count as taken
ADDRESS_LOCK = ".local-addresses.lock"  # beside the state dirs: one allocation at a time
_TEMPORARY = {errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EBUSY, errno.EINTR}

Record = dict[str, Any]


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """OSError becomes PoolError at the boundary; only resource shortages are worth a retry."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"{action}: {exc.strerror or exc}{where}"
        raise PoolError(NAME, message, temporary=exc.errno in _TEMPORARY) from exc


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive flock on a fresh open file description. flock (unlike lockf, whose locks are
    per process) also excludes other threads of this process that open the file themselves."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _marks(pid: int) -> dict[str, str]:
    """The CRV_LOCAL_* variables a process started with; empty if it is gone, a zombie, or not
    ours to read (EPERM) - all of which mean: not a process of ours to signal."""
    return environ(pid, "CRV_LOCAL_")


class LocalOptions(BaseModel):
    """The options of a `driver: local` entry of pools.yaml."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_nodes: int | None = Field(default=None, ge=0, le=65_000)  # none: no limit


def configured(name: str, state_dir: Path, options: LocalOptions) -> LocalPool:
    """A local pool that pools.yaml names (pools/config.py DRIVERS)."""
    from pools import AGENT

    return LocalPool(state_dir, AGENT, name=name, max_nodes=options.max_nodes)


class LocalPool(MaxNodes):
    """Nodes as process trees under `root`, each running `agent` with `python`; at most
    `max_nodes` at a time (None: no limit), which `capacity()` tells."""

    def __init__(
        self,
        root: Path,
        agent: Path,
        python: str = sys.executable,
        net: str | None = None,
        *,
        name: str = NAME,
        max_nodes: int | None = None,
    ) -> None:
        self.name = name
        self.max_nodes = max_nodes
        self.root = Path(os.path.abspath(root))
        self.net = net or os.environ.get("CRV_LOCAL_NET") or "127.0"
        first, _, second = self.net.partition(".")
        if first != "127" or not second.isdigit() or not 0 <= int(second) <= 255:
            raise PoolError(NAME, f"CRV_LOCAL_NET={self.net!r}: expected 127.N with N in 0-255")
        self.agent = Path(agent)
        self.python = python
        self._lock = threading.Lock()  # the address table (with the flock) and `_children`
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # agents we spawned, to reap
        self._scan_lock = threading.Lock()
        self._scanned: tuple[float, dict[int, dict[str, str]]] = (0.0, {})  # (began, result)

    # -- the contract --------------------------------------------------------------------------

    def validate(self) -> None:
        """Permanent errors only: none of these fix themselves by waiting."""
        if not sys.platform.startswith("linux"):
            raise PoolError(NAME, f"needs Linux (127/8 routed to lo, /proc), not {sys.platform}")
        if not self.agent.is_file():
            raise PoolError(NAME, f"agent program {self.agent} not found")
        if shutil.which(self.python) is None:
            raise PoolError(NAME, f"python {self.python} not found or not executable")
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable", str(self.root))
        except OSError as exc:
            raise PoolError(NAME, f"state directory {self.root}: {exc.strerror}") from exc

    def list_nodes(self, cluster: str | None = None) -> list[NodeInfo]:
        with _translated("list nodes"):
            self._reap(None)
            nodes = [info for name in self._node_names() if (info := self._describe(name))]
            nodes += self._orphans({info.name for info in nodes})
        return [n for n in nodes if cluster is None or n.cluster == cluster]

    def get_node(self, name: str) -> NodeInfo | None:
        self._dir(name)
        with _translated(f"get node {name}"):
            self._reap(name)
            return self._describe(name)

    def create_node(self, spec: NodeSpec) -> NodeInfo:
        directory = self._dir(spec.name)
        with _translated(f"create node {spec.name}"), _flock(self._lockfile(spec.name)):
            self._reap(spec.name)
            record = self._record(spec.name)
            if record is not None and record.get("cluster") != spec.cluster:
                message = f"node {spec.name} exists in cluster {record.get('cluster')!r}"
                raise PoolError(NAME, f"{message}, not {spec.cluster!r}")
            if record is not None and same_process_alive(
                record.get("pid"), record.get("start_time")
            ):
                return self._info(record, "running")
            if directory.exists():  # a reboot: what the dead agent left running goes first
                self._stop(spec.name, record)
            return self._info(self._start(spec, directory, record), "running")

    def destroy_node(self, name: str) -> None:
        directory = self._dir(name)
        with _translated(f"destroy node {name}"), _flock(self._lockfile(name)):
            self._stop(name, self._record(name))
            if directory.exists():
                shutil.rmtree(directory)  # this frees the address
            with self._lock:
                self._children.pop(name, None)

    # -- node state ------------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        """A node name becomes a path component: refuse what could escape or hide in `root`."""
        if not name or name.startswith(".") or "/" in name or "\0" in name or len(name) > 200:
            raise PoolError(NAME, f"unusable node name {name!r}")
        return self.root / name

    def _lockfile(self, name: str) -> Path:
        # One lock per name, so nodes are made and destroyed in parallel; never deleted, since
        # unlinking a lock file races with whoever is waiting on it.
        return self.root / ".locks" / name

    def _node_names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [e for e in entries if not e.startswith(".") and (self.root / e).is_dir()]

    def _record(self, name: str) -> Record | None:
        try:
            record = json.loads((self.root / name / "node.json").read_bytes())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _describe(self, name: str) -> NodeInfo | None:
        record = self._record(name)
        if record is None:  # a create killed between mkdir and node.json, or no node at all
            gone = not (self.root / name).is_dir()
            return None if gone else NodeInfo(name=name, cluster="", state="error", address=None)
        running = same_process_alive(record.get("pid"), record.get("start_time"))
        return self._info(record, "running" if running else "stopped")

    def _info(self, record: Record, state: str) -> NodeInfo:
        extra = {k: record.get(k) for k in ("group", "pid", "created", "started")}
        extra["dir"] = str(self.root / record["name"])
        tags = dict(record["tags"])
        return NodeInfo(record["name"], record["cluster"], state, record["address"], tags, extra)

    def _orphans(self, known: set[str]) -> list[NodeInfo]:
        """Processes of this pool whose node dir is gone: a crash between steps, or a hand."""
        clusters: dict[str, str] = {}
        for marks in self._scan().values():
            node = marks.get(NODE_MARKER, "")
            if node and node not in known:
                clusters.setdefault(node, marks.get(CLUSTER_MARKER, ""))
        return [
            NodeInfo(node, cluster, "orphan", None, tags={TAG_CLUSTER: cluster, TAG_NODE: node})
            for node, cluster in sorted(clusters.items())
            if not (self.root / node).exists()  # made after we listed the dirs: not an orphan
        ]

    def _start(self, spec: NodeSpec, directory: Path, old: Record | None) -> Record:
        """Dir, address, files, agent; node.json is written before the spawn as well, so a
        crash at any step leaves a node that shows its cluster to a reconciler."""
        address = self._reserve(directory)
        tags = {**spec.tags, TAG_CLUSTER: spec.cluster, TAG_NODE: spec.name}
        record: Record = {"name": spec.name, "cluster": spec.cluster, "group": spec.group}
        record.update(address=address, tags=tags, pid=None, start_time=None)
        record["created"] = old.get("created", time.time()) if old else time.time()
        write_atomic(directory / "node.json", _dump(record), 0o600)
        self._install(spec, directory)
        proc = self._spawn(spec, directory)
        stat = proc_stat(proc.pid)
        record.update(pid=proc.pid, start_time=stat[1] if stat else None, started=time.time())
        write_atomic(directory / "node.json", _dump(record), 0o600)
        return record

    def _reserve(self, directory: Path) -> str:
        """The node's dir and address, under the pool-wide lock. The address is kept as the
        symlink `<dir>/address`, so allocating reads one link per node, not every node.json."""
        with self._lock, _flock(self.root.parent / ADDRESS_LOCK):
            (self.root / LOCAL_MARK).touch(mode=0o600)
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
            with suppress(FileNotFoundError):
                return os.readlink(directory / "address")
            address = self._allocate()
            os.symlink(address, directory / "address")
            return address

    def _allocate(self) -> str:
        """The smallest free 127.N.x.y from 127.N.1.1 (N from CRV_LOCAL_NET, default 0; host
        bytes 0 and 255 skipped; 127.0.0.x is the host's own), free in every local pool beside
        this one too. A removed dir has freed its address."""
        taken: set[str] = set()
        for root in self._address_roots():  # plain strings: pathlib costs more than syscalls
            with suppress(OSError):
                for entry in os.listdir(root):
                    with suppress(OSError):
                        taken.add(os.readlink(f"{root}/{entry}/address"))
        for x in range(1, 256):
            for y in range(1, 255):
                if (address := f"{self.net}.{x}.{y}") not in taken:
                    return address
        last = f"{self.net}.255.254"
        raise PoolError(NAME, f"no free loopback address left in {self.net}.1.1-{last}")

    def _address_roots(self) -> list[str]:
        """This pool's state dir and those of the other local pools beside it (marked)."""
        roots = [str(self.root)]
        with suppress(OSError):
            for entry in os.scandir(self.root.parent):
                if entry.path != roots[0] and os.path.exists(f"{entry.path}/{LOCAL_MARK}"):
                    roots.append(entry.path)
        return roots

    def _install(self, spec: NodeSpec, directory: Path) -> None:
        """The agent program, and the one-time bootstrap only while the node has not enrolled:
        after that its certificate is its identity and the spent token must not come back."""
        (directory / "bin").mkdir(mode=0o700, exist_ok=True)
        write_atomic(directory / "bin" / "crv-agent", self.agent.read_bytes(), 0o755)
        if not (directory / "node.crt").exists():
            payload = json.dumps(dict(spec.bootstrap)).encode()
            write_atomic(directory / "bootstrap.json", payload, 0o600)

    # -- processes -------------------------------------------------------------------------------

    def _spawn(self, spec: NodeSpec, directory: Path) -> subprocess.Popen[bytes]:
        """The agent in its own session; the markers go into the environment every descendant
        inherits. A node sees what a fresh machine would (PATH, HOME, locale), never crv's own
        environment, which may hold cloud or BMC credentials (house rule 6)."""
        env = {k: v for k, v in os.environ.items() if k in NODE_ENV}
        env[POOL_MARKER] = str(self.root)
        env[NODE_MARKER] = spec.name
        env[CLUSTER_MARKER] = spec.cluster
        env["PATH"] = f"{directory / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        agent = str(directory / "bin" / "crv-agent")
        command = [self.python, agent, "run", "--home", str(directory)]
        proc = spawn(command, log=directory / "agent.log", env=env, cwd=directory)
        with self._lock:
            self._children[spec.name] = proc
        return proc

    def _reap(self, name: str | None) -> None:
        """Collect agents we spawned that have exited (all of them when `name` is None), so
        they do not linger as zombies."""
        with self._lock:
            for key in list(self._children) if name is None else [name]:
                proc = self._children.get(key)
                if proc is not None and proc.poll() is not None:
                    del self._children[key]

    def _scan(self) -> dict[int, dict[str, str]]:
        """Every live process that carries this pool's marker, with its markers. A walk of /proc
        reads every process's environment, so threads share one: a walk that began after a
        thread asked is as good as its own (destroying 1,000 nodes is not 1,000 walks a round)."""
        asked = time.monotonic()
        with self._scan_lock:
            if self._scanned[0] <= asked:
                began = time.monotonic()
                self._scanned = (began, self._walk())
            return self._scanned[1]

    def _walk(self) -> dict[int, dict[str, str]]:
        found: dict[int, dict[str, str]] = {}
        me = os.getpid()  # we may run inside a node ourselves: never signal crv
        for pid in pids():
            if pid != me:
                marks = _marks(pid)
                if marks.get(POOL_MARKER) == str(self.root):
                    found[pid] = marks
        return found

    def _stop(self, name: str, record: Record | None) -> None:
        """SIGTERM the agent's group and every process marked as this node's, SIGKILL what is
        left after TERM_GRACE, and return once none is alive. Each round scans again, so a
        process forked meanwhile is caught too. A marked process is held by a pidfd from the
        first scan that sees it until the pidfd says it has exited: an exiting process loses
        its environment (so its markers) before it has closed its files and sockets."""
        start = record.get("start_time") if record else None
        pid = record.get("pid") if record else None
        # never signal a group whose leader we cannot vouch for (the pid may be reused)
        leader = pid if isinstance(pid, int) and same_process_alive(pid, start) else None
        group, sig, delay, began = leader, signal.SIGTERM, 0.005, time.monotonic()
        held: dict[int, int] = {}  # pid -> pidfd of a marked process not yet seen exit
        try:
            while True:
                self._reap(name)
                for target, marks in self._scan().items():
                    if marks.get(NODE_MARKER) == name and target not in held:
                        fd = _pidfd_of_marked(target, self.root, name)
                        if fd is not None:
                            held[target] = fd
                for target in [t for t, fd in held.items() if _exited(fd)]:
                    os.close(held.pop(target))
                if not held and not (leader is not None and same_process_alive(leader, start)):
                    return
                if group is not None:
                    try:
                        os.killpg(group, sig)
                    except OSError:  # the group is empty: its number may be anyone's now
                        group = None
                for fd in held.values():
                    with suppress(OSError):
                        signal.pidfd_send_signal(fd, sig)
                elapsed = time.monotonic() - began
                if elapsed > TERM_GRACE + KILL_GRACE:
                    raise PoolError(
                        NAME, f"node {name}: {sorted(held)} outlive SIGKILL", temporary=True
                    )
                if elapsed > TERM_GRACE:
                    sig = signal.SIGKILL
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        finally:
            for fd in held.values():
                os.close(fd)


def _pidfd_of_marked(pid: int, root: Path, node: str) -> int | None:
    """A pidfd of `pid` if that very process carries the node's markers (checked after
    opening it, so a pid reused since the scan is never held), else None."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    marks = _marks(pid)
    if marks.get(POOL_MARKER) == str(root) and marks.get(NODE_MARKER) == node:
        return fd
    os.close(fd)
    return None


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (a zombie included)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _dump(record: Record) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
