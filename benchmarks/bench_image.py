"""The guest image build: seconds from an empty cache (cold) and from a warm one.

Cold: `lab.images.build` into a temporary CRV_HOME (mmdebstrap from the host's Debian mirror,
mke2fs -d, qcow2, kernel, PXE ramdisk, SHA-256s); warm: the same call again, answered from the
cache. Prints both, each step's time (the build's progress lines) and the files' sizes. Needs
root and mmdebstrap; says so and exits 0 when it cannot run.

    python -m benchmarks.bench_image [--package P]... [--keep]
    python -m benchmarks.bench_image --smoke   # the warm path only, from the tests' image cache
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import exit_on_sigterm
from crv.base.home import Home
from lab import images

CACHE = Path(os.environ.get("CRV_TEST_IMAGES", "/var/tmp/crv-test-images"))  # the vm tests'


def cannot() -> str:
    if os.geteuid() != 0:
        return "not root (mmdebstrap builds in root mode)"
    missing = [c for c in ("mmdebstrap", "mke2fs", "qemu-img", "cpio") if not shutil.which(c)]
    return f"missing {', '.join(missing)} (./dev test -m vm installs them)" if missing else ""


def timed(home: Home, packages: list[str], quiet: bool) -> tuple[float, images.ImageManifest]:
    started = time.monotonic()
    image = images.build(home, packages, progress=(lambda _l: None) if quiet else print)
    return time.monotonic() - started, image


def report(image: images.ImageManifest) -> None:
    for role, f in image.files.items():
        print(f"  {role:8} {f.path:16} {f.size / (1 << 20):7.1f} MiB")


def smoke(packages: list[str]) -> None:
    """The warm path on the tests' cache: a base image must be there already."""
    key = images.key_of([*images.BASE_PACKAGES, *packages], images.SUITE,
                        images.default_mirror(), True)  # fmt: skip
    if not (CACHE / key[:16] / "image.json").is_file():
        print(f"bench_image: skipped: no cached image {key[:16]} in {CACHE} "
              "(./dev test -m vm tests/test_image_build.py builds it)")  # fmt: skip
        return
    home = Home(Path(tempfile.mkdtemp(prefix="crv-bench-image-")))
    try:
        home.images_dir.symlink_to(CACHE)
        warm, image = timed(home, packages, quiet=True)
        print(f"image build, warm cache: {warm:.3f} s ({image.dir})")
    finally:
        shutil.rmtree(home.root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_image")
    parser.add_argument("--smoke", action="store_true", help="the warm path, from the cache")
    parser.add_argument("--package", action="append", default=[], help="one more package")
    parser.add_argument("--keep", action="store_true", help="keep the temporary CRV_HOME")
    args = parser.parse_args(argv)
    why = cannot()
    if why:
        print(f"bench_image: skipped: {why}")
        return
    if args.smoke:
        smoke(args.package)
        return
    home = Home(Path(tempfile.mkdtemp(prefix="crv-bench-image-")))
    try:
        cold, image = timed(home, args.package, quiet=False)
        warm, _ = timed(home, args.package, quiet=True)
        print(f"image build, empty cache: {cold:.1f} s ({len(image.packages)} packages)")
        print(f"image build, warm cache: {warm:.3f} s")
        report(image)
    finally:
        if args.keep:
            print(f"kept {home.root}")
        else:
            images.remove_tree(home.root)


if __name__ == "__main__":
    exit_on_sigterm()
    main(sys.argv[1:])
