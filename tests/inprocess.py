"""Run several `crv` commands in this one process while `LibvirtMachines` boots the libvirt
test driver's domains (tests/machines.py).

libvirt's `test:///default` is an in-memory hypervisor, one per process: the deploy that defines
the domains, the emulator that boots them, and the status and destroy that list them must share
a process. Usage (CRV_HOME and the pools file in the environment, `crv up` already run):

    python -m tests.inprocess MACHINES_DIR CLUSTER -- deploy DIR ... -- status NAME --json

After each command its exit code is printed on a line of its own, `=== exit N`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from crv_cli.main import app
from tests.machines import LibvirtMachines

MARK = "=== exit"


def main(argv: list[str]) -> int:
    base, cluster, *rest = argv
    commands: list[list[str]] = []
    for word in rest:
        if word == "--" and (not commands or commands[-1]):
            commands.append([])
        else:
            commands[-1].append(word)
    with LibvirtMachines("test:///default", Path(base), cluster=cluster):
        for command in commands:
            try:
                app(command)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush()
            print(f"{MARK} {code}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
