"""Images without building one: the cache key, package names, the cache's rules, the one-line
build errors (lab/images.py), and manifests as pools read them (pools/images.py). Real builds
and boots are in tests/test_image_build.py (marked vm)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from crv.appliance.loader import load_appliance
from crv.base.home import Home
from lab import images
from pools import images as manifests
from tests.conftest import CATALOG, REPO, crv


def test_the_key_depends_on_what_goes_in_and_not_on_order() -> None:
    a = images.key_of(["python3", "haproxy"], "bookworm", "http://m/debian", True)
    assert a == images.key_of(
        ["haproxy", "python3", "haproxy"], "bookworm", "http://m/debian", True
    )
    assert a != images.key_of(["python3"], "bookworm", "http://m/debian", True)
    assert a != images.key_of(["python3", "haproxy"], "trixie", "http://m/debian", True)
    assert a != images.key_of(["python3", "haproxy"], "bookworm", "http://other/debian", True)
    assert a != images.key_of(["python3", "haproxy"], "bookworm", "http://m/debian", False)
    assert a == images.key_of(["python3", "haproxy"], "bookworm", "http://m/debian/", True)


def test_the_ramdisks_key_follows_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_ramdisk = images.key_of(["python3"], "bookworm", "http://m/debian", True)
    without = images.key_of(["python3"], "bookworm", "http://m/debian", False)
    agent = tmp_path / "crv_agent.py"
    agent.write_text("# another agent\n")
    monkeypatch.setattr(images, "AGENT", agent)
    assert images.key_of(["python3"], "bookworm", "http://m/debian", True) != with_ramdisk
    assert images.key_of(["python3"], "bookworm", "http://m/debian", False) == without


def test_packages_are_the_union_of_the_appliances_and_includes() -> None:
    webshop = load_appliance(CATALOG / "webshop")  # includes mysql-ha
    assert {"haproxy", "mariadb-server"} <= set(webshop.packages)
    wanted = images.packages_of([webshop, load_appliance(CATALOG / "webfarm")], ["munge"])
    assert wanted == sorted(set(webshop.packages) | {"munge"})
    with pytest.raises(images.ImageBuildError, match="'Bad_Name' is not a Debian package name"):
        images.packages_of([], ["Bad_Name"])


def test_a_bad_package_name_in_an_appliance_names_the_file_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(CATALOG / "webfarm", tmp_path / "webfarm")
    doc = tmp_path / "webfarm" / "appliance.yaml"
    doc.write_text(doc.read_text() + "image: {packages: [ok-pkg, 'rm -rf /']}\n")
    monkeypatch.setenv("CRV_HOME", str(tmp_path / "home"))
    r = crv("image", "build", str(tmp_path / "webfarm"))
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    assert "appliance.yaml" in r.stderr and "image.packages" in r.stderr
    assert not (tmp_path / "home" / "images").exists()


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
    assert images.images_dir(home) == home.images_dir == tmp_path / "images"
    key = images.key_of(sorted(images.BASE_PACKAGES), "bookworm", "http://m/debian", False)
    fake_image(home.images_dir / key[:16], key)
    lines: list[str] = []
    started = time.monotonic()
    got = images.build(home, [], mirror="http://m/debian/", ramdisk=False, progress=lines.append)
    assert time.monotonic() - started < 0.5
    assert got.key == key and lines == [f"cached: {home.images_dir / key[:16]}"]


def test_a_build_removes_a_killed_builds_leftovers_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Home(tmp_path)
    key = images.key_of(sorted(images.BASE_PACKAGES), "bookworm", "http://m/debian", False)
    stale = home.images_dir / f".{key[:16]}-killedbuild"
    (stale / "tree" / "etc").mkdir(parents=True)

    def fake_build(work: Path, *_args: object) -> None:
        fake_image(work / "made", key)
        for name in ("disk.qcow2", "image.json"):
            (work / "made" / name).rename(work / name)
        (work / "made").rmdir()

    monkeypatch.setattr(images, "_build_into", fake_build)
    got = images.build(home, [], mirror="http://m/debian", ramdisk=False)
    assert not stale.exists() and got.dir == home.images_dir / key[:16]
    assert sorted(p.name for p in got.dir.iterdir()) == ["disk.qcow2", "image.json"]


@pytest.mark.parametrize("error", [images.ImageBuildError("mke2fs failed (exit 1): no space"),
                                   KeyboardInterrupt()])  # fmt: skip
def test_a_failed_build_leaves_no_image_only_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    home = Home(tmp_path)

    def failing(work: Path, *_args: object) -> None:
        (work / "build.log").write_text("what the steps said\n")
        (work / "disk.qcow2").write_bytes(b"half")
        raise error

    monkeypatch.setattr(images, "_build_into", failing)
    with pytest.raises(type(error)) as raised:
        images.build(home, ["haproxy"], mirror="http://m/debian", ramdisk=False)
    key = images.key_of([*images.BASE_PACKAGES, "haproxy"], "bookworm", "http://m/debian", False)
    left = sorted(p.name for p in home.images_dir.iterdir())
    assert left == [f".{key[:16]}.lock", f"{key[:16]}-failed.log"]
    assert images.cached(home) == []
    if isinstance(error, images.ImageBuildError):
        assert str(raised.value) == f"{error} (log: {home.images_dir / key[:16]}-failed.log)"


def test_a_bad_package_name_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    with pytest.raises(images.ImageBuildError, match="'Haproxy' is not a Debian package name"):
        images.build(Home(tmp_path), ["Haproxy"], mirror="http://m/debian")
    assert not (tmp_path / "images").exists()


def test_the_cache_lists_only_whole_images(tmp_path: Path) -> None:
    home = Home(tmp_path)
    fake_image(images.images_dir(home) / "aaaa")
    (images.images_dir(home) / ".bbbb-half").mkdir()
    (images.images_dir(home) / "cccc").mkdir()  # no manifest
    assert [m.dir.name for m in images.cached(home)] == ["aaaa"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("E: Unable to locate package gmetadd\n", "mmdebstrap: package gmetadd: not at the mirror"),
        ("E: Package 'foo' has no installation candidate\n",
         "mmdebstrap: package foo: no installation candidate at the mirror"),
        (" slurmd : Depends: libfoo1 (>= 2) but it is not installable\n",
         "mmdebstrap: package slurmd: unmet dependency libfoo1 (>= 2)"),
        ("dpkg: error processing package mariadb-server (--configure):\n",
         "mmdebstrap: package mariadb-server: its installation script failed"),
        ("E: Failed to fetch http://m/debian/dists/bookworm/InRelease  Could not resolve host m\n",
         "mmdebstrap: cannot fetch http://m/debian/dists/bookworm/InRelease: Could not resolve host m"),
        ("something broke\nlast words\n", "mmdebstrap failed (exit 3): last words"),
    ],
)  # fmt: skip
def test_a_failed_step_is_one_line_naming_it(tmp_path: Path, output: str, expected: str) -> None:
    script = tmp_path / "fake"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit 3\n")
    script.chmod(0o755)
    log = tmp_path / "build.log"
    log.write_text("\n$ an earlier step\nE: Unable to locate package earlier\n")  # not this step's
    with pytest.raises(images.ImageBuildError) as err:
        images._step("mmdebstrap", [str(script)], log)
    assert str(err.value) == expected


def test_mmdebstraps_phases_are_the_progress_and_its_output_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "mmdebstrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'I: chroot architecture amd64 is equal'\n"
                    "echo 'I: downloading packages with apt...'\necho 'Get:1 http://m foo'\n"
                    "echo 'I: main() received signal PIPE: waiting for setup...'\n"
                    "echo 'I: installing remaining packages inside the chroot...'\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    lines: list[str] = []
    images._mmdebstrap(tmp_path / "tree", ["python3"], "bookworm", "http://m", tmp_path / "log",
                       lines.append)  # fmt: skip
    assert lines == ["mmdebstrap: downloading packages with apt...",
                     "mmdebstrap: installing remaining packages inside the chroot..."]  # fmt: skip
    log = (tmp_path / "log").read_text()
    assert "Get:1 http://m foo" in log and "--dpkgopt=path-exclude=/usr/share/doc/*" in log


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
    with pytest.raises(manifests.ImageError, match=r"files\.kernel: the image has none"):
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


def test_a_bad_mirror_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    with pytest.raises(images.ImageBuildError, match="--mirror: 'ftp://m' is not an http"):
        images.build(Home(tmp_path), [], mirror="ftp://m")
    assert not (tmp_path / "images").exists()


def test_the_tree_loses_what_a_guest_must_not_inherit(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in (
        "etc/ssh",
        "var/lib/dhcp",
        "var/lib/dbus",
        "var/lib/apt/lists",
        "var/cache/apt",
        "etc/systemd/system/timers.target.wants",
        "etc/systemd/system/multi-user.target.wants",
        "etc/munge",
        "var/lib/dpkg/info",
    ):
        (tree / d).mkdir(parents=True)
    files = {"etc/machine-id": "0123\n", "var/lib/dbus/machine-id": "0123\n",
             "etc/hostname": "buildhost\n", "etc/resolv.conf": "nameserver 10.255.255.53\n",
             "etc/ssh/ssh_host_ed25519_key": "secret", "etc/ssh/sshd_config": "# kept\n",
             "var/lib/dhcp/dhclient.eth0.leases": "lease {}", "var/lib/apt/lists/m_Packages": "x",
             "var/cache/apt/pkgcache.bin": "x",
             "etc/systemd/system/timers.target.wants/apt-daily.timer": "",
             "etc/systemd/system/timers.target.wants/e2scrub_all.timer": "",
             "etc/shadow": "root:$6$salt$hash:20000:0:99999:7:::\nnobody:*:20000::::::\n",
             "etc/munge/munge.key": "secret",
             "etc/systemd/system/multi-user.target.wants/mariadb.service": "",
             "etc/systemd/system/multi-user.target.wants/networking.service": "",
             "etc/systemd/system/multi-user.target.wants/qemu-guest-agent.service": "",
             "var/lib/dpkg/status": "Package: mariadb-server\nPriority: optional\n\n"
                                    "Package: ifupdown\nPriority: important\n\n"
                                    "Package: qemu-guest-agent\nPriority: optional\n",
             "var/lib/dpkg/info/mariadb-server.list": "/lib/systemd/system/mariadb.service\n",
             "var/lib/dpkg/info/ifupdown.list": "/lib/systemd/system/networking.service\n",
             "var/lib/dpkg/info/qemu-guest-agent.list":
                 "/lib/systemd/system/qemu-guest-agent.service\n"}  # fmt: skip
    for name, text in files.items():
        (tree / name).write_text(text)
    images._prepare(tree)
    assert (tree / "etc/machine-id").read_text() == ""
    assert not (tree / "var/lib/dbus/machine-id").exists()
    assert (tree / "etc/hostname").read_text() == "localhost\n"
    assert (tree / "etc/resolv.conf").read_text() == ""
    assert sorted(p.name for p in (tree / "etc/ssh").iterdir()) == ["sshd_config"]
    assert not (tree / "etc/munge/munge.key").exists()
    wanted = tree / "etc/systemd/system/multi-user.target.wants"
    # an appliance package's daemon waits for its recipe; the base's and important ones start
    assert sorted(p.name for p in wanted.iterdir()) == ["networking.service",
                                                        "qemu-guest-agent.service"]  # fmt: skip
    assert list((tree / "var/lib/dhcp").iterdir()) == []
    assert [p.name for p in (tree / "var/lib/apt/lists").iterdir()] == ["partial"]
    assert list((tree / "var/cache/apt").iterdir()) == []
    timers = [p.name for p in (tree / "etc/systemd/system/timers.target.wants").iterdir()]
    assert timers == ["e2scrub_all.timer"]
    assert (tree / "etc/shadow").read_text().splitlines() == [
        "root:*:20000:0:99999:7:::", "nobody:*:20000::::::"]  # fmt: skip
    agent = tree / "usr/local/bin/crv-agent"
    assert agent.read_bytes() == (REPO / "agent" / "crv_agent.py").read_bytes()
    assert os.access(agent, os.X_OK)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_removing_a_killed_build_never_goes_into_a_mount(tmp_path: Path) -> None:
    work = tmp_path / ".key-killed"
    (work / "tree" / "sys").mkdir(parents=True)
    (work / "tree" / "etc").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(work / "tree" / "sys")], check=True)
    try:
        inside = work / "tree" / "sys" / "what-the-host-has"
        inside.write_text("must not be deleted through the mount")
        assert images._mounts_under(work) == [str(work / "tree" / "sys")]
        images.remove_tree(work)  # detaches the mount, then removes
        assert not work.exists() and images._mounts_under(tmp_path) == []
    finally:
        subprocess.run(["umount", "-l", str(work / "tree" / "sys")], capture_output=True)


def test_the_cli_says_one_line_for_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRV_HOME", str(tmp_path / "home"))
    r = crv("image", "build", str(tmp_path / "nowhere"))
    assert (
        r.exit_code == 2 and r.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such directory"
    )
    r = crv("image", "build", "--package", "ok", "--package", "Not_ok")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --package: 'Not_ok' is not a Debian package name"
    r = crv("image", "build", "--mirror", "ftp://m")
    assert r.exit_code == 2 and "--mirror" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "home" / "images").exists()


def test_the_cli_lists_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRV_HOME", str(tmp_path))
    home = Home(tmp_path)
    root = fake_image(home.images_dir / "aaaa", "a" * 64)
    data = json.loads((root / "image.json").read_text())
    data.update(packages=[*images.BASE_PACKAGES, "haproxy"], built_at="2026-12-04T07:00:00+00:00")
    (root / "image.json").write_text(json.dumps(data))
    r = crv("image", "list")
    assert r.exit_code == 0
    assert r.stdout.split()[:5] == ["aaaaaaaaaaaaaaaa", "0", "MiB", "2026-12-04T07:00:00+00:00",
                                    "haproxy"]  # fmt: skip
    listed = json.loads(crv("image", "list", "--json").stdout)
    assert listed[0]["built_at"] == "2026-12-04T07:00:00+00:00" and listed[0]["size"] == 4


# -- pools/images.py: the files a pool boots -------------------------------------------------


def test_verify_refuses_a_wrong_checksum_and_a_missing_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"disk")
    with pytest.raises(
        manifests.ImageError, match=r"disk\.qcow2: SHA-256 .* is not the manifest's"
    ):
        manifests.verify(disk, "0" * 64)
    with pytest.raises(manifests.ImageError, match=r"gone\.qcow2: No such file"):
        manifests.verify(tmp_path / "gone.qcow2", "0" * 64)
    with pytest.raises(manifests.ImageError, match=r"gone\.qcow2: not a usable disk image"):
        manifests.backing_file(tmp_path / "gone.qcow2")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) missing")
def test_a_corrupt_qcow2_is_one_line(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.qcow2", tmp_path / "bad.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(good), "1M"], check=True)
    data = bytearray(good.read_bytes())
    data[8:40] = b"\xff" * 32  # version, backing file offset and size, cluster bits: nonsense
    bad.write_bytes(bytes(data))
    with pytest.raises(manifests.ImageError) as err:
        manifests.backing_file(bad)
    assert str(err.value).startswith(f"{bad}: not a usable disk image: ")
    assert "\n" not in str(err.value)
