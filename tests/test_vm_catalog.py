"""The catalog for real: ganglia and webshop (which includes mysql-ha) in real qemu guests in the
lab, through the CLI (slurm: tests/test_vm_slurm.py). Each verify is one a real daemon must pass:
gmetad reports every compute node, a row written on the MariaDB primary (over TLS, by
certificate) is read on the replica, HAProxy answers from the app servers.

Slow (TCG guests, 3 to 4 at a time): `./dev test -m vm tests/test_vm_catalog.py -n 0`, about
20 min.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import CATALOG
from tests.test_vm_lab import IMAGES, Crv, pytestmark  # noqa: F401  (vm marker, skip reason)

APPLIANCES = ("ganglia", "webshop")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    home = tmp_path_factory.mktemp("vmcatalog")
    IMAGES.mkdir(parents=True, exist_ok=True)
    (home / "images").symlink_to(IMAGES)
    crv = Crv(home)
    try:
        built = json.loads(crv.ok("image", "build", "--json",
                                  *[str(CATALOG / a) for a in APPLIANCES], timeout=1800))  # fmt: skip
        crv.ok("lab", "up", "--image", built["dir"], "--max-nodes", "4", timeout=300)
        yield crv
    finally:
        crv("lab", "down", timeout=300)
        crv("down")


def checks(crv: Crv, cluster: str) -> dict[tuple[str, str], str]:
    """What each on-node verify printed, by (node, role), from the service's database."""
    with sqlite3.connect(f"file:{crv.home / 'service' / 'state.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT node, role, check_output FROM role_states WHERE cluster = ? AND check_exit = 0",
            (cluster,),
        ).fetchall()
    return {(node, role): (output or "").strip() for node, role, output in rows}


def all_verified(crv: Crv, cluster: str) -> None:
    status = json.loads(crv.ok("status", cluster, "--json"))
    states = {(n["name"], r): s for n in status["nodes"] for r, s in n["roles"].items()}
    assert set(states.values()) == {"verified"}, states


def test_ganglia_gmetad_reports_every_compute_node(lab: Crv) -> None:
    lab.ok("deploy", str(CATALOG / "ganglia"), "--pool", "lab", "--name", "gg",
           "--set", "clients=2")  # fmt: skip
    all_verified(lab, "gg")
    seen = checks(lab, "gg")[("gg-server-0", "gmetad")]
    assert seen.startswith("gmetad reports 2 compute nodes"), seen
    lab.ok("destroy", "gg")


def test_webshop_replicates_over_tls_and_haproxy_answers(lab: Crv) -> None:
    out = lab.ok("deploy", str(CATALOG / "webshop"), "--pool", "lab", "--name", "ws",
                 "--set", "apps=1")  # fmt: skip
    all_verified(lab, "ws")
    seen = checks(lab, "ws")[("ws-db-replica-0", "db-replica")]
    assert "is read on this replica" in seen, seen
    front = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("haproxy"))
    with urllib.request.urlopen(front + "/", timeout=20) as r:
        assert r.status == 200
    lab.ok("destroy", "ws")
