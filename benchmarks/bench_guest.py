"""Real guests: one guest from create to verified (the image build: bench_image).

In a temporary CRV_HOME, with the image of the vm tests' cache (built if missing): `crv lab up`
and `crv deploy benchmarks/appliances/one-web --pool lab` (one TCG guest, one web server). From
the guest's serial console (the lab keeps it) and the clock:

- create -> cloud-init done: from the guest's start (its console log appears when qemu starts,
  inside the pool's create_node) to the line cloud-init prints when it has finished;
- the guest's own boot -> cloud-init done: the `Up N seconds` of that same line;
- create -> verified: from the guest's start to the deploy's end (the web role verified from
  the host over the lab network).

Target: verified within 1.2x of the guest's own boot-to-cloud-init time (crv adds little to a
boot). Needs root, mmdebstrap and libvirtd; says so and exits 0 when it cannot run.

    python -m benchmarks.bench_guest [--keep]
    python -m benchmarks.bench_guest --smoke   # plans the appliance; boots nothing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import exit_on_sigterm

REPO = Path(__file__).resolve().parent.parent
APPLIANCE = REPO / "benchmarks" / "appliances" / "one-web"
CACHE = Path(os.environ.get("CRV_TEST_IMAGES", "/var/tmp/crv-test-images"))  # the vm tests'
FINISHED = re.compile(r"Cloud-init v\. \S+ finished at .*Up ([0-9.]+) seconds")
TARGET = 1.2


def crv(home: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRV_HOME": str(home)}
    env.pop("CRV_POOLS_FILE", None)
    r = subprocess.run([sys.executable, "-m", "crv_cli", *args], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=timeout)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"crv {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r


def cannot() -> str:
    if os.geteuid() != 0:
        return "not root (the lab needs network namespaces and libvirtd)"
    missing = [c for c in ("mmdebstrap", "libvirtd", "qemu-system-x86_64") if not shutil.which(c)]
    return f"missing {', '.join(missing)} (./dev vm-check installs them)" if missing else ""


class Console:
    """Watches a guest's console log: when it appeared, and when cloud-init said it finished."""

    def __init__(self, path: Path) -> None:
        self.path, self.appeared, self.finished, self.up = path, 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if not self.appeared and self.path.exists():
                self.appeared = time.monotonic()
            if self.appeared and not self.finished:
                found = FINISHED.search(self.path.read_text(errors="replace"))
                if found:
                    self.finished, self.up = time.monotonic(), float(found.group(1))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def one_guest(home: Path, image_dir: str) -> dict[str, float]:
    crv(home, "lab", "up", "--image", image_dir, timeout=300)
    crv(home, "up", timeout=300)  # the daemons first: their start is not the guest's time
    console = Console(home / "pools" / "lab" / "consoles" / "g-web-0.log")
    try:
        crv(home, "deploy", str(APPLIANCE), "--pool", "lab", "--name", "g")
        verified = time.monotonic()
    finally:
        console.stop()
    if not (console.appeared and console.finished):
        raise SystemExit("the guest's console never showed cloud-init finishing")
    crv(home, "destroy", "g")
    return {
        "create_to_cloudinit": console.finished - console.appeared,
        "guest_boot_to_cloudinit": console.up,
        "create_to_verified": verified - console.appeared,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_guest")
    parser.add_argument("--smoke", action="store_true", help="plan the appliance, boot nothing")
    parser.add_argument("--keep", action="store_true", help="keep the temporary CRV_HOME")
    args = parser.parse_args(argv)
    why = cannot()
    if why:
        print(f"bench_guest: skipped: {why}")
        return
    home = Path(tempfile.mkdtemp(prefix="crv-bench-guest-"))
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        (home / "images").symlink_to(CACHE)  # the vm tests' images: usually warm
        if args.smoke:  # a real guest takes minutes: the smoke checks what it would deploy
            crv(home, "plan", str(APPLIANCE))
            print("bench_guest: smoke: one-web plans; a real guest is booted only in a full run")
            return
        image_dir = str(json.loads(crv(home, "image", "build", "--json").stdout)["dir"])
        t = one_guest(home, image_dir)
        ratio = t["create_to_verified"] / t["guest_boot_to_cloudinit"]
        print(f"create -> cloud-init done: {t['create_to_cloudinit']:.1f} s")
        print(f"guest boot -> cloud-init done (its own Up N): {t['guest_boot_to_cloudinit']:.1f} s")
        print(f"create -> role verified: {t['create_to_verified']:.1f} s")
        print(f"verified / guest boot: {ratio:.2f}x (target <= {TARGET}x): "
              f"{'met' if ratio <= TARGET else 'NOT met'}")  # fmt: skip
    finally:
        env = {**os.environ, "CRV_HOME": str(home)}
        for command in (("lab", "down"), ("down",)):
            argv = [sys.executable, "-m", "crv_cli", *command]
            subprocess.run(argv, cwd=REPO, env=env, capture_output=True)
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
