"""The Prefect API is closed to strangers (issue 17, item 6), against a real `crv up`.

A flow run of crv's deployments acts with crv's admin certificate, so the Prefect server
requires HTTP basic auth: a request without the credentials gets 401, and the README's curl
calls, which carry them (`crv api-credentials --auth-string`), deploy and destroy a cluster.
`crv api-credentials` prints what another system needs; CRV_HOME, its databases, its logs and
the password file are readable by their owner only; a server of a home from before the auth
is restarted with it; an API opened beyond loopback without auth is refused.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crv.base.processes import same_process_alive
from tests.conftest import REPO
from tests.test_deploy_e2e import Crv

README = REPO / "README.md"
DEPLOYMENTS = ("deploy-appliance/crv", "scale-role/crv", "destroy-cluster/crv")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture(scope="module")
def crv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crv]:
    c = Crv(tmp_path_factory.mktemp("crv-home"))
    c.up()
    yield c
    for pid in c.node_processes():
        os.kill(pid, signal.SIGKILL)
    c("down")


def api_url(crv: Crv) -> str:
    return str(json.loads((crv.home / "prefect" / "daemon.json").read_text())["url"])


def auth_string(crv: Crv) -> str:
    return (crv.home / "prefect" / "api-auth").read_text().strip()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_api_answers_401_without_the_credentials(crv: Crv) -> None:
    api = api_url(crv)
    user, password = crv.prefect_auth
    with httpx.Client(base_url=api, timeout=30) as anonymous:
        for name in DEPLOYMENTS:
            r = anonymous.get(f"/deployments/name/{name}")
            assert r.status_code == 401, (name, r.status_code, r.text)
        deploy = httpx.get(
            f"{api}/deployments/name/deploy-appliance/crv", auth=(user, password), timeout=30
        )
        assert deploy.status_code == 200, deploy.text
        runs_before = httpx.post(f"{api}/flow_runs/count", json={}, auth=(user, password)).json()

        # creating a run, what a stranger is after: refused, and no run exists
        body = {"parameters": {"name": "someone-elses"}}
        create = f"/deployments/{deploy.json()['id']}/create_flow_run"
        assert anonymous.post(create, json=body).status_code == 401
        assert anonymous.post(create, json=body, auth=(user, "guessed")).status_code == 401
        assert anonymous.post(create, json=body, auth=("admin", password)).status_code == 401
        assert anonymous.post("/flow_runs/filter", json={}).status_code == 401
        runs_after = httpx.post(f"{api}/flow_runs/count", json={}, auth=(user, password)).json()
        assert runs_after == runs_before

        # only the health probe is open (it says nothing)
        assert anonymous.get("/health").status_code == 200


def readme_block(*needles: str) -> str:
    """The README's ```sh block that holds every needle."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if all(n in b for n in needles)]
    assert len(found) == 1, f"{len(found)} README sh blocks hold {needles}"
    return found[0]


def sh(crv: Crv, script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run README lines as a user would: bash, curl, python3 and `crv` on PATH, this home."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **{k: v for k, v in crv.env.items() if not k.startswith("PREFECT_")},
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def with_api(crv: Crv, block: str) -> str:
    """The block with this home's API url in place of the README's default one."""
    default = "API=http://127.0.0.1:4200/api\n"
    assert block.count(default) == 1, block
    return block.replace(default, f"API={api_url(crv)}\n")


def test_the_readme_api_calls_work_with_the_credentials(crv: Crv) -> None:
    """The README's deploy block as written (AUTH from `crv api-credentials`, every curl with
    -u), then its destroy call; without the credentials the same deploy block fails."""
    deploy = readme_block("create_flow_run", "deploy-appliance/crv", "until curl")
    assert deploy.count('curl -s --retry 5 -u "$AUTH"') == 3, deploy

    # the same lines without the credentials: refused, nothing deployed
    stripped = with_api(crv, deploy).replace(' -u "$AUTH"', "")
    refused = sh(crv, stripped, timeout=60)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert crv.node_processes() == []

    r = sh(crv, with_api(crv, deploy), timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "COMPLETED" in r.stdout, r.stdout
    status = crv.status("farm2")
    assert status["ready"] and len(status["nodes"]) == 3, status

    # the destroy call of the next README block, then poll the run it answers with
    more = readme_block("destroy-cluster/crv", "scale-role/crv", "create_flow_run")
    lines = more.replace("\\\n", "").splitlines()
    [destroy_line] = [line for line in lines if "destroy-cluster/crv" in line]
    prelude = "\n".join(line for line in deploy.splitlines() if line.startswith(("AUTH=", "id_of")))
    d = sh(crv, with_api(crv, "API=http://127.0.0.1:4200/api\n" + prelude) + "\n" + destroy_line)
    assert d.returncode == 0, d.stdout + d.stderr
    run: dict[str, Any] = json.loads(d.stdout)
    assert "id" in run, d.stdout
    state = wait_for_run(crv, str(run["id"]))
    assert state == "COMPLETED", state
    assert crv("status", "farm2").returncode == 2
    assert crv.node_processes() == []


def wait_for_run(crv: Crv, run_id: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{api_url(crv)}/flow_runs/{run_id}", auth=crv.prefect_auth, timeout=30)
        r.raise_for_status()
        state = str(r.json()["state"]["type"])
        if state in FINAL or time.monotonic() > deadline:
            return state
        time.sleep(1)


def test_api_credentials_prints_what_another_system_needs(crv: Crv) -> None:
    auth = auth_string(crv)
    user, _, password = auth.partition(":")
    assert user == "crv" and len(password) >= 32

    j = crv("api-credentials", "--json")
    assert j.returncode == 0, j.stderr
    found = json.loads(j.stdout)
    api = api_url(crv)
    assert found["api_url"] == api and found["ui_url"] == api.removesuffix("/api")
    assert (found["user"], found["password"], found["auth_string"]) == (user, password, auth)
    assert found["env"] == {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth}
    assert found["file"] == str(crv.home / "prefect" / "api-auth")

    only = crv("api-credentials", "--auth-string")
    assert only.returncode == 0 and only.stdout == f"{auth}\n", only

    text = crv("api-credentials")
    assert text.returncode == 0, text.stderr
    assert f"Prefect API: {api}\n" in text.stdout
    assert f"password:    {password}\n" in text.stdout
    [curl] = [line for line in text.stdout.splitlines() if line.startswith("curl:")]
    assert found["curl"] == curl.removeprefix("curl:").strip()
    # the printed curl line works as it is, from a shell with nothing of crv's
    r = subprocess.run(
        ["bash", "-c", found["curl"] + " -s -f"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "crv"

    # a Prefect client with the printed settings, from a process without crv's environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CRV_"))}
    code = (
        "from prefect import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    print(c.read_deployment_by_name('deploy-appliance/crv').name)\n"
    )
    for settings, ok in ((found["env"], True), ({"PREFECT_API_URL": api}, False)):
        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**env, **settings, "PREFECT_HOME": str(crv.home / "client-prefect-home")},
            timeout=120,
        )
        if ok:
            assert p.returncode == 0 and p.stdout.strip() == "crv", p.stdout + p.stderr
        else:
            assert p.returncode != 0 and "401" in p.stderr, p.stdout + p.stderr

    up = crv("up", timeout=120)
    assert up.returncode == 0, up.stderr
    assert f"password in {crv.home / 'prefect' / 'api-auth'}" in up.stdout
    assert password not in up.stdout + up.stderr  # `up` says where it is, not what


def private_files(home: Path) -> list[Path]:
    files = [
        home / "prefect" / "api-auth",
        home / "service" / "state.db",
        home / "prefect" / "prefect.db",
        home / "service" / "service.log",
        home / "prefect" / "prefect.log",
        home / "prefect" / "deployments.log",
    ]
    for f in files:
        assert f.is_file(), f
    return files


def test_crv_home_its_databases_logs_and_password_are_private(crv: Crv) -> None:
    home = crv.home
    dirs = [home, home / "ca", home / "service", home / "prefect"]
    assert {d: oct(mode(d)) for d in dirs} == {d: oct(0o700) for d in dirs}
    files = private_files(home) + list(home.glob("*/*.db-wal"))
    assert {f: oct(mode(f)) for f in files} == {f: oct(0o600) for f in files}

    # a home left open by an older crv (or a umask) is closed again by the next `crv up`
    for d in dirs:
        d.chmod(0o755)
    for f in files:
        f.chmod(0o644)
    up = crv("up", timeout=120)
    assert up.returncode == 0, up.stderr
    assert {d: oct(mode(d)) for d in dirs} == {d: oct(0o700) for d in dirs}
    assert {f: oct(mode(f)) for f in files} == {f: oct(0o600) for f in files}


def test_a_server_without_auth_is_restarted_with_it(crv: Crv) -> None:
    """A Prefect server of this home answering without auth (as one started before crv had
    it) is replaced by `crv up` with one that requires the same credentials as before."""
    auth = auth_string(crv)
    crv.env["CRV_PREFECT_AUTH"] = "off"
    try:
        opened = crv("up", timeout=300)
    finally:
        del crv.env["CRV_PREFECT_AUTH"]
    assert opened.returncode == 0, opened.stdout + opened.stderr
    assert "API auth:    none" in opened.stdout
    opened_daemon = json.loads((crv.home / "prefect" / "daemon.json").read_text())
    open_api = str(opened_daemon["url"])
    assert httpx.get(f"{open_api}/deployments/name/deploy-appliance/crv").status_code == 200

    closed = crv("up", timeout=300)
    assert closed.returncode == 0, closed.stdout + closed.stderr
    api = api_url(crv)
    assert httpx.get(f"{api}/deployments/name/deploy-appliance/crv").status_code == 401
    # the open one is gone: its process has ended, and nothing answers at its address without
    # credentials (the port free again at once, as crv's daemons bind it with SO_REUSEADDR, may
    # hold the new server, or another home's: 4200 is every home's first choice)
    assert not same_process_alive(opened_daemon["pid"], opened_daemon["started"]), opened_daemon
    try:
        left = httpx.get(f"{open_api}/deployments/name/deploy-appliance/crv", timeout=5)
    except httpx.TransportError:
        pass
    else:
        assert left.status_code == 401, (open_api, api, left.status_code)
    assert auth_string(crv) == auth  # generated once, reused
    r = httpx.get(f"{api}/deployments/name/deploy-appliance/crv", auth=crv.prefect_auth)
    assert r.status_code == 200, r.text
    # and what crv runs still works against it: a served deployment's run from the CLI side
    assert crv("list", "--json").returncode == 0


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CRV_PREFECT_HOST": "0.0.0.0", "CRV_PREFECT_AUTH": "off"},
         "error: CRV_PREFECT_HOST=0.0.0.0 with CRV_PREFECT_AUTH=off: refusing to open the "
         "Prefect API beyond loopback without authentication"),
        ({"CRV_PREFECT_HOST": "10.1.2.3", "CRV_PREFECT_AUTH": "OFF"},
         "error: CRV_PREFECT_HOST=10.1.2.3 with CRV_PREFECT_AUTH=off: refusing"),
        ({"CRV_PREFECT_HOST": "my-host"}, "error: CRV_PREFECT_HOST='my-host' is not an IP address"),
        ({"CRV_PREFECT_AUTH": "maybe"}, "error: CRV_PREFECT_AUTH='maybe': it is on"),
    ],
)  # fmt: skip
def test_an_api_open_beyond_loopback_is_refused(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """One line, exit 2, and nothing started."""
    home = tmp_path / "home"
    for command in (["up"], ["deploy", "appliances/webfarm", "--name", "x"]):
        p = subprocess.run(
            [sys.executable, "-m", "crv_cli", *command],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "CRV_HOME": str(home), **env},
            timeout=60,
        )
        assert p.returncode == 2, p.stdout + p.stderr
        assert p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr
        assert p.stdout == ""
        # no daemon started, no password made (`deploy` may have made its pool's directory)
        assert not (home / "prefect").exists() and not (home / "service").exists()


def test_loopback_without_auth_is_allowed_and_says_so(tmp_path: Path) -> None:
    """CRV_PREFECT_AUTH=off on a loopback address is the one way to an open API; the
    refusal is about the address, not the setting. (Checked without starting a server.)"""
    from crv_cli import daemons

    saved = {k: os.environ.get(k) for k in ("CRV_PREFECT_HOST", "CRV_PREFECT_AUTH")}
    try:
        os.environ["CRV_PREFECT_AUTH"] = "off"
        for host in ("127.0.0.1", "127.0.0.3", "::1"):
            os.environ["CRV_PREFECT_HOST"] = host
            assert daemons.prefect_settings() == (host, False)
        os.environ["CRV_PREFECT_AUTH"] = "on"
        os.environ["CRV_PREFECT_HOST"] = "0.0.0.0"
        assert daemons.prefect_settings() == ("0.0.0.0", True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
