"""F4: a provider's 429/503 storm, with `Retry-After`, in front of moto's EC2 server.

`StormProxy` is a real HTTP proxy on loopback between the cloud pool (libcloud's EC2 driver) and
moto's server (a separate process): while a storm lasts it answers a share of the EC2 calls
itself, as AWS does when it throttles (HTTP 503 or 429, an EC2 error document with
`RequestLimitExceeded`, and a `Retry-After` header), and forwards the others; it records every
request with its time, so a test can check that no call came back before the wait it was
asked for. Nothing in crv is replaced: the pool's own retry (pools/cloud.py, "Rate limits")
meets real HTTP answers.

The default suite runs the quick ones (a Retry-After read from a real answer, in seconds and as
an HTTP-date; one past the deadline fails at once; a storm longer than the deadline fails in
one line). The `faults` marker runs a storm the pool rides out, and a deploy through `crv
deploy` (the CLI, the Prefect flow, the service, agents) on the pool behind the proxy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml

from crv.base.retry import RetryPolicy, parse_retry_after
from pools.base import TAG_CLUSTER, TAG_NODE, PoolError
from pools.cloud import CloudOptions, CloudPool, _client_token
from tests.conftest import write_appliance
from tests.machines import Ec2Machines
from tests.moto_server import MotoServer, moto_ec2
from tests.test_deploy_e2e import Crv
from tests.test_pool_cloud import KEY_VAR, SECRET_VAR, instances, make_pool, options, spec, unique

__all__ = ["moto_ec2"]  # the fixture, for pytest

ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
    "<RequestID>{request}</RequestID></Response>"
)
MESSAGES = {"RequestLimitExceeded": "Request limit exceeded.", "Throttling": "Rate exceeded"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}


# ---- the proxy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request the proxy received, and what it answered."""

    at: float  # time.monotonic() when it arrived
    action: str  # the EC2 Action
    key: str  # the call's identity: every parameter (a retry of one call has the same key)
    status: int  # the proxy's answer (moto's, when forwarded)
    retry_after: float | None = None  # seconds asked for by a storm answer
    answered: float = 0.0  # time.monotonic() just before a storm answer was sent


@dataclass
class Weather:
    until: float = 0.0  # a storm lasts while time.monotonic() < until
    share: float = 1.0  # of the EC2 calls it answers itself
    statuses: tuple[int, ...] = (503,)  # taken in turn
    code: str = "RequestLimitExceeded"
    retry_after: Callable[[], str | None] = field(default=lambda: None)
    length: float | None = None  # armed: a storm this long begins at the next EC2 call


class StormProxy:
    """A forwarding HTTP proxy on 127.0.0.1 in front of moto's server (module doc)."""

    def __init__(self, upstream: MotoServer, seed: int = 22) -> None:
        self.upstream = upstream
        self.weather = Weather()
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.random = random.Random(seed)
        self.turn = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as libcloud's requests session expects

            def do_GET(self) -> None:
                proxy.handle(self)

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def storm(
        self,
        seconds: float,
        *,
        share: float = 1.0,
        statuses: tuple[int, ...] = (503,),
        code: str = "RequestLimitExceeded",
        retry_after: str | Callable[[], str | None] | None = None,
        at_first_call: bool = False,
    ) -> None:
        """A storm of `seconds` from now, or from the next EC2 call with `at_first_call`."""
        asked = retry_after if callable(retry_after) else (lambda: retry_after)
        with self.lock:
            self.weather = Weather(0.0, share, statuses, code, asked)
            if at_first_call:
                self.weather.length = seconds
            else:
                self.weather.until = time.monotonic() + seconds

    def calm(self) -> None:
        with self.lock:
            self.weather = Weather()

    def storm_answers(self) -> list[Seen]:
        return [s for s in self.seen if s.answered]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        arrived = time.monotonic()
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        params = parse_qsl(urlsplit(request.path).query, keep_blank_values=True)
        if body and "x-www-form-urlencoded" in request.headers.get("Content-Type", ""):
            params += parse_qsl(body.decode(), keep_blank_values=True)
        action = dict(params).get("Action", "")
        key = hashlib.sha256(json.dumps(sorted(params)).encode()).hexdigest()[:16]
        with self.lock:
            w = self.weather
            if action and w.length is not None:  # armed: this call starts the storm
                w.until, w.length = arrived + w.length, None
            stormy = bool(action) and arrived < w.until and self.random.random() < w.share
            if stormy:
                status = w.statuses[self.turn % len(w.statuses)]
                self.turn += 1
                asked = w.retry_after()
        if stormy:
            text = ERROR_BODY.format(
                code=w.code, message=MESSAGES.get(w.code, w.code), request=key
            ).encode()
            headers = {"Content-Type": "text/xml;charset=UTF-8"}
            if asked is not None:
                headers["Retry-After"] = asked
            seconds = parse_retry_after(asked)
            answered = time.monotonic()
            with self.lock:
                self.seen.append(Seen(arrived, action, key, status, seconds, answered))
            self._answer(request, status, headers, text)
            return
        status, headers, text = self._forward(request, body)
        with self.lock:
            self.seen.append(Seen(arrived, action, key, status))
        self._answer(request, status, headers, text)

    def _forward(
        self, request: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        upstream = http.client.HTTPConnection(self.upstream.host, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(request.command, request.path, body=body or None, headers=headers)
            answer = upstream.getresponse()
            text = answer.read()
            kept = {k: v for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP}
            kept.pop("Content-Length", None)
            return answer.status, kept, text
        finally:
            upstream.close()

    @staticmethod
    def _answer(
        request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
        request.wfile.flush()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(moto_ec2: MotoServer) -> Iterator[StormProxy]:
    p = StormProxy(moto_ec2)
    try:
        yield p
    finally:
        p.close()


def behind(proxy: StormProxy, tmp_path: Path, name: str = "stormy", **retry: float) -> CloudPool:
    """A cloud pool whose EC2 endpoint is the proxy (`retry`: its attempts and deadline)."""
    os.environ.setdefault(KEY_VAR, "testing")
    os.environ.setdefault(SECRET_VAR, "testing")
    opts = options(proxy.port, **({"retry": retry} if retry else {}))
    pool = CloudPool(name, tmp_path / name, CloudOptions.model_validate(opts))
    pool.validate()
    return pool


def honoured(seen: list[Seen]) -> list[str]:
    """Every storm answer whose call came back before the Retry-After it was given."""
    early = []
    for i, answer in enumerate(seen):
        if answer.retry_after is None:
            continue
        later = next((s for s in seen[i + 1 :] if s.key == answer.key), None)
        if later is not None and later.at < answer.answered + answer.retry_after:
            early.append(
                f"{answer.action} back {later.at - answer.answered:.2f} s after a "
                f"Retry-After of {answer.retry_after:g} s"
            )
    return early


def backoff_bound(policy: RetryPolicy, storm: float, asked: float) -> float:
    """The longest single wait a call can begin before a storm of `storm` seconds ends, when
    every answer in it asks for `asked` seconds: a call's k-th wait starts no earlier than the
    sum of the shortest waits before it, and lasts at most its nominal delay with full jitter
    (or the asked delay)."""
    earliest, longest = 0.0, 0.0
    for nominal in policy.delays():
        if earliest >= storm:
            break
        longest = max(longest, nominal * (1 + policy.jitter), asked)
        earliest += max(nominal * (1 - policy.jitter), asked)
    return longest


# ---- Retry-After from real answers (default suite) ------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_in_seconds_reaches_the_pool_error(
    proxy: StormProxy, tmp_path: Path, status: int
) -> None:
    """One attempt allowed: the error is the pool's one line, with the asked delay on it."""
    pool = behind(proxy, tmp_path, attempts=1)
    proxy.storm(60, statuses=(status,), retry_after="7")
    with pytest.raises(PoolError) as err:
        pool.get_node("n0")
    assert err.value.delay == 7.0
    assert not err.value.temporary  # the pool's own retries are spent: not again from above
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("pool stormy: list instances: rate limited by the provider (")
    assert "Retry-After 7 s" in message
    if status == 503:  # libcloud keeps EC2's error code of a 503 (of a 429, only its status)
        assert "RequestLimitExceeded: Request limit exceeded." in message
    assert "gave up: 1 attempt in" in message


def test_retry_after_as_an_http_date_is_seconds_from_now(proxy: StormProxy, tmp_path: Path) -> None:
    pool = behind(proxy, tmp_path, attempts=1)
    proxy.storm(
        60, statuses=(503, 429), retry_after=lambda: formatdate(time.time() + 30, usegmt=True)
    )
    for _ in range(2):  # a 503 (libcloud's BaseHTTPError), then a 429 (RateLimitReachedError)
        with pytest.raises(PoolError) as err:
            pool.get_node("n0")
        assert err.value.delay is not None and 28.0 <= err.value.delay <= 30.0


def test_an_unreadable_retry_after_is_no_retry_after(proxy: StormProxy, tmp_path: Path) -> None:
    """libcloud would raise ValueError reading `Retry-After: soon` of a 429 (float()): the
    pool's response class drops it, and the error is the usual rate limit."""
    pool = behind(proxy, tmp_path, attempts=1)
    proxy.storm(60, statuses=(429, 503), retry_after="soon")
    for _ in range(2):
        with pytest.raises(PoolError, match="rate limited by the provider") as err:
            pool.get_node("n0")
        assert err.value.delay is None


def test_a_retry_after_past_the_deadline_fails_at_once(proxy: StormProxy, tmp_path: Path) -> None:
    pool = behind(proxy, tmp_path, deadline=30)
    proxy.storm(600, statuses=(429,), retry_after="600")
    started = time.monotonic()
    with pytest.raises(PoolError) as err:
        pool.create_node(spec("n0", unique("asked")))
    assert time.monotonic() - started < 2.0  # no sleep
    assert len(proxy.seen) == 1  # one request: the first answer said it all
    assert re.fullmatch(
        r"pool stormy: list instances: rate limited by the provider \(429 Rate limit exceeded; "
        r"Retry-After 600 s\); gave up: asked to wait 600 s, past the retry deadline of 30 s "
        r"\(\d+\.\d s left after 1 attempt\)",
        str(err.value),
    ), str(err.value)
    assert not err.value.temporary


def test_a_storm_longer_than_the_deadline_fails_in_one_line_in_bounded_time(
    proxy: StormProxy, tmp_path: Path
) -> None:
    """A storm of a minute against a deadline of 3 s: the call stops at the deadline, after a
    few jittered attempts each at least the asked second apart, with one line naming the pool,
    the call and the rate limit; nothing is made."""
    cluster = unique("longer")
    pool = behind(proxy, tmp_path, deadline=3, attempts=8)
    proxy.storm(60, statuses=(503,), retry_after="1")
    started = time.monotonic()
    with pytest.raises(PoolError) as err:
        pool.create_node(spec(f"{cluster}-n0", cluster))
    elapsed = time.monotonic() - started
    proxy.calm()
    assert 2.0 <= elapsed < 3.5, elapsed  # each wait >= 1 s; no wait ends past the deadline
    assert 3 <= len(proxy.seen) <= 4  # at 0, >= 1, >= 2 s, maybe one more before 3 s
    assert honoured(proxy.seen) == []
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "pool stormy: list instances: rate limited by the provider (RequestLimitExceeded: "
        "Request limit exceeded.; Retry-After 1 s); gave up: "
    )
    assert "the retry deadline of 3 s" in message  # passed, or less left than asked for
    assert not err.value.temporary
    assert instances(make_pool(tmp_path), **{f"tag:{TAG_CLUSTER}": cluster}) == []


# ---- a storm ridden out (faults) -------------------------------------------------------------

STORM = 5.0  # seconds
ASKED = 2.0  # the Retry-After of every storm answer: longer than the first nominal wait (1 s)
SLACK = 1.5  # seconds for moto and the threads on a shared 2-CPU machine


@pytest.mark.faults
def test_the_pool_rides_out_a_storm_once_per_node_honouring_retry_after(
    proxy: StormProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three nodes made at once while every EC2 call is answered 429 or 503 with Retry-After
    2 s for 5 s: each is made exactly once (one instance per node, generation 0's ClientToken),
    no call returns before its Retry-After, and it all ends within base + T + backoff."""
    pool = behind(proxy, tmp_path)
    direct = make_pool(tmp_path)  # moto itself, past the proxy

    def make(cluster: str) -> float:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(3) as threads:
            list(
                threads.map(pool.create_node, [spec(f"{cluster}-n{i}", cluster) for i in range(3)])
            )
        return time.monotonic() - started

    base = make(unique("calm"))
    cluster = unique("storm")
    proxy.storm(STORM, statuses=(429, 503), retry_after=f"{ASKED:g}")
    elapsed = make(cluster)
    bound = base + STORM + backoff_bound(pool.backoff, STORM, ASKED) + SLACK

    storm = proxy.storm_answers()
    assert len({s.key for s in storm}) >= 3 and {s.status for s in storm} == {429, 503}
    assert STORM <= elapsed <= bound, (elapsed, bound)
    assert honoured(proxy.seen) == []
    per_call: dict[str, int] = {}
    for s in proxy.seen:
        per_call[s.key] = per_call.get(s.key, 0) + 1
    assert max(per_call.values()) <= pool.options.retry.attempts
    made = instances(direct, **{f"tag:{TAG_CLUSTER}": cluster})
    assert len(made) == 3 and {i["state"] for i in made} <= {"pending", "running"}
    for i in range(3):
        node = f"{cluster}-n{i}"
        (one,) = instances(direct, **{f"tag:{TAG_NODE}": node})
        assert one["clientToken"] == _client_token(cluster, node, 0)  # never made again
    with capsys.disabled():
        print(f"\nF4 pool: T={STORM:g} s, base={base:.2f} s, elapsed={elapsed:.2f} s, "
              f"bound={bound:.2f} s, {len(storm)} storm answers")  # fmt: skip


# ---- a deploy through a storm (faults) -------------------------------------------------------

APPLIANCE = """\
apiVersion: crv/v1
name: rainy
nodes:
  worker: {count: 2, roles: [work]}
roles:
  work:
    recipe: work.sh
    publishes: [id]
    verify: {command: "test {{ self.id }} = {{ node.name }}-ok"}
"""
WORK = """#!/bin/sh
set -eu
crv-agent set id "$CRV_NODE-ok"
"""
E2E_SLACK = 10.0  # seconds: two whole deploys on a shared machine vary by this much


@pytest.fixture(scope="module")
def stormy_crv(
    tmp_path_factory: pytest.TempPathFactory, moto_ec2: MotoServer
) -> Iterator[tuple[Crv, StormProxy]]:
    p = StormProxy(moto_ec2)
    home = tmp_path_factory.mktemp("crv-home")
    pools = {"ec2": {"driver": "libcloud", "options": options(p.port)}}
    (home / "pools.yaml").write_text(yaml.safe_dump({"pools": pools}))
    c = Crv(home)
    c.env.update({KEY_VAR: "testing", SECRET_VAR: "testing"})
    c.up()
    try:
        yield c, p
    finally:
        for pid in c.node_processes():
            os.kill(pid, signal.SIGKILL)
        c("down")
        p.close()


@pytest.mark.faults
def test_a_deploy_through_a_storm_makes_each_node_once_within_the_bound(
    stormy_crv: tuple[Crv, StormProxy],
    moto_ec2: MotoServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`crv deploy` of two nodes on the EC2 pool behind the proxy, first in calm weather (the
    base), then with a storm of T s from the run's first EC2 call (60 % of the calls answered
    503 or 429 with Retry-After 2 s, so that some get through to the next call): the cluster is ready, each node was made once, no call came back
    before its Retry-After, and the run took at most base + T + backoff (+ slack)."""
    crv, proxy = stormy_crv
    directory = write_appliance(tmp_path, "rainy", APPLIANCE, ("work.sh",))
    (directory / "work.sh").write_text(WORK)
    direct = make_pool(tmp_path)

    backoff = CloudPool("ec2", tmp_path, CloudOptions.model_validate(options(proxy.port))).backoff
    machines = contextlib.ExitStack()

    def deploy(cluster: str) -> float:
        booted = machines.enter_context(
            Ec2Machines(moto_ec2.url, "us-east-1", "testing", "testing",
                        tmp_path / cluster, cluster=cluster)
        )  # fmt: skip
        started = time.monotonic()
        r = crv("deploy", str(directory), "--name", cluster, "--pool", "ec2",
                "--boot-timeout", "90", timeout=300)  # fmt: skip
        elapsed = time.monotonic() - started
        assert r.returncode == 0, r.stdout + r.stderr + repr(booted)
        assert len(booted.booted) == 2
        return elapsed

    with machines:
        base = deploy("calm")
        proxy.seen.clear()
        proxy.storm(
            STORM, share=0.6, statuses=(503, 429), retry_after=f"{ASKED:g}", at_first_call=True
        )
        elapsed = deploy("rainy")
        proxy.calm()
        status = crv.status("rainy")
    bound = base + STORM + backoff_bound(backoff, STORM, ASKED)

    storm = proxy.storm_answers()
    assert len(storm) >= 2 and "DescribeInstances" in {s.action for s in storm}, storm
    assert {s.status for s in storm} <= {429, 503}
    assert honoured(proxy.seen) == []
    assert elapsed <= bound + E2E_SLACK, (elapsed, bound)
    assert status["ready"] is True
    assert status["drift"] == {"missing": [], "orphans": [], "unreachable": {}}
    made = instances(direct, **{f"tag:{TAG_CLUSTER}": "rainy"})  # any state: none terminated
    assert sorted(i["state"] for i in made) == ["running", "running"]
    for node in ("rainy-worker-0", "rainy-worker-1"):
        (one,) = instances(direct, **{f"tag:{TAG_NODE}": node})
        assert one["clientToken"] == _client_token("rainy", node, 0)
    with capsys.disabled():
        print(f"\nF4 deploy: T={STORM:g} s, base={base:.1f} s, elapsed={elapsed:.1f} s, "
              f"bound={bound:.1f} s (+{E2E_SLACK:g} s slack), {len(storm)} storm answers, "
              f"calls: {sorted({s.action for s in storm})}")  # fmt: skip
    for cluster in ("calm", "rainy"):
        r = crv("destroy", cluster)
        assert r.returncode == 0, r.stdout + r.stderr
