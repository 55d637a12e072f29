"""crv's shell helpers for recipes (crv/appliance/lib/crv.sh): every bundle carries them at
lib/crv.sh, out of any appliance's reach, and they behave as the catalog's recipes expect when
run for real by /bin/sh."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from crv.appliance import bundle
from crv.appliance.loader import load_appliance
from tests.conftest import CATALOG, REPO

HELPERS = REPO / "crv" / "appliance" / "lib" / "crv.sh"


def _load_agent():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("crv_agent", REPO / "agent" / "crv_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crv_agent", module)
    spec.loader.exec_module(module)
    return module


agent = _load_agent()


def members(data: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        out: dict[str, bytes | None] = {}
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            out[m.name] = f.read() if f is not None else None
        return out


# --- the bundle carries the helpers -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.parent.name for p in CATALOG.glob("*/appliance.yaml")))
def test_every_catalog_bundle_carries_the_helpers_next_to_the_appliances(
    name: str, tmp_path: Path
) -> None:
    built = bundle.build(load_appliance(CATALOG / name))
    files = members(built.data)
    assert files["lib/crv.sh"] == HELPERS.read_bytes()
    assert [n for n in files if n.endswith("crv.sh")] == ["lib/crv.sh"]
    # unpacked as the agent does, each role's "$CRV_APPLIANCE_DIR/../lib/crv.sh" is the helper
    agent.extract_bundle(built.data, tmp_path / "appliance")
    for role in built.roles.values():
        appdir = tmp_path / "appliance" / str(role["appdir"])
        assert (appdir / str(role["recipe"]).split("/", 1)[1]).is_file()
        assert (appdir / ".." / "lib" / "crv.sh").read_bytes() == HELPERS.read_bytes()


def test_the_bundle_stays_reproducible_with_the_helpers() -> None:
    a = load_appliance(CATALOG / "webfarm")
    assert bundle.build(a).data == bundle.build(a).data


def _hostile(tmp_path: Path) -> Path:
    app = tmp_path / "evil"
    (app / "roles").mkdir(parents=True)
    (app / "appliance.yaml").write_text(
        "apiVersion: crv/v1\nname: evil\nnodes:\n  n: {count: 1, roles: [r]}\n"
        "roles:\n  r: {recipe: roles/r.sh}\n"
    )
    (app / "roles" / "r.sh").write_text("#!/bin/sh\n")
    (app / "roles" / "r.sh").chmod(0o755)
    # its own lib/crv.sh, a ../lib path through a link, a link to the helpers' directory
    (app / "lib").mkdir()
    (app / "lib" / "crv.sh").write_text("need() { echo owned; }\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "crv.sh").write_text("need() { echo owned; }\n")
    (app / "up").symlink_to(outside)
    return app


def test_an_appliance_cannot_replace_or_shadow_the_shipped_helpers(tmp_path: Path) -> None:
    built = bundle.build(load_appliance(_hostile(tmp_path)))
    files = members(built.data)
    assert files["lib/crv.sh"] == HELPERS.read_bytes()
    # the appliance's own file is its own business, under a0/; the link out is not shipped
    assert files["a0/lib/crv.sh"] == b"need() { echo owned; }\n"
    assert not any(n.startswith("a0/up") for n in files)
    assert sum(n.endswith("/crv.sh") for n in files) == 2
    # the agent unpacks it (it refuses a name twice), and the role's ../lib/crv.sh is crv's
    agent.extract_bundle(built.data, tmp_path / "node")
    appdir = tmp_path / "node" / str(built.roles["r"]["appdir"])
    assert (appdir / ".." / "lib" / "crv.sh").read_bytes() == HELPERS.read_bytes()


def test_an_agent_refuses_a_bundle_that_names_the_helpers_twice(tmp_path: Path) -> None:
    """What a forged bundle with a second lib/crv.sh would meet: never an overwrite."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for data in (HELPERS.read_bytes(), b"need() { :; }\n"):
            info = tarfile.TarInfo("lib/crv.sh")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(agent.BundleError):
        agent.extract_bundle(buf.getvalue(), tmp_path / "node")


# --- the catalog uses the one copy ------------------------------------------------------------

SHELL_FILES = sorted(CATALOG.glob("*/roles/**/*.sh"))
SOURCE_LINE = '. "$CRV_APPLIANCE_DIR/../lib/crv.sh"'


@pytest.mark.parametrize(
    "script", SHELL_FILES, ids=[str(p.relative_to(CATALOG)) for p in SHELL_FILES]
)
def test_catalog_files_use_the_shared_helpers_instead_of_copies(script: Path) -> None:
    text = script.read_text()
    assert not re.search(r"^\s*(need|swap|wait_for_port)\s*\(\)", text, re.M), "a copy"
    assert "import socket, sys, time" not in text, "a port wait of its own"
    if script.parent.name == "roles" and re.search(
        r"\b(need|swap|wait_for_port|wait_port)\b", text
    ):
        assert SOURCE_LINE in text


# --- the helpers, run for real --------------------------------------------------------------


def sh(script: str, tmp_path: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path or os.environ["PATH"], "LC_ALL": "C"}
    return subprocess.run(
        ["sh", "-c", f'set -eu\n. "{HELPERS}"\n{script}'],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def fake_apt(tmp_path: Path, installed: set[str], apt_fails: bool = False) -> str:
    """dpkg-query answering from `installed`, apt-get logging its arguments to apt.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cases = " ".join(sorted(installed)) or "-none-"
    (bin_dir / "dpkg-query").write_text(
        "#!/bin/sh\nfor p in " + cases + '; do [ "$p" = "$3" ] && '
        "{ echo 'install ok installed'; exit 0; }; done\n"
        'echo "dpkg-query: no packages found matching $3" >&2; exit 1\n'
    )
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "$*" >>"{tmp_path}/apt.log"\n'
        + (
            'if [ "$1" = install ]; then echo "E: Unable to locate package" >&2; exit 100; fi\n'
            if apt_fails
            else ""
        )
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def test_need_installs_only_what_is_missing(tmp_path: Path) -> None:
    path = fake_apt(tmp_path, {"python3", "curl"})
    assert sh("need python3 curl", tmp_path, path).returncode == 0
    assert not (tmp_path / "apt.log").exists()  # nothing missing: apt is not touched
    done = sh("need python3 haproxy curl rrdtool", tmp_path, path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "apt.log").read_text() == (
        "update -q\ninstall -y -q --no-install-recommends haproxy rrdtool\n"
    )


def test_need_fails_the_recipe_with_apts_message_when_a_package_cannot_be_installed(
    tmp_path: Path,
) -> None:
    path = fake_apt(tmp_path, set(), apt_fails=True)
    done = sh("need no-such-package\necho after", tmp_path, path)
    assert done.returncode == 100
    assert "E: Unable to locate package" in done.stderr
    assert "after" not in done.stdout


def test_swap_replaces_only_on_change_and_by_rename(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("one\n")
    inode = (tmp_path / "f").stat().st_ino
    (tmp_path / "f.new").write_text("one\n")
    done = sh("if swap f.new f; then echo changed; else echo same; fi", tmp_path)
    assert done.stdout == "same\n"
    assert not (tmp_path / "f.new").exists() and (tmp_path / "f").stat().st_ino == inode
    (tmp_path / "f.new").write_text("two\n")
    new_inode = (tmp_path / "f.new").stat().st_ino
    done = sh("if swap f.new f; then echo changed; else echo same; fi", tmp_path)
    assert done.stdout == "changed\n"
    # the new file itself was renamed over the old one (atomic): its inode, not a copy
    assert (tmp_path / "f").read_text() == "two\n"
    assert (tmp_path / "f").stat().st_ino == new_inode
    assert not (tmp_path / "f.new").exists()


def test_swap_stops_the_recipe_when_the_move_fails(tmp_path: Path) -> None:
    (tmp_path / "f.new").write_text("x\n")
    done = sh("swap f.new missing-dir/f\necho after", tmp_path)
    assert done.returncode == 1 and "after" not in done.stdout


def test_wait_for_port_succeeds_against_a_listening_socket(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = sh(f"wait_for_port 127.0.0.1 {port} 5 && echo up", tmp_path)
    assert (done.returncode, done.stdout) == (0, "up\n"), done.stderr


def test_wait_for_port_waits_for_a_late_listener(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = subprocess.Popen(
            ["sh", "-c", f'. "{HELPERS}"; wait_for_port 127.0.0.1 {port} 10'], cwd=tmp_path
        )
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting
        s.listen()
        assert proc.wait(timeout=10) == 0


def test_wait_for_port_gives_up_after_its_timeout(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        start = time.monotonic()
        done = sh(
            f'wait_for_port 127.0.0.1 {port} 1.5 || {{ echo "x did not start listening" >&2; exit 1; }}',
            tmp_path,
        )
        took = time.monotonic() - start
    assert done.returncode == 1
    assert done.stderr == "x did not start listening\n"
    assert 1.4 <= took < 5
