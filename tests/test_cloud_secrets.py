"""A-cloud-creds: the cloud pool's credentials in no error message, exception chain or log.

A provider's error answer can carry anything: libcloud keeps the body of an error answer (EC2's
`<Message>`, a JSON `message`, a whole HTML or text page) as the exception's text, and a
provider, a proxy or a debugging endpoint in front of it may echo the request - its
Authorization header, its query, its body (where OpenStack's Keystone gets the password) - or
whatever it knows of the account. `EchoProvider` here is such a provider: a real HTTP server on
127.0.0.1 that answers every request with an error whose text starts with the secret key (in
clear, URL-encoded, JSON- and XML-escaped), the request line, every header and the body it got.
moto's EC2 server (tests/moto_server.py) is the normal path.

What is asserted, with DEBUG logging on for every logger (crv's, libcloud's, urllib3's, ...):

- The secret key (EC2 secret access key, OpenStack password, CloudStack secret key) is never in
  the PoolError's message, in any exception of its chain (str, repr, args), in the traceback as
  logging prints it, nor in any log record.
- The key id (EC2 access key id, OpenStack user name, CloudStack API key) is held to the same
  rule in crv's errors and their chains: it is half of the credential pair (and on CloudStack
  the API key is a credential in its own right), and crv's messages have no use for it. In
  logs it is asserted absent for what crv configures (EC2 with signature version 4, OpenStack),
  where it travels in a header or a body that no library logs. A driver that puts it in the
  URL (EC2 signature version 2: AWSAccessKeyId; CloudStack: apiKey) has it in urllib3's DEBUG
  request line; that is the library's log, not tested here, and the secret is not in it (it
  signs, it does not travel).
- Out of scope: LIBCLOUD_DEBUG, libcloud's own wire log, which writes every request and answer
  to a file when an operator sets that variable to debug a provider.
"""

from __future__ import annotations

import html
import json
import logging
import secrets
import threading
import traceback
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from libcloud.compute.drivers.ec2 import IdempotentParamError

from pools.base import PoolError
from pools.cloud import CloudOptions, CloudPool, _one_line, _TokenReused
from tests.conftest import chain
from tests.moto_server import MotoServer, moto_ec2
from tests.test_pool_cloud import KEY_VAR, SECRET_VAR, make_pool, spec, unique

__all__ = ["moto_ec2"]  # the fixture, for pytest

# distinctive, and with the characters that encodings change (AWS secrets have / and +)
KEY = "AKIACRV" + secrets.token_hex(6).upper()
SECRET = f"crvS3cret/{secrets.token_hex(6)}+Key=&<x>"


def variants(value: str) -> set[str]:
    """`value` as it may be written: in clear, URL-encoded, JSON-, XML- and repr-escaped."""
    return {
        value,
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        json.dumps(value)[1:-1],
        html.escape(value),
        repr(value)[1:-1],
    }


def leaks(text: str, *values: str) -> list[str]:
    return [v for value in values for v in variants(value) if v in text]


# -- the echoing provider --------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    form: str  # "ec2": an EC2 error document; "json": Keystone/Nova's; "text": a plain page
    code: str = ""  # EC2's error code


class EchoProvider:
    """An HTTP server that answers every request with `answer`, an error echoing the secret,
    then the request (line, headers, body)."""

    def __init__(self) -> None:
        self.answer = Answer(400, "ec2", "InvalidParameterValue")
        self.requests = 0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self) -> None:
                provider.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode(errors="replace")
                told = " ".join(sorted(variants(SECRET)))
                echo = (
                    f"your secret key is {told}; you sent {self.command} {self.path} "
                    f"with {dict(self.headers.items())} and {body}"
                )
                a = provider.answer
                if a.form == "ec2":
                    data = (
                        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
                        f"<Code>{a.code}</Code><Message>{html.escape(echo)}</Message>"
                        "</Error></Errors><RequestID>echo-1</RequestID></Response>"
                    ).encode()
                    kind = "text/xml"
                elif a.form == "json":
                    error = {"error": {"message": echo, "code": a.status, "title": "Echo"}}
                    data, kind = json.dumps(error).encode(), "application/json"
                else:
                    data, kind = echo.encode(), "text/plain"
                self.send_response(a.status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> EchoProvider:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoProvider]:
    with EchoProvider() as provider:
        yield provider


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, KEY)
    monkeypatch.setenv(SECRET_VAR, SECRET)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("libcloud", "urllib3", "requests", "pools", "crv"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def echo_pool(provider: str, port: int, tmp_path: Path, attempts: int = 1) -> CloudPool:
    common = {
        "key": {"env": KEY_VAR},
        "secret": {"env": SECRET_VAR},
        "retry": {"attempts": attempts},  # of a rate-limited call (1: no waiting)
    }
    if provider == "ec2":
        options = {
            "provider": "ec2",
            "region": "us-east-1",
            "image": "ami-1e749f67",
            "size": "t2.micro",
            "driver_args": {
                "host": "127.0.0.1",
                "port": port,
                "secure": False,
                "signature_version": "4",
            },
        }
    else:
        options = {
            "provider": "openstack",
            "region": "RegionOne",
            "image": "0b5f1c8e-3f7d-4c3e-9d6a-2f1c3a1b9e10",
            "size": "3",
            "driver_args": {
                "ex_force_auth_url": f"http://127.0.0.1:{port}",
                "ex_force_auth_version": "3.x_password",
                "ex_tenant_name": "crv",
                "ex_domain_name": "Default",
            },
        }
    return CloudPool("echo", tmp_path, CloudOptions.model_validate({**common, **options}))


def assert_no_credentials(error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    """Neither the secret nor the key id in the error, its chain, its printed traceback or the
    log records (their messages, arguments and exception texts)."""
    for link in chain(error):
        text = f"{link} {link!r} {link.args!r}"
        assert not leaks(text, SECRET, KEY), f"{type(link).__name__}: {text[:400]}"
    printed = "".join(traceback.format_exception(error))
    assert not leaks(printed, SECRET, KEY), printed[-800:]
    for record in caplog.records:
        text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        assert not leaks(text, SECRET, KEY), f"{record.name}: {text[:400]}"
    assert not leaks(caplog.text, SECRET, KEY)


# -- provider errors that echo the credentials -----------------------------------------------------


CASES = [
    ("ec2", Answer(400, "ec2", "InvalidParameterValue"), "InvalidParameterValue: your secret"),
    ("ec2", Answer(401, "ec2", "AuthFailure"), "authentication failed"),
    ("ec2", Answer(403, "ec2", "UnauthorizedOperation"), "authentication or permission"),
    ("ec2", Answer(400, "ec2", "InvalidAMIID.NotFound"), "option image: InvalidAMIID"),
    ("ec2", Answer(500, "ec2", "InternalError"), "InternalError: your secret"),
    ("ec2", Answer(503, "ec2", "RequestLimitExceeded"), "rate limited by the provider"),
    ("ec2", Answer(429, "ec2", "Throttling"), "rate limited by the provider"),
    ("ec2", Answer(502, "text"), "Failed to parse XML"),
    ("openstack", Answer(400, "json"), "your secret"),
    ("openstack", Answer(401, "json"), "authentication failed"),
    ("openstack", Answer(403, "json"), "your secret"),
    ("openstack", Answer(500, "json"), "Malformed response"),
    ("openstack", Answer(503, "text"), "rate limited by the provider"),
]


@pytest.mark.parametrize(
    ("provider", "answer", "says"),
    [
        pytest.param(*case, id=f"{case[0]}-{case[1].status}-{case[1].code or case[1].form}")
        for case in CASES
    ],
)
def test_an_error_echoing_the_credentials_shows_neither(
    echo: EchoProvider,
    credentials: None,
    debug_logs: pytest.LogCaptureFixture,
    tmp_path: Path,
    provider: str,
    answer: Answer,
    says: str,
) -> None:
    echo.answer = answer
    pool = echo_pool(provider, echo.port, tmp_path)
    for call in (
        lambda: pool.list_nodes(),
        lambda: pool.create_node(spec("n1", "c1")),
        lambda: pool.destroy_node("n1"),
    ):
        before = echo.requests
        with pytest.raises(PoolError) as caught:
            call()
        assert echo.requests > before  # the provider was asked
        message = str(caught.value)
        assert message.startswith("pool echo: ") and "\n" not in message
        assert says in message, message
        assert_no_credentials(caught.value, debug_logs)


def test_the_message_keeps_the_rest_of_the_provider_text(
    echo: EchoProvider, credentials: None, tmp_path: Path
) -> None:
    """Redaction takes out the credentials, not the explanation around them."""
    echo.answer = Answer(400, "ec2", "InvalidParameterValue")
    with pytest.raises(PoolError) as caught:
        echo_pool("ec2", echo.port, tmp_path).list_nodes()
    message = str(caught.value)
    assert message.startswith(
        "pool echo: list instances: InvalidParameterValue: your secret key is <redacted> "
        "<redacted> <redacted>; you sent GET /?Action=DescribeInstances"
    ), message
    assert message.endswith("...")  # cut: one line of reasonable length


def test_a_rate_limit_retried_logs_no_credentials(
    echo: EchoProvider, credentials: None, debug_logs: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The pool's own retry of a rate limit logs the answer it got (at INFO), redacted."""
    echo.answer = Answer(503, "ec2", "RequestLimitExceeded")
    with pytest.raises(PoolError) as caught:
        echo_pool("ec2", echo.port, tmp_path, attempts=2).list_nodes()
    assert "gave up: 2 attempts" in str(caught.value)
    assert any("attempt 2 again in" in r.getMessage() for r in debug_logs.records)
    assert_no_credentials(caught.value, debug_logs)


def test_a_reused_client_token_is_told_apart_without_the_chain(
    credentials: None, tmp_path: Path
) -> None:
    """`create_node` moves to the next ClientToken generation on EC2's
    IdempotentParameterMismatch: it knows that answer by the PoolError's class now that the
    PoolError no longer carries libcloud's exception."""
    pool = echo_pool("ec2", 1, tmp_path)

    def mismatch() -> None:
        raise IdempotentParamError("IdempotentParameterMismatch: token in use", None)

    with pytest.raises(_TokenReused) as caught:
        pool._call("create n1", mismatch)
    assert str(caught.value) == "pool echo: create n1: client token reused"
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_one_line_redacts_every_encoding() -> None:
    text = " | ".join(sorted(variants(SECRET) | variants(KEY)))
    redacted = _one_line(f"before {text} after", (SECRET, KEY))
    assert not leaks(redacted, SECRET, KEY), redacted
    assert redacted.startswith("before <redacted>") and redacted.endswith("<redacted> after")


# -- the normal path -------------------------------------------------------------------------------


def test_a_node_made_and_destroyed_on_moto_logs_no_credentials(
    moto_ec2: MotoServer,
    credentials: None,
    debug_logs: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """moto takes any credentials: the pool signs with these, and every logger at DEBUG stays
    free of both (the key id travels in the Authorization header, which nothing logs)."""
    pool = make_pool(tmp_path)
    pool.validate()
    cluster = unique("secrets")
    info = pool.create_node(spec("n1", cluster))
    assert pool.get_node("n1") is not None
    assert [n.name for n in pool.list_nodes(cluster)] == ["n1"]
    pool.destroy_node("n1")
    assert info.cluster == cluster
    assert any(r.name.startswith("urllib3") for r in debug_logs.records)  # DEBUG really was on
    for record in debug_logs.records:
        text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        assert not leaks(text, SECRET, KEY), f"{record.name}: {text[:400]}"
