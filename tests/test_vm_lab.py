"""Real guests: the web farm on qemu guests in the lab, through the CLI as a user runs it.

`crv image build` (cached across runs under CRV_TEST_IMAGES, default /var/tmp/crv-test-images),
`crv lab up`, deploy the web farm on 2 guests (the load balancer and one web server), check the
load balancer from the host, resize the web servers 1 -> 2 (3 guests) and back, destroy, `crv
lab down`, and nothing may be left: no domain, volume, namespace, route, veth or process.
Marked `vm`: `./dev test -m vm`; CI runs it when the machine can (.ci/run says when it skips).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CATALOG, REPO

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("mmdebstrap") is None or shutil.which("libvirtd") is None,
        reason="real guests need root, mmdebstrap and libvirtd (./dev test -m vm installs them)",
    ),
]
IMAGES = Path(os.environ.get("CRV_TEST_IMAGES", "/var/tmp/crv-test-images"))


class Crv:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "CRV_HOME": str(home), "PYTHONUNBUFFERED": "1"}

    def __call__(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "crv_cli", *args], capture_output=True,
                              text=True, cwd=REPO, env=self.env, timeout=timeout)  # fmt: skip

    def ok(self, *args: str, timeout: float = 900) -> str:
        r = self(*args, timeout=timeout)
        assert r.returncode == 0, f"crv {' '.join(args)}: {r.stdout}{r.stderr}{self.consoles()}"
        return r.stdout

    def consoles(self) -> str:
        """The tail of each guest's serial console, for a failure message."""
        out = []
        for log in sorted((self.home / "pools" / "lab" / "consoles").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-12:]
            out.append(f"\n--- {log.name}\n" + "\n".join(tail))
        return "".join(out)


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    home = tmp_path_factory.mktemp("vmhome")
    IMAGES.mkdir(parents=True, exist_ok=True)
    (home / "images").symlink_to(IMAGES)  # built once, warm for every later run
    c = Crv(home)
    try:
        yield c
    finally:
        c("lab", "down", timeout=300)
        c("down")


def answers(url: str, tries: int = 8) -> set[str]:
    seen = set()
    for _ in range(tries):
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            seen.add(r.read().decode().strip())
    return seen


def leftovers(crv: Crv, lab: dict[str, object]) -> list[str]:
    found = []
    if lab["netns"] in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout:  # fmt: skip
        found.append(f"namespace {lab['netns']}")
    if str(lab["subnet"]) in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout:
        found.append(f"route {lab['subnet']}")
    if f"{lab['veth']}" in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout:
        found.append(f"veth {lab['veth']}")
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(crv.home) in cmdline and any(
            name in cmdline for name in ("qemu-system", "libvirtd", "virtlogd", "dnsmasq")
        ):
            found.append(f"process {proc.name}: {cmdline[:100]}")
    if (crv.home / "lab").exists():
        found.append("the lab dir")
    return found


def test_webfarm_on_real_guests_deploys_resizes_destroys_and_leaves_nothing(crv: Crv) -> None:
    built = json.loads(crv.ok("image", "build", "--json", timeout=1800))
    lab = json.loads(crv.ok("lab", "up", "--image", built["dir"], "--json", timeout=300))
    assert lab["up"] and lab["pool"] == "lab"

    out = crv.ok("deploy", str(CATALOG / "webfarm"), "--pool", "lab", "--name", "vmfarm",
                 "--set", "workers=1")  # fmt: skip
    assert "cluster vmfarm is ready (2 nodes)" in out
    lb = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("lb on"))
    assert lb.startswith(f"http://{str(lab['subnet']).rsplit('.', 1)[0]}.")  # a lab address
    assert answers(lb) == {"hello from vmfarm-worker-0"}
    status = json.loads(crv.ok("status", "vmfarm", "--json"))
    assert all(n["address"] and n["pool"] == "lab" for n in status["nodes"]), status

    crv.ok("scale", "vmfarm", "worker", "2")
    assert answers(lb) == {"hello from vmfarm-worker-0", "hello from vmfarm-worker-1"}
    crv.ok("scale", "vmfarm", "worker", "1")
    # the shrink takes the idler worker (the web role publishes how busy it is): either may go,
    # and the load balancer answers from the one that stays, and only from it
    kept = [n["name"] for n in json.loads(crv.ok("status", "vmfarm", "--json"))["nodes"]
            if n["group"] == "worker"]  # fmt: skip
    assert len(kept) == 1 and kept[0] in ("vmfarm-worker-0", "vmfarm-worker-1"), kept
    assert answers(lb) == {f"hello from {kept[0]}"}

    crv.ok("destroy", "vmfarm")
    virsh = subprocess.run(["virsh", "-c", str(lab["uri"]), "list", "--all", "--name"],
                           capture_output=True, text=True)  # fmt: skip
    assert virsh.stdout.strip() == "", virsh.stdout
    volumes = list((Path(str(lab["dir"])) / "volumes").iterdir())
    assert volumes == [], volumes

    crv.ok("lab", "down")
    deadline = time.monotonic() + 10
    while leftovers(crv, lab) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(crv, lab) == []
    assert "lab:" not in (crv.home / "pools.yaml").read_text()
