"""The libcloud pool against moto's EC2 server, a real separate process on loopback.

Every call goes over HTTP through libcloud's real EC2 driver (no in-process mocks). The shared
contract suite can reuse this module's `make_pool(tmp_path)` and the `moto_ec2` fixture.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import socket
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from pydantic import ValidationError

from pools import AGENT, cloudinit
from pools.base import TAG_CLUSTER, TAG_NODE, NodeSpec, Pool, PoolError
from pools.cloud import CloudOptions, CloudPool, _client_token
from pools.credentials import SecretRef, resolve
from tests import moto_server
from tests.moto_server import MotoServer, moto_ec2

__all__ = ["make_pool", "moto_ec2"]

AMI = "ami-1e749f67"  # one of moto's standard AMIs (ubuntu trusty in moto's amis.json)
SIZE = "t2.micro"
KEY_VAR = "CRV_TEST_MOTO_KEY"
SECRET_VAR = "CRV_TEST_MOTO_SECRET"
TOKEN = "tok-9f8e7d6c5b4a39281706f5e4d3c2b1a0ZZZZZZZZZ"
NS = "{http://ec2.amazonaws.com/doc/2016-11-15/}"


def options(port: int, **changes: Any) -> dict[str, Any]:
    """The options of a pool on moto, as pools.yaml would give them."""
    return {
        "provider": "ec2",
        "key": {"env": KEY_VAR},
        "secret": {"env": SECRET_VAR},
        "region": "us-east-1",
        "image": AMI,
        "size": SIZE,
        "driver_args": {
            "host": "127.0.0.1",
            "port": port,
            "secure": False,
            "signature_version": "4",
        },
        **changes,
    }


def make_pool(tmp_path: Path, **changes: Any) -> CloudPool:
    """A CloudPool on the moto server the `moto_ec2` fixture runs (it must be active)."""
    server = moto_server.CURRENT
    if server is None:
        raise RuntimeError("make_pool needs the moto_ec2 fixture")
    os.environ.setdefault(KEY_VAR, "testing")  # moto accepts any credentials
    os.environ.setdefault(SECRET_VAR, "testing")
    opts = CloudOptions.model_validate(options(server.port, **changes))
    return CloudPool("moto", tmp_path / "pool-state", opts)


@pytest.fixture
def pool(moto_ec2: MotoServer, tmp_path: Path) -> Iterator[CloudPool]:
    p = make_pool(tmp_path)
    p.validate()
    yield p


def spec(name: str, cluster: str, group: str = "web") -> NodeSpec:
    bootstrap = {
        "service": "https://127.0.0.1:8443",
        "ca": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "ca_sha256": "ab" * 32,
        "cluster": cluster,
        "node": name,
        "token": TOKEN,
    }
    return NodeSpec(name=name, cluster=cluster, group=group, bootstrap=bootstrap)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ec2(p: CloudPool, **params: str) -> Any:
    """A raw EC2 API call through the pool's own (namespace-fixing) libcloud connection."""
    return p.driver().connection.request("/", params=params).object


def instances(p: CloudPool, **filters: str) -> list[dict[str, str]]:
    """Every instance moto holds that matches the filters, whatever its tags or state."""
    params = {"Action": "DescribeInstances"}
    for i, (k, v) in enumerate(filters.items(), 1):
        params[f"Filter.{i}.Name"] = k
        params[f"Filter.{i}.Value.1"] = v
    found = []
    for item in ec2(p, **params).iter(f"{NS}instancesSet"):
        for inst in item.findall(f"{NS}item"):
            found.append(
                {
                    "id": inst.findtext(f"{NS}instanceId") or "",
                    "state": inst.findtext(f"{NS}instanceState/{NS}name") or "",
                    "clientToken": inst.findtext(f"{NS}clientToken") or "",
                }
            )
    return found


def live(p: CloudPool, name: str) -> list[dict[str, str]]:
    return [i for i in instances(p, **{f"tag:{TAG_NODE}": name}) if i["state"] != "terminated"]


def test_is_a_pool(pool: CloudPool) -> None:
    assert isinstance(pool, Pool)


def test_create_get_list(pool: CloudPool, tmp_path: Path) -> None:
    cluster, other = unique("c"), unique("other")
    a = pool.create_node(spec(f"{cluster}-web-0", cluster))
    b = pool.create_node(spec(f"{cluster}-db-0", cluster, group="db"))
    pool.create_node(spec(f"{other}-web-0", other))
    # an instance without crv tags (libcloud still gives it a Name tag)
    driver = pool.driver()
    image = driver.get_image(AMI)
    size = next(s for s in driver.list_sizes() if s.id == SIZE)
    stray = driver.create_node(name="not-crv", image=image, size=size)

    assert a.name == f"{cluster}-web-0" and a.cluster == cluster
    assert a.state in ("pending", "running")
    assert a.address and re.fullmatch(r"[0-9.]+", a.address)
    assert a.tags[TAG_CLUSTER] == cluster and a.tags[TAG_NODE] == a.name
    assert a.tags["Name"] == a.name and a.tags["crv-group"] == "web"
    assert a.extra["image_id"] == AMI and a.extra["instance_type"] == SIZE
    assert TOKEN not in repr(a) and TOKEN not in repr(b)

    listed = pool.list_nodes(cluster)
    assert [n.name for n in listed] == sorted([a.name, b.name])
    assert all(n.state in ("pending", "running") for n in listed)
    everything = {n.name for n in pool.list_nodes()}
    assert {a.name, b.name, f"{other}-web-0"} <= everything
    assert "not-crv" not in everything
    assert stray.id not in {n.extra["id"] for n in pool.list_nodes()}

    got = pool.get_node(a.name)
    assert got is not None and got.extra["id"] == a.extra["id"] and got.cluster == cluster
    assert pool.get_node(f"{cluster}-nope") is None


def test_create_is_idempotent(pool: CloudPool) -> None:
    cluster = unique("idem")
    first = pool.create_node(spec(f"{cluster}-n0", cluster))
    second = pool.create_node(spec(f"{cluster}-n0", cluster))
    assert second.extra["id"] == first.extra["id"]
    assert len(live(pool, f"{cluster}-n0")) == 1


def test_same_name_in_another_cluster_is_refused(pool: CloudPool) -> None:
    cluster = unique("mine")
    pool.create_node(spec(f"{cluster}-n0", cluster))
    with pytest.raises(PoolError, match="belongs to cluster") as err:
        pool.create_node(spec(f"{cluster}-n0", "someone-else"))
    assert not err.value.temporary
    assert len(live(pool, f"{cluster}-n0")) == 1


def test_create_retried_after_lost_answer(pool: CloudPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instance is made but the answer is lost: the error is temporary, and the retry
    returns that instance, not a second one. The request carried the deterministic token."""
    cluster = unique("lost")
    name = f"{cluster}-n0"
    driver = pool.driver()
    real = driver.create_node

    @functools.wraps(real)  # the same signature: the pool inspects it
    def answer_lost(**kwargs: Any) -> Any:
        real(**kwargs)  # reaches moto and makes the instance...
        raise requests.exceptions.ConnectionError("connection reset by peer")  # ...answer lost

    monkeypatch.setattr(driver, "create_node", answer_lost)
    with pytest.raises(PoolError) as err:
        pool.create_node(spec(name, cluster))
    assert err.value.temporary
    monkeypatch.setattr(driver, "create_node", real)

    again = pool.create_node(spec(name, cluster))
    made = live(pool, name)
    assert [i["id"] for i in made] == [again.extra["id"]]
    assert made[0]["clientToken"] == _client_token(cluster, name, 0)


def test_client_token_is_deterministic_and_ec2_sized() -> None:
    token = _client_token("cluster-" + "x" * 200, "node-" + "y" * 200, 3)
    assert token == _client_token("cluster-" + "x" * 200, "node-" + "y" * 200, 3)
    assert len(token) <= 64 and token.isascii()
    assert _client_token("a", "b", 0) != _client_token("a", "b", 1)
    assert _client_token("a", "bc", 0) != _client_token("ab", "c", 0)


def test_user_data_read_back_from_ec2(pool: CloudPool) -> None:
    cluster = unique("ud")
    s = spec(f"{cluster}-n0", cluster)
    info = pool.create_node(s)
    answer = ec2(
        pool,
        Action="DescribeInstanceAttribute",
        InstanceId=info.extra["id"],
        Attribute="userData",
    )
    encoded = answer.findtext(f"{NS}userData/{NS}value")
    assert encoded
    data = base64.b64decode(encoded)
    assert data[:2] == b"\x1f\x8b"  # gzip: EC2's 16 KiB
    assert len(data) <= cloudinit.EC2_USER_DATA_LIMIT
    files = cloudinit.parse(data)
    assert json.loads(files[cloudinit.BOOTSTRAP_PATH]) == dict(s.bootstrap)
    # the agent no longer fits: the document carries a fetcher pinned to its SHA-256
    assert files[cloudinit.FETCH_PATH] == cloudinit.FETCH.encode()
    (fetch,) = (c for c in cloudinit.runcmd(data) if cloudinit.FETCH_PATH in c)
    assert fetch[-1] == hashlib.sha256(AGENT.read_bytes()).hexdigest()
    # the token is in the user-data only: not in tags, NodeInfo or what lists return
    tags = ec2(
        pool,
        Action="DescribeTags",
        **{"Filter.1.Name": "resource-id"},
        **{"Filter.1.Value.1": info.extra["id"]},
    )
    assert TOKEN not in str([t.text for t in tags.iter()])
    assert TOKEN not in repr(pool.list_nodes(cluster))


def test_destroy_and_destroy_again(pool: CloudPool) -> None:
    cluster = unique("gone")
    keep = pool.create_node(spec(f"{cluster}-keep", cluster))
    pool.create_node(spec(f"{cluster}-n0", cluster))
    pool.destroy_node(f"{cluster}-n0")
    assert pool.get_node(f"{cluster}-n0") is None
    assert [n.name for n in pool.list_nodes(cluster)] == [keep.name]
    assert live(pool, f"{cluster}-n0") == []
    assert {i["state"] for i in instances(pool, **{f"tag:{TAG_NODE}": f"{cluster}-n0"})} <= {
        "terminated",
        "shutting-down",
    }
    pool.destroy_node(f"{cluster}-n0")  # terminated counts as gone
    pool.destroy_node(f"{cluster}-never-made")
    # and the node can be made again
    again = pool.create_node(spec(f"{cluster}-n0", cluster))
    assert again.state in ("pending", "running")
    assert len(live(pool, f"{cluster}-n0")) == 1


def test_unknown_image_is_permanent_and_names_image(moto_ec2: MotoServer, tmp_path: Path) -> None:
    p = make_pool(tmp_path, image="ami-00000000deadbeef")
    cluster = unique("img")
    with pytest.raises(PoolError) as err:
        p.create_node(spec(f"{cluster}-n0", cluster))
    assert not err.value.temporary
    assert "image" in str(err.value) and "\n" not in str(err.value)
    assert TOKEN not in str(err.value)
    assert p.list_nodes(cluster) == []


def test_unknown_size_is_permanent_and_names_size(moto_ec2: MotoServer, tmp_path: Path) -> None:
    p = make_pool(tmp_path, size="zz9.plural")
    cluster = unique("size")
    with pytest.raises(PoolError) as err:
        p.create_node(spec(f"{cluster}-n0", cluster))
    assert not err.value.temporary
    assert "option size" in str(err.value)
    assert p.list_nodes(cluster) == []


def test_group_override(moto_ec2: MotoServer, tmp_path: Path) -> None:
    p = make_pool(tmp_path, groups={"big": {"size": "t2.small"}})
    cluster = unique("grp")
    big = p.create_node(spec(f"{cluster}-b0", cluster, group="big"))
    small = p.create_node(spec(f"{cluster}-s0", cluster, group="web"))
    assert big.extra["instance_type"] == "t2.small"
    assert small.extra["instance_type"] == SIZE


def test_validate_names_the_missing_key(
    moto_ec2: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = make_pool(tmp_path)
    monkeypatch.delenv(KEY_VAR)
    with pytest.raises(PoolError) as err:
        p.validate()
    assert (
        str(err.value) == f"pool moto: option key: environment variable {KEY_VAR} is unset or empty"
    )
    assert not err.value.temporary
    monkeypatch.setenv(KEY_VAR, "")
    with pytest.raises(PoolError, match="option key"):
        p.validate()


def test_unreachable_provider_is_temporary(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault(KEY_VAR, "testing")
    os.environ.setdefault(SECRET_VAR, "testing")
    p = CloudPool("down", tmp_path, CloudOptions.model_validate(options(port)))
    p.validate()  # no network calls
    for call in (
        lambda: p.list_nodes(),
        lambda: p.get_node("x"),
        lambda: p.create_node(spec("x", "c")),
        lambda: p.destroy_node("x"),
    ):
        with pytest.raises(PoolError) as err:
            call()
        assert err.value.temporary
        assert "cannot reach the provider" in str(err.value)


@pytest.mark.parametrize(
    ("text", "code", "temporary", "names"),
    [
        ("RequestLimitExceeded: Request limit exceeded.", 503, True, ""),
        ("Throttling: Rate exceeded", 400, True, ""),
        ("InsufficientInstanceCapacity: no t2.micro capacity in us-east-1a", 500, True, ""),
        ("InstanceLimitExceeded: Your quota allows for 0 more running instance(s)", 400, False, ""),
        ("VcpuLimitExceeded: You have requested more vCPU capacity", 400, False, ""),
        ("InvalidAMIID.NotFound: The image id '[ami-1]' does not exist", 400, False, "image"),
        ("InvalidInstanceType: The instance type 'x' does not exist", 400, False, "size"),
        ("UnauthorizedOperation: You are not authorized", 403, False, ""),
        ("InternalError: An internal error has occurred", 500, True, ""),
        ("Something else", 502, True, ""),
        ("InvalidParameterValue: bad", 400, False, ""),
    ],
)
def test_error_classification(
    tmp_path: Path, text: str, code: int, temporary: bool, names: str
) -> None:
    from libcloud.common.exceptions import BaseHTTPError  # type: ignore[import-untyped]

    os.environ.setdefault(KEY_VAR, "testing")
    os.environ.setdefault(SECRET_VAR, "testing")
    p = CloudPool("c", tmp_path, CloudOptions.model_validate(options(1)))
    with pytest.raises(PoolError) as err, p._translated("create n"):
        raise BaseHTTPError(code, text)
    assert err.value.temporary is temporary
    if names:
        assert f"option {names}" in str(err.value)


def test_rate_limit_is_temporary(tmp_path: Path) -> None:
    from libcloud.common.exceptions import RateLimitReachedError  # type: ignore[import-untyped]

    os.environ.setdefault(KEY_VAR, "testing")
    os.environ.setdefault(SECRET_VAR, "testing")
    p = CloudPool("c", tmp_path, CloudOptions.model_validate(options(1)))
    with pytest.raises(PoolError) as err, p._translated("list"):
        raise RateLimitReachedError()
    assert err.value.temporary
    assert err.value.delay is None


@pytest.mark.parametrize(
    ("code", "text", "headers", "delay", "message"),
    [
        (503, "RequestLimitExceeded: Request limit exceeded.", {"retry-after": "7"}, 7.0,
         "pool c: create n: rate limited (RequestLimitExceeded: Request limit exceeded.; "
         "Retry-After 7 s)"),
        (503, "Service Unavailable", {"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT"}, 0.0,
         "pool c: create n: rate limited (Service Unavailable; Retry-After 0 s)"),
        (400, "Throttling: Rate exceeded", None, None,
         "pool c: create n: rate limited (Throttling: Rate exceeded)"),
        (500, "InternalError: try again", {"retry-after": "3"}, 3.0,
         "pool c: create n: InternalError: try again"),  # temporary, left to the step
        (503, "RequestLimitExceeded: x", {"retry-after": "later"}, None,
         "pool c: create n: rate limited (RequestLimitExceeded: x)"),
    ],
)  # fmt: skip
def test_retry_after_becomes_the_errors_delay(
    tmp_path: Path, code: int, text: str, headers: Any, delay: float | None, message: str
) -> None:
    """The wait a provider asked for (the header libcloud kept on its error, seconds or an
    HTTP-date) is the PoolError's `delay`; a rate limit is temporary, for the pool's own retry
    (tests/test_cloud_storm.py makes real answers)."""
    from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError  # type: ignore[import-untyped]

    os.environ.setdefault(KEY_VAR, "testing")
    os.environ.setdefault(SECRET_VAR, "testing")
    p = CloudPool("c", tmp_path, CloudOptions.model_validate(options(1)))
    with pytest.raises(PoolError) as err, p._translated("create n"):
        raise BaseHTTPError(code, text, headers)
    assert err.value.temporary
    assert err.value.delay == delay
    assert str(err.value) == message
    with pytest.raises(PoolError) as err, p._translated("list"):  # a 429: libcloud's own class
        raise RateLimitReachedError(headers={"retry-after": "4"})
    assert err.value.delay == 4.0
    assert str(err.value) == "pool c: list: rate limited (429 Rate limit exceeded; Retry-After 4 s)"


def test_retry_options_are_checked() -> None:
    opts = CloudOptions.model_validate(options(1, retry={"attempts": 3, "deadline": 10}))
    assert (opts.retry.attempts, opts.retry.deadline) == (3, 10.0)
    pool = CloudPool("c", Path("/nonexistent"), opts)
    assert (pool.backoff.retries, pool.backoff.deadline) == (2, 10.0)
    for bad in ({"attempts": 0}, {"deadline": 0}, {"deadline": 86400}, {"tries": 3}):
        with pytest.raises(ValidationError):
            CloudOptions.model_validate(options(1, retry=bad))


# ---- options and credentials (no server) ---------------------------------------------------


def test_options_refuse_literal_credentials_and_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        CloudOptions.model_validate(options(1, key="AKIAEXAMPLE"))
    with pytest.raises(ValidationError):
        CloudOptions.model_validate(options(1, secret={"env": "A", "prefect_secret": "b"}))
    with pytest.raises(ValidationError):
        CloudOptions.model_validate(options(1, secret={}))
    with pytest.raises(ValidationError, match="credentials go in key/secret"):
        CloudOptions.model_validate(options(1, driver_args={"secret": "s3cr3t"}))
    with pytest.raises(ValidationError):
        CloudOptions.model_validate(options(1, flavour="x"))
    with pytest.raises(ValidationError, match="unknown libcloud compute provider"):
        CloudOptions.model_validate(options(1, provider="nosuchcloud"))
    assert CloudOptions.model_validate(options(1, provider="EC2")).provider == "ec2"
    assert CloudOptions.model_validate(options(1, size=3)).size == "3"  # YAML flavour ids


def test_validate_names_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, "k")
    monkeypatch.setenv(SECRET_VAR, "s")

    def error(**changes: Any) -> str:
        p = CloudPool("p", tmp_path, CloudOptions.model_validate(options(1, **changes)))
        with pytest.raises(PoolError) as err:
            p.validate()
        assert not err.value.temporary
        return str(err.value)

    assert error(secret=None) == "pool p: option secret: required for provider ec2"
    assert "option region" in error(region="mars-north-1")
    assert "option network" in error(network="net-1")
    assert "option driver_args.ex_force_auth_url" in error(provider="openstack", driver_args={})
    assert "option driver_args.host" in error(provider="cloudstack", driver_args={})


def test_credentials_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRV_TEST_CRED", "value-1")
    assert resolve(SecretRef(env="CRV_TEST_CRED"), "p", "key") == "value-1"
    monkeypatch.delenv("CRV_TEST_CRED")
    with pytest.raises(PoolError) as err:
        resolve(SecretRef(env="CRV_TEST_CRED"), "p", "secret")
    assert (
        str(err.value)
        == "pool p: option secret: environment variable CRV_TEST_CRED is unset or empty"
    )
    with pytest.raises(ValidationError):
        SecretRef(env="not a name")


def test_documented_examples_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pools.yaml examples in CloudPool's docstring are valid configurations."""
    doc = textwrap.dedent((CloudPool.__doc__ or "").split("::", 1)[1].split("\n\n    For moto")[0])
    pools = yaml.safe_load(doc)["pools"]
    assert {"aws", "openstack", "cloudstack"} <= set(pools)
    for name, entry in pools.items():
        assert entry["driver"] == "libcloud"
        opts = CloudOptions.model_validate(entry["options"])
        for ref in (opts.key, opts.secret):
            if ref is not None and ref.env:
                monkeypatch.setenv(ref.env, "x")
        pool = CloudPool(name, tmp_path, opts)
        pool.validate()


def test_capacity_is_max_nodes_minus_the_instances_held(
    moto_ec2: MotoServer, tmp_path: Path
) -> None:
    assert make_pool(tmp_path).capacity() is None
    p = make_pool(tmp_path, max_nodes=50)
    held = len(p.list_nodes())  # the module's moto server may hold other tests' instances
    name = unique("cap-")
    p.create_node(spec(name, "capc"))
    try:
        assert p.capacity() == max(0, 50 - held - 1)
    finally:
        p.destroy_node(name)


def test_the_fetcher_installs_only_the_pinned_agent(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The first-boot fetcher of cloud user-data, run for real against a real service: the
    agent it installs is the pinned one; another SHA-256, or a CA that is not the pinned one,
    installs nothing."""
    import subprocess
    import sys

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from tests.test_service_security import started_service

    tmp = tmp_path_factory.mktemp("fetch")
    for svc in started_service(tmp_path_factory):
        pem = svc.home.ca_file.read_text()
        der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
        boot = {"service": svc.url, "ca": pem, "ca_sha256": hashlib.sha256(der).hexdigest()}
        (tmp / "boot.json").write_text(json.dumps(boot))
        (tmp / "wrong-ca.json").write_text(json.dumps({**boot, "ca_sha256": "ab" * 32}))
        (tmp / "fetch").write_text(cloudinit.FETCH)

        def fetch(boot_file: str, sha: str) -> subprocess.CompletedProcess[str]:
            argv = [
                sys.executable,
                str(tmp / "fetch"),
                str(tmp / boot_file),
                str(tmp / "agent"),
                sha,
            ]
            return subprocess.run(argv, capture_output=True, text=True, timeout=60)

        r = fetch("boot.json", "00" * 32)
        assert r.returncode == 1 and "not the one this node was made for" in r.stderr
        r = fetch("wrong-ca.json", cloudinit.agent_sha256())
        assert r.returncode == 1 and "does not match ca_sha256" in r.stderr
        assert not (tmp / "agent").exists()
        r = fetch("boot.json", cloudinit.agent_sha256())
        assert r.returncode == 0, r.stderr
        assert (tmp / "agent").read_bytes() == AGENT.read_bytes()
        assert (tmp / "agent").stat().st_mode & 0o777 == 0o755
