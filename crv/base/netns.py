"""Listening sockets inside a network namespace, for a process that lives outside it.

The lab (lab/lab.py) keeps its guests in a network namespace of their own, and only addresses
inside it may receive their traffic. The crv service runs in the host's namespace (the flows,
the CLI and local agents reach it on loopback) and also needs a listener that guests reach at
an address of the lab: a socket created by a thread that has joined the lab's namespace belongs
to that namespace for life, whichever thread or process uses it afterwards (setns(2) changes
only the calling thread). Python 3.11 has no `os.setns` (3.12 does), hence libc through ctypes.
Needs CAP_SYS_ADMIN (root), as the lab itself does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # where `ip netns add NAME` pins a namespace


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def listen_in(netns: Path, host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to (host, port) inside the namespace pinned at `netns`, listening.
    Raises OSError (with the namespace named) when it cannot be joined or the bind fails."""
    result: list[socket.socket | BaseException] = []

    def inside() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            sock.set_inheritable(False)
            result.append(sock)
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    # a thread of its own: it leaves the process's other threads in the host's namespace, and
    # it ends (still inside the lab) as soon as the socket exists
    thread = threading.Thread(target=inside, name=f"netns-listen-{netns.name}", daemon=True)
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        if isinstance(outcome, OSError) and str(netns) not in str(outcome):
            raise OSError(outcome.errno, f"{netns}: {host}:{port}: {outcome.strerror}")
        raise outcome
    return outcome
