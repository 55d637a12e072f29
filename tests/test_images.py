"""Images without building one: the cache key, package names, the cache's rules, the one-line
build errors (lab/images.py), and manifests as pools read them (pools/images.py). The real
build is in tests/test_vm_lab.py (marked vm)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crv.appliance.loader import load_appliance
from crv.base.home import Home
from lab import images
from pools import images as manifests
from tests.conftest import CATALOG, REPO


def test_the_key_depends_on_what_goes_in_and_not_on_order() -> None:
    a = images.key_of(["python3", "haproxy"], "bookworm", "http://m/debian", True)
    assert a == images.key_of(
        ["haproxy", "python3", "haproxy"], "bookworm", "http://m/debian", True
    )
    assert a != images.key_of(["python3"], "bookworm", "http://m/debian", True)
    assert a != images.key_of(["python3", "haproxy"], "trixie", "http://m/debian", True)
    assert a != images.key_of(["python3", "haproxy"], "bookworm", "http://other/debian", True)
    assert a != images.key_of(["python3", "haproxy"], "bookworm", "http://m/debian", False)


def test_packages_are_the_union_of_the_appliances_and_includes() -> None:
    webshop = load_appliance(CATALOG / "webshop")  # includes mysql-ha
    assert {"haproxy", "mariadb-server"} <= set(webshop.packages)
    wanted = images.packages_of([webshop, load_appliance(CATALOG / "webfarm")], ["munge"])
    assert wanted == sorted(set(webshop.packages) | {"munge"})
    with pytest.raises(images.ImageBuildError, match="'Bad_Name' is not a Debian package name"):
        images.packages_of([], ["Bad_Name"])


def test_a_bad_package_name_in_an_appliance_names_the_file_and_field(tmp_path: Path) -> None:
    shutil.copytree(CATALOG / "webfarm", tmp_path / "webfarm")
    doc = tmp_path / "webfarm" / "appliance.yaml"
    doc.write_text(doc.read_text() + "image: {packages: [ok-pkg, 'rm -rf /']}\n")
    r = subprocess.run([sys.executable, "-m", "crv_cli", "image", "build", str(tmp_path / "webfarm")],
                       capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "CRV_HOME": str(tmp_path / "home")})  # fmt: skip
    assert r.returncode == 2
    assert "appliance.yaml" in r.stderr and "image.packages" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "home" / "images").exists()


def test_the_mirror_is_the_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert images.default_mirror().startswith("http")


def fake_image(root: Path, key: str = "k" * 64) -> Path:
    root.mkdir(parents=True)
    (root / "disk.qcow2").write_bytes(b"disk")
    digest = hashlib.sha256(b"disk").hexdigest()
    (root / "image.json").write_text(json.dumps({"format": 1, "key": key, "files": {
        "disk": {"path": "disk.qcow2", "sha256": digest, "size": 4, "format": "qcow2"}}}))  # fmt: skip
    return root


def test_a_cached_image_is_returned_without_building(tmp_path: Path) -> None:
    home = Home(tmp_path)
    key = images.key_of(sorted(images.BASE_PACKAGES), "bookworm", "http://m/debian", False)
    fake_image(images.images_dir(home) / key[:16], key)
    stale = images.images_dir(home) / f".{key[:16]}-killedbuild"
    stale.mkdir()
    lines: list[str] = []
    got = images.build(home, [], mirror="http://m/debian", ramdisk=False, progress=lines.append)
    assert got.key == key and lines == [f"cached: {images.images_dir(home) / key[:16]}"]
    assert not stale.exists()  # a killed build's leftovers go; they are never an image


def test_the_cache_lists_only_whole_images(tmp_path: Path) -> None:
    home = Home(tmp_path)
    fake_image(images.images_dir(home) / "aaaa")
    (images.images_dir(home) / ".bbbb-half").mkdir()
    (images.images_dir(home) / "cccc").mkdir()  # no manifest
    assert [m.dir.name for m in images.cached(home)] == ["aaaa"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("E: Unable to locate package gmetadd\n", "mmdebstrap: package gmetadd: Unable to locate"),
        ("E: Package 'foo' has no installation candidate\n", "package foo:"),
        ("something broke\nlast words\n", "mmdebstrap failed (exit 3): last words"),
    ],
)
def test_a_failed_step_is_one_line_naming_it(tmp_path: Path, output: str, expected: str) -> None:
    script = tmp_path / "fake"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(images.ImageBuildError) as err:
        images._step("mmdebstrap", [str(script)], tmp_path / "build.log")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_missing_tool_is_named(tmp_path: Path) -> None:
    with pytest.raises(images.ImageBuildError, match="mke2fs: no-such-tool-x is not installed"):
        images._step("mke2fs", ["no-such-tool-x"], tmp_path / "build.log")


# -- manifests as pools read them ------------------------------------------------------------


def test_a_manifest_error_names_the_file_and_field(tmp_path: Path) -> None:
    root = fake_image(tmp_path / "img")
    data = json.loads((root / "image.json").read_text())
    data["files"]["disk"]["sha256"] = "nothex"
    (root / "image.json").write_text(json.dumps(data))
    with pytest.raises(manifests.ImageError, match=r"image\.json: files\.disk\.sha256"):
        manifests.load(root)
    (root / "image.json").write_text("{")
    with pytest.raises(manifests.ImageError, match="not JSON"):
        manifests.load(root / "image.json")
    with pytest.raises(manifests.ImageError, match="No such file"):
        manifests.load(tmp_path / "nowhere" / "image.json")


def test_verify_hashes_once_per_file_version(tmp_path: Path) -> None:
    root = fake_image(tmp_path / "img")
    manifest = manifests.load(root)
    disk, digest = manifest.path("disk"), manifest.files["disk"].sha256
    manifests.verify(disk, digest)
    manifests.verify(disk, digest)
    disk.write_bytes(b"DISK")  # same size, new content (and mtime): hashed again, refused
    os.utime(disk, ns=(1, 1))
    with pytest.raises(manifests.ImageError, match="SHA-256"):
        manifests.verify(disk, digest)
    with pytest.raises(manifests.ImageError, match="files.kernel: the image has none"):
        manifest.path("kernel")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) missing")
def test_backing_file_is_read_with_the_format_forced(tmp_path: Path) -> None:
    plain, chained = tmp_path / "plain.qcow2", tmp_path / "chained.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(plain), "-F", "qcow2",
                    str(chained)], check=True)  # fmt: skip
    assert manifests.backing_file(plain) is None
    assert manifests.backing_file(chained) == str(plain)
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4096)  # a raw file is not a qcow2, whatever qemu-img would guess
    with pytest.raises(manifests.ImageError, match="not a usable disk image"):
        manifests.backing_file(raw)
