"""F11: destroy right after a killed deploy, without running it again first
(docs/reliability.md). Nothing of the cluster is left: no node process or directory in the pool,
every certificate its nodes got on the CRL, and nothing of it in crv's state database (nodes,
roles, the attributes its nodes published, tokens).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import write_appliance
from tests.test_deploy_e2e import Crv, home_up

pytestmark = pytest.mark.faults

# w-0 and w-1 publish and finish at once; w-2 takes long, so the kill finds the deploy halfway:
# some nodes enrolled and published, one running its recipe, the head not released
HALFWAY = """\
apiVersion: crv/v1
name: halfway
nodes:
  w: {count: 3, roles: [svc]}
  head: {count: 1, roles: [top]}
roles:
  svc: {recipe: svc.sh}
  top: {recipe: top.sh, depends_on: [svc]}
"""
SVC = """\
#!/bin/sh
crv-agent set name "$CRV_NODE"
case "$CRV_NODE" in *-2) sleep 60 ;; esac
"""


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    with home_up(tmp_path_factory.mktemp("crv-home")) as c:
        yield c


def rows_of(crv: Crv, cluster: str) -> dict[str, int]:
    """Rows of the cluster in every table of crv's state database that has a cluster column."""
    db = sqlite3.connect(crv.home / "service" / "state.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out = {}
        for table in tables:
            columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            if "cluster" in columns:
                (n,) = db.execute(
                    f"SELECT count(*) FROM {table} WHERE cluster = ?", (cluster,)
                ).fetchone()
                out[table] = n
            elif table == "clusters":
                (n,) = db.execute(
                    "SELECT count(*) FROM clusters WHERE name = ?", (cluster,)
                ).fetchone()
                out[table] = n
        return out
    finally:
        db.close()


def test_destroy_right_after_a_killed_deploy_leaves_nothing(crv: Crv, tmp_path: Path) -> None:
    app = write_appliance(tmp_path, "halfway", HALFWAY, ("svc.sh", "top.sh"))
    (app / "svc.sh").write_text(SVC)
    pool = crv.home / "pools" / "local"
    deploy = crv.popen("deploy", str(app))
    try:
        deadline = time.monotonic() + 120
        while not all((pool / f"halfway-w-{i}" / "node.crt").exists() for i in range(3)):
            assert time.monotonic() < deadline and deploy.poll() is None
            time.sleep(0.2)
        time.sleep(2)  # w-0 and w-1 have published by now; w-2 sleeps in its recipe
    finally:
        deploy.send_signal(signal.SIGKILL)
        deploy.wait()
    before = rows_of(crv, "halfway")
    assert before["attributes"] >= 2 and before["nodes"] == 4, before  # halfway indeed
    serials = {
        x509.load_pem_x509_certificate(p.read_bytes()).serial_number
        for p in pool.glob("halfway-*/node.crt")
    }
    assert len(serials) >= 3
    status = json.loads(crv("status", "halfway", "--json").stdout)
    assert not status["ready"]

    # no run again first: straight to destroy (it waits for the killed run's change slot)
    d = crv("destroy", "halfway", timeout=300)
    assert d.returncode == 0, d.stderr
    assert "4 nodes removed" in d.stdout, d.stdout
    assert crv.node_processes() == []
    assert not list(pool.glob("halfway-*"))
    assert serials <= crv.revoked_serials()
    # what is left of it: its certificates, each revoked (what the CRL is made from), and its
    # nodes' usage for the node-hours budget (kept 35 days), every row closed
    left = rows_of(crv, "halfway")
    assert {t for t, n in left.items() if n} == {"certificates", "node_usage"}, left
    with sqlite3.connect(crv.home / "service" / "state.db") as db:
        (open_rows,) = db.execute(
            "SELECT count(*) FROM node_usage WHERE cluster = 'halfway' AND ended IS NULL"
        ).fetchone()
    assert open_rows == 0
    db = sqlite3.connect(crv.home / "service" / "state.db")
    try:
        live = db.execute(
            "SELECT count(*) FROM certificates WHERE cluster = ? AND revoked_at IS NULL",
            ("halfway",),
        ).fetchone()
    finally:
        db.close()
    assert live == (0,)
