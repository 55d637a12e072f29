#!/usr/bin/env python3
"""crv-agent: the node side of crv (docs/agent.md, the contract is docs/service-api.md).

One file, standard library only, Python 3.8 or newer: it is copied onto guests we do not
build, and any guest with python3 must run it without installing anything. That is also why
the key and the CSR are made here in pure Python (no openssl binary, no `cryptography`).

`run` enrols the node (key made here, CSR + single-use token), then long-polls the service
for work and runs role recipes; `set`, `get` and `list` are the blackboard calls recipes make.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import fcntl
import hashlib
import hmac
import http.client
import io
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

VERSION = "0.1.0"

EXIT_OK = 0
EXIT_FAILED = 1  # could not do it now: unreachable service, no value, deadline passed
EXIT_CONFIG = 2  # a retry cannot help: bad home or arguments, request refused by the service
EXIT_REFUSED = 3  # the service refused this node's identity: provision the node again

NAME_RE = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")  # crv.appliance.spec.NAME_PATTERN
KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")  # crv.appliance.spec.ATTRIBUTE_PATTERN
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Inherited variables that look like credentials stay out of recipes: a recipe's output ends
# up in the service and in flow results.
SECRET_ENV_RE = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|AUTH|(^|_)KEY(_|$)", re.I)
PROCESS_TAGS = ("CRV_LOCAL_", "CRV_RACK_")  # inherited by recipes (see recipe_env)
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")

POLL_WAIT = 25  # seconds; the service holds a long poll for at most 30
MAX_JSON_BYTES = 1 << 20
MAX_BUNDLE_BYTES = 64 << 20  # both the download and the unpacked total
MAX_BUNDLE_MEMBERS = 10000
OUTPUT_TAIL = 4096
CLI_DEADLINE = 30.0
DAEMON_BACKOFF = 5.0  # cap, seconds: enrolment waits at most 2 s, a running node may wait longer
KILL_GRACE = 5.0
CHECK_TIMEOUT = 60.0  # seconds for a verify run on the node (crv.engine.stages waits 120)
# The certificate is renewed at about two thirds of the lifetime it had when it arrived, with
# jitter so that a cluster enrolled in one minute does not renew in one second.
RENEW_AT = (0.62, 0.72)
RENEW_RETRY = 30.0  # seconds at most before a failed renewal is tried again
HEARTBEAT = 10.0  # seconds between heartbeats while a recipe runs (the agent does not poll then)
# what a re-joining node signs with its last key ahead of its new CSR (crv.service.app)
REJOIN_CONTEXT = b"crv-rejoin-v1\x00"
# A node clock up to this many seconds off the service's works: every certificate crv issues
# starts 15 min before it was made (crv.service.pki CLOCK_TOLERANCE, SKEW_MARGIN). Beyond it the
# agent says which clock is off and by how much, from the Date of the service's answers.
CLOCK_TOLERANCE = 600.0
# OpenSSL's results for a certificate outside its dates, and the flag that leaves dates
# unchecked (only to ask the service for its time: Service._clock_problem)
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_FLAG_NO_CHECK_TIME = 0x200000


class AgentError(Exception):
    """A failure shown as one line; `exit_code` tells the caller whether a retry can help."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(one_line(message))
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(AgentError):
    exit_code = EXIT_CONFIG


class Refused(AgentError):
    """The service will not accept this node (bad or used token, revoked certificate)."""

    exit_code = EXIT_REFUSED


class Unreachable(AgentError):
    """Network trouble or a restarting service: the one failure worth waiting out."""


class BundleError(AgentError):
    """A recipe bundle that is unsafe or unreadable; nothing of it is installed."""


class CertificateEnded(AgentError):
    """The service's TLS refused this node's certificate as expired: re-join."""


def one_line(text: str, limit: int = 300) -> str:
    """Service answers and OS errors go into logs: no control characters (no forged log
    lines), no unbounded length."""
    text = " ".join(CONTROL_RE.sub(" ", str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sys.stderr.write(f"{stamp} crv-agent: {one_line(message, 1000)}\n")
    sys.stderr.flush()


# --- P-256 and ECDSA ------------------------------------------------------------------------
# Python integers are not constant-time; the exposure is small because a node signs exactly one
# message (its CSR) with the key, and only the enrolment ever sees that signature.

_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_G = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)
_INFINITY = (1, 1, 0)  # Jacobian coordinates: Z = 0


def _double(pt: tuple[int, int, int]) -> tuple[int, int, int]:
    """dbl-2001-b (a = -3)."""
    x, y, z = pt
    if z == 0 or y == 0:
        return _INFINITY
    delta = z * z % _P
    gamma = y * y % _P
    beta = x * gamma % _P
    alpha = 3 * (x - delta) * (x + delta) % _P
    x3 = (alpha * alpha - 8 * beta) % _P
    z3 = ((y + z) * (y + z) - gamma - delta) % _P
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % _P
    return x3, y3, z3


def _add(p1: tuple[int, int, int], p2: tuple[int, int, int]) -> tuple[int, int, int]:
    x1, y1, z1 = p1
    x2, y2, z2 = p2
    if z1 == 0:
        return p2
    if z2 == 0:
        return p1
    z1z1, z2z2 = z1 * z1 % _P, z2 * z2 % _P
    u1, u2 = x1 * z2z2 % _P, x2 * z1z1 % _P
    s1, s2 = y1 * z2 * z2z2 % _P, y2 * z1 * z1z1 % _P
    if u1 == u2:
        return _double(p1) if s1 == s2 else _INFINITY
    h, r = (u2 - u1) % _P, (s2 - s1) % _P
    hh = h * h % _P
    hhh, v = h * hh % _P, u1 * hh % _P
    x3 = (r * r - hhh - 2 * v) % _P
    y3 = (r * (v - x3) - s1 * hhh) % _P
    return x3, y3, h * z1 * z2 % _P


def _multiply(k: int, point: tuple[int, int] = _G) -> tuple[int, int]:
    """Montgomery ladder: one addition and one doubling for each of the 256 bits, whatever
    their value, so the work done does not spell out the scalar."""
    r0, r1 = _INFINITY, (point[0], point[1], 1)
    for i in range(255, -1, -1):
        if (k >> i) & 1:
            r0, r1 = _add(r0, r1), _double(r1)
        else:
            r0, r1 = _double(r0), _add(r0, r1)
    x, y, z = r0
    if z == 0:
        raise ValueError("scalar multiple is the point at infinity")
    zinv = pow(z, -1, _P)
    zinv2 = zinv * zinv % _P
    return x * zinv2 % _P, y * zinv2 * zinv % _P


def _on_curve(point: tuple[int, int]) -> bool:
    x, y = point
    return 0 <= x < _P and 0 <= y < _P and (y * y - x * x * x + 3 * x - _B) % _P == 0


def generate_key() -> tuple[int, tuple[int, int]]:
    """(private scalar, public point). The on-curve check catches an arithmetic fault before
    a broken key is written and certified."""
    d = secrets.randbelow(_N - 1) + 1
    q = _multiply(d)
    if not _on_curve(q):
        raise AssertionError("generated public key is not on P-256")
    return d, q


def ecdsa_sign(d: int, message: bytes) -> tuple[int, int]:
    """ECDSA-SHA256 with a fresh nonce from the OS random source for every signature."""
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")
    while True:
        k = secrets.randbelow(_N - 1) + 1
        r = _multiply(k)[0] % _N
        s = pow(k, -1, _N) * (e + r * d) % _N
        if r and s:
            return r, s


# --- DER, PEM, CSR and key ------------------------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _der_int(value: int) -> bytes:
    """Minimal two's complement: a leading zero byte exactly when the top bit is set."""
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _bit_string(data: bytes) -> bytes:
    return _der(0x03, b"\x00" + data)


def _pem(label: str, der: bytes) -> bytes:
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n").encode()


_OID_P256 = _der_oid("1.2.840.10045.3.1.7")
_EC_ALGORITHM = _seq(_der_oid("1.2.840.10045.2.1"), _OID_P256)  # id-ecPublicKey, prime256v1
_ECDSA_SHA256 = _seq(_der_oid("1.2.840.10045.4.3.2"))  # no parameters (RFC 5758)
_OID_CN = _der_oid("2.5.4.3")
_OID_SAN = _der_oid("2.5.29.17")
_OID_EXTENSION_REQUEST = _der_oid("1.2.840.113549.1.9.14")


def _point(q: tuple[int, int]) -> bytes:
    """Uncompressed SEC1 point; fixed-width coordinates keep their leading zero bytes."""
    return b"\x04" + q[0].to_bytes(32, "big") + q[1].to_bytes(32, "big")


def make_csr(node: str | None, key: tuple[int, tuple[int, int]]) -> bytes:
    """PKCS#10 with CN=node and SAN DNS:node, nothing else: the CA takes every other name from
    the plan and refuses CSRs that ask for more. No node (pairing: the service names it): no
    names at all."""
    if node is not None and not NAME_RE.fullmatch(node):
        raise ConfigError(f"bad node name {node!r}")
    d, q = key
    spki = _seq(_EC_ALGORITHM, _bit_string(_point(q)))
    if node is None:
        subject, attributes = _seq(), _der(0xA0, b"")
    else:
        name = node.encode("ascii")
        subject = _seq(_der(0x31, _seq(_OID_CN, _der(0x0C, name))))
        extensions = _seq(_seq(_OID_SAN, _der(0x04, _seq(_der(0x82, name)))))
        attributes = _der(0xA0, _seq(_OID_EXTENSION_REQUEST, _der(0x31, extensions)))
    info = _seq(_der_int(0), subject, spki, attributes)
    r, s = ecdsa_sign(d, info)
    return _pem(
        "CERTIFICATE REQUEST",
        _seq(info, _ECDSA_SHA256, _bit_string(_seq(_der_int(r), _der_int(s)))),
    )


def der_signature(signature: tuple[int, int]) -> bytes:
    """ECDSA-Sig-Value (RFC 3279): SEQUENCE of the two integers."""
    return _seq(_der_int(signature[0]), _der_int(signature[1]))


def _der_read(data: bytes, at: int) -> tuple[int, bytes, int]:
    """(tag, content, offset after it) of the DER element at `at`."""
    if at + 2 > len(data):
        raise ValueError("truncated DER")
    tag, size, at = data[at], data[at + 1], at + 2
    if size & 0x80:
        count = size & 0x7F
        if count == 0 or count > 4 or at + count > len(data):
            raise ValueError("bad DER length")
        size, at = int.from_bytes(data[at : at + count], "big"), at + count
    if at + size > len(data):
        raise ValueError("truncated DER")
    return tag, data[at : at + size], at + size


def load_key(path: Path) -> tuple[int, tuple[int, int]]:
    """The key `key_pem` wrote (SEC1 P-256): what a re-join signs with. The public point is
    computed again from the scalar, so a damaged file cannot sign for another key."""
    try:
        text = path.read_text(encoding="ascii")
        body = text.split("-----BEGIN EC PRIVATE KEY-----")[1].split("-----END")[0]
        tag, seq, _ = _der_read(base64.b64decode("".join(body.split())), 0)
        _, version, at = _der_read(seq, 0)
        octet, secret, _ = _der_read(seq, at)
        if tag != 0x30 or version != b"\x01" or octet != 0x04 or len(secret) != 32:
            raise ValueError("not a SEC1 P-256 key")
        d = int.from_bytes(secret, "big")
        if not 0 < d < _N:
            raise ValueError("scalar out of range")
    except (OSError, IndexError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the node key: {e}") from None
    return d, _multiply(d)


def key_pem(key: tuple[int, tuple[int, int]]) -> bytes:
    """SEC1 (RFC 5915) with the curve and public key included, the form OpenSSL writes and
    `ssl.SSLContext.load_cert_chain` reads."""
    d, q = key
    der = _seq(
        _der_int(1),
        _der(0x04, d.to_bytes(32, "big")),
        _der(0xA0, _OID_P256),
        _der(0xA1, _bit_string(_point(q))),
    )
    return _pem("EC PRIVATE KEY", der)


# --- files ----------------------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Readers see the old file or the whole new one, and the file never exists with a wider
    mode: it is created with `mode` (O_EXCL, never chmod-ed later) and renamed into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(str(tmp), str(path))
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def load_bootstrap(home: Path) -> dict:
    path = home / "bootstrap.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError:
        raise ConfigError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    for field in ("service", "ca", "ca_sha256", "cluster", "node"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise ConfigError(f"{path}: {field!r} is missing or not a string")
    for field in ("cluster", "node"):
        if not NAME_RE.fullmatch(data[field]):
            raise ConfigError(f"{path}: bad {field} name {data[field]!r}")
    url = urllib.parse.urlsplit(data["service"])
    if url.scheme != "https" or not url.hostname:
        raise ConfigError(f"{path}: service {data['service']!r} is not an https:// URL")
    return data


def install_ca(home: Path, boot: dict) -> Path:
    """Trusts only the certificate whose fingerprint the pool pinned: the bootstrap channel
    (user-data, kernel command line) may be readable or writable by others. What is written
    is re-encoded from the checked DER, so nothing else smuggled into `ca` is trusted."""
    try:
        der = ssl.PEM_cert_to_DER_cert(boot["ca"].strip())
    except ValueError:
        raise ConfigError("bootstrap.json: 'ca' is not a PEM certificate") from None
    pinned = boot["ca_sha256"].strip().lower().replace(":", "")
    if not hmac.compare_digest(hashlib.sha256(der).hexdigest(), pinned):
        raise ConfigError("bootstrap.json: the CA does not match ca_sha256; not trusting it")
    path = home / "ca.crt"
    write_file(path, ssl.DER_cert_to_PEM_cert(der).encode("ascii"), 0o644)
    return path


# A network-booted machine (bare metal) has no user-data: its bootstrap comes on the kernel
# command line as crv.KEY=VALUE words. The line is short (2 KiB on x86), so it carries the CA's
# fingerprint, not the CA: the CA is fetched from the service and trusted only if it matches.
CMDLINE_KEYS = ("service", "ca_sha256", "cluster", "node", "token", "callback")
CMDLINE_VALUE_RE = re.compile(r"[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]{1,512}")


def parse_cmdline(text: str) -> dict:
    """The crv.* words of a kernel command line; anything else on it is the OS's business."""
    boot = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if not key.startswith("crv.") or not sep:
            continue
        name = key[4:]
        if name not in CMDLINE_KEYS:
            raise ConfigError(f"kernel command line: unknown parameter {key!r}")
        if not CMDLINE_VALUE_RE.fullmatch(value):
            raise ConfigError(f"kernel command line: {key} has characters a URL or name lacks")
        boot[name] = value
    return boot


def fetch_ca(service_url: str, deadline: float) -> str:
    """The service's CA certificate, over TLS that cannot be verified yet: what comes back is
    trusted only after install_ca has matched it against the pinned fingerprint."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    service = Service(service_url, context)
    resp = call_once(service, "could not fetch the CA", "GET", "/v1/ca", deadline, limit=64 << 10)
    if resp.status != 200:
        raise Refused(f"GET /v1/ca: {resp.detail()}")
    return resp.body.decode("ascii", "replace")


def bootstrap_from_cmdline(home: Path, cmdline: Path, deadline: float) -> None:
    """Writes bootstrap.json from the kernel command line, once: after a restart the file (with
    the token scrubbed) is what counts, never the command line's spent token."""
    if (home / "bootstrap.json").exists():
        return
    try:
        text = cmdline.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError(f"{cmdline}: cannot read: {e.strerror or e}") from None
    boot = parse_cmdline(text)
    for field in ("service", "ca_sha256", "cluster", "node", "token"):
        if field not in boot:
            raise ConfigError(f"{cmdline}: no crv.{field}= on the kernel command line")
    boot["ca"] = fetch_ca(boot["service"], deadline)
    write_file(home / "bootstrap.json", json.dumps(boot, indent=1).encode(), 0o600)


def call_back(home: Path, boot: dict, deadline: float) -> None:
    """Tells whoever booted this machine (the bare-metal pool's boot service) that it came up
    and enrolled, so the machine is not written off as one that never booted. Best effort: the
    service already knows the node enrolled; the URL carries a one-boot nonce."""
    url = boot.get("callback")
    if not url:
        return
    parts = urllib.parse.urlsplit(url)
    backoff = Backoff(cap=2.0)
    while True:
        try:
            https = parts.scheme == "https"
            kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
            conn = kind(parts.hostname, parts.port, timeout=10)
            try:
                target = parts.path + (f"?{parts.query}" if parts.query else "")
                conn.request("POST", target, body=b"", headers={"User-Agent": "crv-agent"})
                status = conn.getresponse().status
            finally:
                conn.close()
            if status < 500:
                if status >= 300:
                    log(f"the boot service answered the call-back with HTTP {status}")
                break
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() + 1 > deadline:
                log(f"could not call back the boot service: {e}")
                break
        time.sleep(backoff.next())
    del boot["callback"]
    write_file(home / "bootstrap.json", json.dumps(boot, indent=1).encode(), 0o600)


def forget_token(home: Path, boot: dict) -> None:
    """The token is single-use; once enrolled it is only something to steal."""
    if "token" in boot:
        del boot["token"]
        write_file(home / "bootstrap.json", json.dumps(boot, indent=1).encode(), 0o600)


def identity_ok(cert: Path, key: Path) -> bool:
    """True when the pair exists and the key matches the certificate (what TLS will need)."""
    if not (cert.is_file() and key.is_file()):
        return False
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError):
        return False
    return True


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Trusts the crv CA only (no system roots) and checks the service's host name."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load the TLS identity in {ca.parent}: {e}") from None
    return ctx


# --- the service ----------------------------------------------------------------------------


class Response(NamedTuple):
    status: int
    headers: dict
    body: bytes

    def json(self) -> dict:
        try:
            data = json.loads(self.body.decode("utf-8"))
        except ValueError:
            raise AgentError(
                f"the service sent {self.status} with a body that is not JSON"
            ) from None
        if not isinstance(data, dict):
            raise AgentError(f"the service sent {self.status} with a body that is not an object")
        return data

    def detail(self) -> str:
        try:
            detail = json.loads(self.body.decode("utf-8")).get("detail")
        except (ValueError, AttributeError):
            detail = None
        return one_line(detail if isinstance(detail, str) else f"HTTP {self.status}")


class _Connection(http.client.HTTPSConnection):
    def connect(self) -> None:
        """Small requests and answers back to back: without TCP_NODELAY each one can wait
        40 ms for a delayed ACK. CPython sets it too but ignores failure; we want to know."""
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Service:
    """The crv service over one kept-alive HTTPS connection: a thousand agents long-polling
    must not cost a TLS handshake per request."""

    def __init__(self, url: str, context: ssl.SSLContext) -> None:
        parts = urllib.parse.urlsplit(url)
        self.where = f"{parts.hostname}:{parts.port or 443}"
        self._host, self._port = parts.hostname, parts.port or 443
        self._prefix = parts.path.rstrip("/")
        self._context = context
        self._conn: _Connection | None = None
        self._clock_note: tuple[int, float, str] | None = None  # (verify code, until, line)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        timeout: float = 30.0,
        limit: int = MAX_JSON_BYTES,
    ) -> Response:
        """Raises Unreachable for anything below HTTP. A kept-alive connection the service
        closed while idle fails on first use: that one attempt is repeated on a fresh
        connection (every request the agent makes is idempotent)."""
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json", "User-Agent": "crv-agent/" + VERSION}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        while True:
            reused = self._conn is not None
            try:
                return self._exchange(method, path, payload, headers, timeout, limit)
            except ssl.SSLError as e:
                self.close()
                if "CERTIFICATE_EXPIRED" in str(e).upper().replace(" ", "_"):
                    raise CertificateEnded(f"{self.where}: {e}") from None
                code = getattr(e, "verify_code", None)
                if code in (X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED):
                    raise Unreachable(f"{self.where}: {self._clock_problem(code)}") from None
                if not reused:
                    raise Unreachable(f"{self.where}: {str(e) or type(e).__name__}") from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if not reused:
                    raise Unreachable(f"{self.where}: {str(e) or type(e).__name__}") from None

    def _exchange(
        self,
        method: str,
        path: str,
        payload: bytes | None,
        headers: dict,
        timeout: float,
        limit: int,
    ) -> Response:
        if self._conn is None:
            self._conn = _Connection(self._host, self._port, timeout=timeout, context=self._context)
        conn = self._conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        conn.request(method, self._prefix + path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise AgentError(f"{method} {path}: answer larger than {limit} bytes")
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)

    def _clock_problem(self, code: int) -> str:
        """The service's certificate (or its CA) is not valid yet, or has expired, by this
        node's clock: say whether this clock is off and by how much (F14). The line is kept a
        minute, so a caller retrying meanwhile logs it once."""
        note = self._clock_note
        if note is not None and note[0] == code and time.monotonic() < note[1]:
            return note[2]
        state = "has expired" if code == X509_V_ERR_CERT_HAS_EXPIRED else "is not valid yet"
        try:
            date = self._service_date()
            skew = clock_skew(date)
        except (OSError, http.client.HTTPException, TypeError, ValueError, OverflowError):
            mine = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            text = (
                f"the service's certificate {state} by this node's clock ({mine}); is the "
                "clock right? (NTP)"
            )
        else:
            if abs(skew) >= 60:
                text = (
                    f"this node's clock is {_span(skew)} {'behind' if skew > 0 else 'ahead of'} "
                    f"the service's (service Date: {date}): the service's certificate {state} "
                    "by this clock; set this node's clock (NTP)"
                )
            else:
                text = (
                    f"the service's certificate {state} although this node's clock agrees with "
                    f"the service's (service Date: {date}): renew the certificate on the service"
                )
        self._clock_note = (code, time.monotonic() + 60, one_line(text))
        return self._clock_note[2]

    def _service_date(self) -> str:
        """The Date of the service's GET /v1/health answer, over TLS that checks the same pinned
        CA and host name and leaves only the certificates' dates unchecked: what it learns goes
        into a log line and nothing else."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # host name and chain; no system roots
        for der in self._context.get_ca_certs(binary_form=True):
            context.load_verify_locations(cadata=der)
        context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
        conn = http.client.HTTPSConnection(self._host, self._port, timeout=10, context=context)
        try:
            headers = {"User-Agent": "crv-agent/" + VERSION}
            conn.request("GET", self._prefix + "/v1/health", headers=headers)
            resp = conn.getresponse()
            resp.read(MAX_JSON_BYTES)
            date = resp.getheader("Date")
        finally:
            conn.close()
        if not date:
            raise ValueError("no Date header")
        return str(date)


def clock_skew(date: str) -> float:
    """Seconds this node's clock is behind the service's (negative: ahead), from the Date of
    an answer (whole seconds: half a second added)."""
    return email.utils.mktime_tz(email.utils.parsedate_tz(date)) + 0.5 - time.time()


def _span(seconds: float) -> str:
    """2:00:00, 0:10:00, 1 d 3:00:00."""
    days, rest = divmod(round(abs(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days} d " if days else "") + f"{hours}:{minutes:02}:{secs:02}"


def check_clock(resp: Response) -> None:
    """One line when this node's clock is further off the service's (the Date of its answer)
    than crv tolerates. The service still talks to it, but a node behind may find fresh
    certificates (its own, its peers') not valid yet, and a node ahead its peers' ended before
    they are renewed."""
    date = resp.headers.get("date", "")
    try:
        skew = clock_skew(date)
    except (TypeError, ValueError, OverflowError):
        return
    if abs(skew) <= CLOCK_TOLERANCE + 1:  # the Date and the way here: a second or so
        return
    if skew > 0:
        where, risk = "behind", "fresh certificates (its own, its peers') may look not valid yet"
    else:
        where, risk = "ahead of", "its peers' certificates may look ended before they are renewed"
    log(
        f"this node's clock is {_span(skew)} {where} the service's (service Date: {date}), more "
        f"than the {_span(CLOCK_TOLERANCE)} crv tolerates: {risk}; set this node's clock (NTP)"
    )


class Backoff:
    """Exponential with jitter, so that a thousand agents whose service restarted do not all
    come back in the same millisecond."""

    def __init__(self, first: float = 0.25, cap: float = 2.0) -> None:
        self.first, self.cap, self._delay = first, cap, first

    def next(self) -> float:
        delay, self._delay = self._delay, min(self._delay * 2, self.cap)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._delay = self.first


def _retry_after(resp: Response) -> float | None:
    try:
        return min(max(float(resp.headers.get("retry-after", "")), 0.0), 60.0)
    except ValueError:
        return None


def call_once(
    service: Service,
    failing: str,
    method: str,
    path: str,
    deadline: float,
    body: dict | None = None,
    **options: object,
) -> Response:
    """`call` on a connection used for this one request (closed after it); a service that
    stays unreachable until the deadline is reported as `<failing> before the deadline`."""
    try:
        return call(service, method, path, body, deadline=deadline, **options)
    except Unreachable as e:
        raise Unreachable(f"{failing} before the deadline: {e}") from None
    finally:
        service.close()


def call(
    service: Service,
    method: str,
    path: str,
    body: dict | None = None,
    *,
    deadline: float | None = None,
    retry_statuses: tuple = (),
    timeout: float = 30.0,
    limit: int = MAX_JSON_BYTES,
    backoff_cap: float = 2.0,
    ended: Callable[[], bool] | None = None,
) -> Response:
    """The first answer that is not worth waiting out. Network errors, 5xx and
    `retry_statuses` are retried with backoff (Retry-After wins when the service sends it)
    until `deadline` (a time.monotonic() value; None: forever). `ended` (a node's call): a
    network error once the certificate has ended by this node's clock is CertificateEnded,
    not one more retry: a service refusing an ended certificate may reset the connection
    instead of sending the TLS alert that says so (seen after a 200 s freeze)."""
    backoff, last = Backoff(cap=backoff_cap), ""
    while True:
        try:
            resp = service.request(method, path, body, timeout=timeout, limit=limit)
            if resp.status < 500 and resp.status not in retry_statuses:
                return resp
            reason, delay = f"{method} {path}: {resp.detail()}", _retry_after(resp)
        except Unreachable as e:
            if ended is not None and ended():
                raise CertificateEnded(f"{e}; the certificate has ended") from None
            reason, delay = str(e), None
        if delay is None:
            delay = backoff.next()
        if deadline is not None and time.monotonic() + delay > deadline:
            raise Unreachable(reason)
        if reason != last:
            log(f"{reason}; retrying")
            last = reason
        time.sleep(delay)


def _raise_for_node(resp: Response, what: str) -> None:
    """Node routes: 401/403/404 mean the service no longer knows or trusts this node."""
    if resp.status in (401, 403, 404):
        raise Refused(f"{what}: {resp.detail()}")
    if not 200 <= resp.status < 300:
        raise AgentError(f"{what}: {resp.detail()}")


# --- enrolment ------------------------------------------------------------------------------


def enrol(home: Path, boot: dict, deadline: float) -> None:
    """Key made on the node, CSR + token to the service, certificate back. A restart after a
    crash finds a valid pair and skips this (the token is spent by then). The key and the CSR
    are kept until the certificate arrives: if the answer is lost (the connection dropped, the
    agent killed), the same token and CSR again get the same certificate."""
    recover_identity(home)
    cert, key_path, csr_path = home / "node.crt", home / "node.key", home / "node.csr"
    if identity_ok(cert, key_path):
        forget_token(home, boot)  # a crash may have come between the cert and the scrub
        log(f"already enrolled as {boot['node']}")
        return
    token = boot.get("token")
    if not isinstance(token, str) or not token:
        raise Refused("not enrolled and no bootstrap token left (it is single-use)")
    if key_path.is_file() and csr_path.is_file():
        csr = csr_path.read_bytes()
    else:
        key = generate_key()
        write_file(key_path, key_pem(key), 0o600)
        csr = make_csr(boot["node"], key)
        write_file(csr_path, csr, 0o600)
    body = {
        "cluster": boot["cluster"],
        "node": boot["node"],
        "token": token,
        "csr": csr.decode("ascii"),
    }
    service = Service(boot["service"], tls_context(home / "ca.crt"))
    resp = call_once(
        service, "not enrolled", "POST", "/v1/enrol", deadline, body, retry_statuses=(409,)
    )
    if resp.status != 200:
        raise Refused(f"enrolment refused: {resp.detail()}")
    pem, expires_in = _issued(home, resp)
    write_file(cert, pem.encode("ascii"), 0o644)
    if not identity_ok(cert, key_path):
        raise Refused("the certificate the service issued does not match the node key")
    schedule_renewal(home, expires_in)
    forget_token(home, boot)
    with contextlib.suppress(FileNotFoundError):
        csr_path.unlink()
    log(f"enrolled as {boot['node']} in cluster {boot['cluster']}")


def pair(
    home: Path, url: str, pin: str, ca_sha256: str, address: str | None, deadline: float
) -> None:
    """Join a cluster with a one-time PIN from `crv pair` (a machine crv did not make): trust
    the service's CA only if it has the fingerprint printed next to the PIN, make a key here
    and a CSR without names, and send them with the PIN; the service names the node and
    answers with its certificate. bootstrap.json (no token: the PIN is spent) is written
    before the certificate, and the key and CSR are kept until it arrives, so that pairing
    again after a lost answer gets the same certificate; a paired home pairs no more."""
    recover_identity(home)
    cert, key_path, csr_path = home / "node.crt", home / "node.key", home / "node.csr"
    if (home / "bootstrap.json").is_file() and identity_ok(cert, key_path):
        boot = load_bootstrap(home)
        log(f"already paired as {boot['node']} of cluster {boot['cluster']}")
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"service {url!r} is not an https:// URL")
    pinned = ca_sha256.strip().lower().replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", pinned):
        raise ConfigError("--ca-sha256: not a SHA-256 fingerprint (64 hex digits)")
    ca = fetch_ca(url, deadline)
    install_ca(home, {"ca": ca, "ca_sha256": pinned})
    if key_path.is_file() and csr_path.is_file():
        csr = csr_path.read_bytes()
    else:
        key = generate_key()
        write_file(key_path, key_pem(key), 0o600)
        csr = make_csr(None, key)
        write_file(csr_path, csr, 0o600)
    body = {"pin": pin, "csr": csr.decode("ascii"), "address": address}
    service = Service(url, tls_context(home / "ca.crt"))
    resp = call_once(service, "not paired", "POST", "/v1/pair", deadline, body)
    if resp.status != 200:
        raise Refused(f"pairing refused: {resp.detail()}")
    data = resp.json()
    cluster, node = data.get("cluster"), data.get("node")
    if not (isinstance(cluster, str) and NAME_RE.fullmatch(cluster)):
        raise Refused("the service's pairing answer has no cluster name")
    if not (isinstance(node, str) and NAME_RE.fullmatch(node)):
        raise Refused("the service's pairing answer has no node name")
    pem, expires_in = _issued(home, resp)
    boot = {"service": url, "ca": ca, "ca_sha256": pinned, "cluster": cluster, "node": node}
    write_file(home / "bootstrap.json", json.dumps(boot, indent=1).encode(), 0o600)
    write_file(cert, pem.encode("ascii"), 0o644)
    if not identity_ok(cert, key_path):
        raise Refused("the certificate the service issued does not match the node key")
    schedule_renewal(home, expires_in)
    with contextlib.suppress(FileNotFoundError):
        csr_path.unlink()
    log(f"paired as {node} of cluster {cluster}")


def _issued(home: Path, resp: Response) -> tuple:
    """(certificate PEM, seconds it has left) of an enrol, renew or re-join answer; the
    cluster's CA bundle in it is written to cluster-ca.crt (CRV_CLUSTER_CA_FILE)."""
    check_clock(resp)
    data = resp.json()
    pem, left = data.get("certificate"), data.get("expires_in")
    if not isinstance(pem, str) or not pem.startswith("-----BEGIN CERTIFICATE-----"):
        raise Refused("the service's answer has no PEM certificate")
    if isinstance(left, bool) or not isinstance(left, (int, float)) or left <= 0:
        raise AgentError("the service's answer has no positive expires_in")
    bundle = data.get("cluster_ca")
    if isinstance(bundle, str) and bundle.startswith("-----BEGIN CERTIFICATE-----"):
        write_file(home / "cluster-ca.crt", bundle.encode("ascii"), 0o644)
    return pem, float(left)


# --- the node's identity over time: renewal and re-joining ----------------------------------


def schedule_renewal(home: Path, expires_in: float) -> dict:
    """When to renew and when the certificate ends, on this node's own clock: both are
    counted from now with the lifetime the service said is left, so a node whose clock is
    off by hours still renews in time."""
    at = time.time()
    schedule = {
        "renew_at": at + expires_in * random.uniform(*RENEW_AT),
        "expires_at": at + expires_in,
    }
    write_file(home / "identity.json", json.dumps(schedule).encode(), 0o600)
    return schedule


def load_schedule(home: Path) -> dict:
    """No schedule (an agent from before renewal, a crash before it was written): renew at
    once; if the certificate turns out to have ended, re-join."""
    try:
        data = json.loads((home / "identity.json").read_text(encoding="utf-8"))
        if all(isinstance(data.get(k), (int, float)) for k in ("renew_at", "expires_at")):
            return {"renew_at": float(data["renew_at"]), "expires_at": float(data["expires_at"])}
    except (OSError, ValueError, AttributeError):
        pass
    return {"renew_at": 0.0, "expires_at": float("inf")}


def recover_identity(home: Path) -> None:
    """Finish or drop a renewal cut short. The new pair is written as next.key + next.crt,
    then moved over node.key, then node.crt: whatever moment the agent was killed at, this
    leaves a matching pair in node.key + node.crt (the old one or the new one)."""
    next_key, next_crt = home / "next.key", home / "next.crt"
    if next_crt.is_file():
        if next_key.is_file() and identity_ok(next_crt, next_key):
            os.replace(str(next_key), str(home / "node.key"))
            os.replace(str(next_crt), str(home / "node.crt"))
            log("finished a renewal that was cut short")
        elif identity_ok(next_crt, home / "node.key"):
            os.replace(str(next_crt), str(home / "node.crt"))
            log("finished a renewal that was cut short")
    for leftover in (next_key, next_crt):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


class Identity:
    """The node's key and certificate: renewed before they end, re-joined after. Shared by the
    main loop and the keeper thread that runs while a recipe does (one lock)."""

    def __init__(self, home: Path, boot: dict) -> None:
        self.home, self.boot = home, boot
        self.lock = threading.RLock()
        self.version = 0  # bumped at every new certificate: services made before are stale
        self.changed = threading.Event()  # a new certificate the roles' renew hooks have not seen
        self._main: Service | None = None  # the main loop's connection, and its version
        self._main_version = -1
        recover_identity(home)
        self.schedule = load_schedule(home)

    def call(self, method: str, path: str, body: dict | None = None, **options: object) -> Response:
        """A node call on the main loop's kept-alive connection, made with the current
        certificate: after a renewal or a re-join (perhaps by the keeper thread meanwhile,
        which supersedes the old certificate) on a new connection, and again once if it was
        refused in between. An ended certificate (the TLS alert, or 401 'expired' on a
        connection opened before it ended) re-joins first."""
        resp = None
        for _ in range(3):
            version = self.version
            with self.lock:
                if self._main is None or self._main_version != version:
                    if self._main is not None:
                        self._main.close()
                    self._main, self._main_version = self.service(), version
                service = self._main
            try:
                resp = call(service, method, path, body, ended=self.ended, **options)
                if resp.status == 401 and "expired" in resp.detail():
                    raise CertificateEnded(f"{method} {path}: {resp.detail()}")
            except CertificateEnded:
                with self.lock:
                    if self.version == version:  # nobody re-joined meanwhile
                        self.rejoin("the service says it has ended")
                continue
            if resp.status in (401, 403) and self.version != version:
                continue
            return resp
        if resp is None:
            raise AgentError(f"{method} {path}: the certificate ended again and again")
        return resp

    def context(self) -> ssl.SSLContext:
        files = [self.home / n for n in ("ca.crt", "node.crt", "node.key")]
        return tls_context(*files)

    def service(self) -> Service:
        return Service(self.boot["service"], self.context())

    def ended(self) -> bool:
        """The certificate has ended, by this node's clock (its schedule)."""
        return time.time() >= self.schedule["expires_at"]

    def seconds_left(self) -> float:
        """Until the renewal is due (0 when it is)."""
        return max(0.0, self.schedule["renew_at"] - time.time())

    def keep(self) -> bool:
        """Renew when due, re-join when the certificate has ended; True when the certificate
        changed. A renewal that cannot reach the service is tried again later: the current
        certificate still has a third of its life."""
        with self.lock:
            now = time.time()
            if now >= self.schedule["expires_at"]:
                self.rejoin("it ended while the agent was stopped or cut off")
                return True
            if now < self.schedule["renew_at"]:
                return False
            try:
                self.renew()
            except CertificateEnded:
                self.rejoin("the service says it has ended")
            except Refused:
                raise
            except AgentError as e:
                left = self.schedule["expires_at"] - now
                self.schedule["renew_at"] = now + min(RENEW_RETRY, max(1.0, left / 10))
                log(f"renewal failed ({e}); trying again in {self.seconds_left():.0f} s")
                return False
            return True

    def renew(self) -> None:
        """A fresh key made here, a CSR for it, sent over mutual TLS with the current one."""
        key = generate_key()
        write_file(self.home / "next.key", key_pem(key), 0o600)
        csr = make_csr(self.boot["node"], key).decode("ascii")
        service = self.service()
        try:
            deadline = time.monotonic() + 60
            resp = call(service, "POST", "/v1/renew", {"csr": csr}, deadline=deadline)
        finally:
            service.close()
        _raise_for_node(resp, "POST /v1/renew")
        self._install(resp)
        log(f"renewed the certificate; next renewal in {self.seconds_left():.0f} s")

    def rejoin(self, why: str) -> None:
        """The certificate ended while this node was off, frozen or cut off: prove to the
        service that this is the node it certified (its last certificate, and a signature
        with that certificate's key over the new CSR) and get a new one. Refused when the
        node is no longer a member, the certificate was revoked or ended too long ago: then
        only `crv repair` (which makes the node again) brings it back."""
        log(f"the certificate has ended ({why}); re-joining")
        old = load_key(self.home / "node.key")
        certificate = (self.home / "node.crt").read_text(encoding="ascii")
        key = generate_key()
        write_file(self.home / "next.key", key_pem(key), 0o600)
        csr = make_csr(self.boot["node"], key)
        signature = der_signature(ecdsa_sign(old[0], REJOIN_CONTEXT + csr))
        body = {
            "cluster": self.boot["cluster"],
            "node": self.boot["node"],
            "certificate": certificate,
            "csr": csr.decode("ascii"),
            "signature": base64.b64encode(signature).decode("ascii"),
        }
        service = Service(self.boot["service"], tls_context(self.home / "ca.crt"))
        try:
            resp = call(service, "POST", "/v1/rejoin", body, backoff_cap=DAEMON_BACKOFF)
        finally:
            service.close()
        if resp.status != 200:
            raise Refused(f"{resp.detail()}; `crv repair {self.boot['cluster']}` remakes the node")
        self._install(resp)
        log(f"re-joined cluster {self.boot['cluster']}")

    def _install(self, resp: Response) -> None:
        """next.key is written; write next.crt, check the pair, then move both into place
        (recover_identity finishes this after a kill)."""
        pem, expires_in = _issued(self.home, resp)
        next_key, next_crt = self.home / "next.key", self.home / "next.crt"
        write_file(next_crt, pem.encode("ascii"), 0o644)
        if not identity_ok(next_crt, next_key):
            raise Refused("the certificate the service issued does not match the new key")
        os.replace(str(next_key), str(self.home / "node.key"))
        os.replace(str(next_crt), str(self.home / "node.crt"))
        self.schedule = schedule_renewal(self.home, expires_in)
        self.version += 1
        self.changed.set()


class Keeper:
    """While a recipe runs the agent does not poll: this thread keeps the node's certificate
    renewed and tells the service the node is alive (a change waiting on the node then knows
    a long recipe from a dead node)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crv-keeper", daemon=True)

    def __enter__(self) -> Keeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                self.identity.keep()
                service = self.identity.service()
                try:
                    call(service, "POST", "/v1/alive", deadline=time.monotonic() + HEARTBEAT)
                finally:
                    service.close()
            except Refused as e:
                log(f"heartbeat: {e}")
                return
            except AgentError as e:
                log(f"heartbeat: {e}")


# --- recipe bundles -------------------------------------------------------------------------


def _member_parts(name: str) -> list:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise BundleError(f"unsafe name {name!r} in the recipe bundle")
    return parts


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """O_EXCL: a name seen twice is an error, never an overwrite. The mode is set with fchmod
    so that the umask cannot drop the executable bit a recipe needs."""
    mode = 0o755 if member.mode & 0o111 else 0o644
    source = tar.extractfile(member)
    fd = os.open(str(target), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)
        if source is not None:
            shutil.copyfileobj(source, out)


def extract_bundle(data: bytes, dest: Path, max_bytes: int = MAX_BUNDLE_BYTES) -> None:
    """Unpacks a gzip tar into `dest` (created; it must not exist). Only regular files and
    directories under `dest`: no absolute names, no `..`, no links or devices, at most
    `max_bytes` in all, because the bundle decides what runs as the agent's user. Files are
    written by hand rather than by tarfile.extract so that no owner, time or mode from the
    archive applies except the executable bit."""
    dest.mkdir(mode=0o755)
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|gz") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_BUNDLE_MEMBERS:
                    raise BundleError(f"more than {MAX_BUNDLE_MEMBERS} entries in the bundle")
                target = dest.joinpath(*_member_parts(member.name))
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                elif member.isreg() and not member.issparse() and target != dest:
                    total += member.size
                    if total > max_bytes:
                        raise BundleError(f"bundle unpacks to more than {max_bytes} bytes")
                    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    _write_member(tar, member, target)
                else:
                    raise BundleError(
                        f"{member.name!r} in the recipe bundle is not a regular file or directory"
                    )
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        raise BundleError(f"unreadable recipe bundle: {str(e) or type(e).__name__}") from None


def _replace_dir(staging: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(str(old), ignore_errors=True)
    if final.exists():
        os.rename(str(final), str(old))
    os.rename(str(staging), str(final))
    shutil.rmtree(str(old), ignore_errors=True)


def sync_bundle(identity: Identity, home: Path, state: dict, wanted: str) -> None:
    """Fetches the recipes when the service's bundle differs from ours. The whole appliance
    directory is kept (recipes source their libraries through CRV_APPLIANCE_DIR)."""
    final = home / "appliance"
    if not wanted or (wanted == state.get("bundle") and final.is_dir()):
        return
    resp = identity.call(
        "GET",
        "/v1/recipes",
        timeout=120.0,
        limit=MAX_BUNDLE_BYTES,
        backoff_cap=DAEMON_BACKOFF,
    )
    _raise_for_node(resp, "GET /v1/recipes")
    digest = hashlib.sha256(resp.body).hexdigest()
    announced = resp.headers.get("x-crv-bundle", digest).strip().lower()
    if digest != announced:
        raise BundleError(f"recipe bundle sha256 {digest}, the service announced {announced}")
    staging = home / "appliance.new"
    shutil.rmtree(str(staging), ignore_errors=True)
    extract_bundle(resp.body, staging)
    _replace_dir(staging, final)
    state["bundle"] = digest
    save_state(home, state)
    log(f"recipes updated to bundle {digest[:12]}")


# --- work and recipes -----------------------------------------------------------------------


class Role(NamedTuple):
    role: str
    release: int
    recipe: str
    appdir: str
    env: dict
    renew: str | None = None  # after a renewal: "rerun" the recipe, or run this recipe
    check: dict | None = None  # a verify to run here and report: {id, command}


class Work(NamedTuple):
    generation: int
    group: str
    address: str
    stop: bool
    bundle: str
    roles: list


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_work(data: dict) -> Work:
    """Checks every field the agent acts on: role names become file names, env goes to
    processes, so nothing is used unchecked."""
    items = data.get("roles")
    if not isinstance(items, list):
        raise AgentError("malformed /v1/work answer: no roles list")
    roles = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("role"), str)):
            raise AgentError("malformed /v1/work answer: bad roles entry")
        if not (NAME_RE.fullmatch(item["role"]) and _int(item.get("release"))):
            raise AgentError(f"malformed /v1/work answer: bad role {item['role']!r}")
        env = item.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and ENV_NAME_RE.fullmatch(k) and isinstance(v, str) and "\0" not in v
            for k, v in env.items()
        ):
            raise AgentError(f"malformed /v1/work answer: bad env of role {item['role']}")
        recipe, appdir = item.get("recipe"), item.get("appdir")
        if not (isinstance(recipe, str) and isinstance(appdir, str)):
            raise AgentError(f"malformed /v1/work answer: role {item['role']} has no recipe")
        renew = item.get("renew")
        if renew is not None and not isinstance(renew, str):
            raise AgentError(f"malformed /v1/work answer: bad renew of role {item['role']}")
        check = item.get("check")
        if check is not None and not (
            isinstance(check, dict)
            and _int(check.get("id"))
            and isinstance(check.get("command"), str)
            and "\0" not in check["command"]
        ):
            raise AgentError(f"malformed /v1/work answer: bad check of role {item['role']}")
        roles.append(Role(item["role"], item["release"], recipe, appdir, env, renew, check))
    if not (_int(data.get("generation")) and isinstance(data.get("stop", False), bool)):
        raise AgentError("malformed /v1/work answer: bad generation or stop")
    return Work(
        data["generation"],
        str(data.get("group") or ""),
        str(data.get("address") or ""),
        data.get("stop", False),
        str(data.get("bundle") or ""),
        roles,
    )


def inside(base: Path, relative: str) -> Path:
    """A path from the service, kept under `base`."""
    rel = PurePosixPath(relative)
    if not relative or rel.is_absolute() or ".." in rel.parts:
        raise AgentError(f"path {relative!r} leaves the appliance directory")
    return base.joinpath(*rel.parts)


def agent_bin(home: Path) -> Path:
    """The directory whose `crv-agent` is this very agent, for the recipes' PATH: its own
    directory when a pool installed it under that name, else `home/bin` (see install_shim)."""
    this = Path(__file__).absolute()
    return this.parent if this.name == "crv-agent" else home / "bin"


def install_shim(home: Path) -> None:
    """Started under another name (`python3 crv_agent.py`), the agent puts a `crv-agent` in
    `home/bin` that runs the same file with the same interpreter. It never writes over the
    agent itself."""
    this = Path(__file__).absolute()
    shim = agent_bin(home) / "crv-agent"
    if shim.parent == this.parent or (shim.exists() and shim.samefile(this)):
        return
    shim.parent.mkdir(mode=0o755, exist_ok=True)
    python = sys.executable or "python3"
    script = f'#!/bin/sh\nexec {shlex.quote(python)} {shlex.quote(str(this))} "$@"\n'
    write_file(shim, script.encode(), 0o755)


def recipe_env(home: Path, boot: dict, work: Work, role: Role) -> dict:
    """The agent's environment without anything secret or crv-specific it inherited, the
    role's env from the service, then the crv variables (which the role's env cannot
    override: they are this node's identity). The process tags of the local pool and of the
    simulated rack (CRV_LOCAL_*, CRV_RACK_*) are kept: they are how the pool (or the simulated
    BMC's power-off) finds every process of the node, daemons included."""
    env = {
        k: v
        for k, v in os.environ.items()
        if (k.startswith(PROCESS_TAGS) or not k.startswith("CRV_")) and not SECRET_ENV_RE.search(k)
    }
    env.update(role.env)
    appliance = home / "appliance"
    path = [str(agent_bin(home)), os.environ.get("PATH", os.defpath)]
    env.update(
        PATH=os.pathsep.join(path),
        CRV_AGENT_HOME=str(home),
        CRV_CLUSTER=boot["cluster"],
        CRV_NODE=boot["node"],
        CRV_GROUP=work.group,
        CRV_ROLE=role.role,
        CRV_ADDRESS=work.address,
        CRV_CA_FILE=str(home / "ca.crt"),
        # the node's cluster's own CA (then the root): what its daemons check peers against
        CRV_CLUSTER_CA_FILE=str(home / "cluster-ca.crt"),
        CRV_CERT_FILE=str(home / "node.crt"),
        CRV_KEY_FILE=str(home / "node.key"),
        CRV_APPLIANCE_DIR=str(inside(appliance, role.appdir)),
    )
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the recipe's whole process group, SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, start: int) -> str:
    with open(str(path), "rb") as f:
        end = f.seek(0, io.SEEK_END)
        f.seek(max(start, end - OUTPUT_TAIL))
        return f.read(OUTPUT_TAIL).decode("utf-8", "replace")


def run_recipe(home: Path, boot: dict, work: Work, role: Role, timeout: float) -> tuple:
    """Runs one recipe; returns (exit code, or None after a timeout; the output tail).

    Output goes straight to a file, not a pipe: daemons a recipe starts in the background keep
    its stdout open, and a pipe would keep us waiting for them."""
    workdir, logdir = home / "work", home / "logs"
    workdir.mkdir(mode=0o755, exist_ok=True)
    logdir.mkdir(mode=0o700, exist_ok=True)
    log_path = logdir / (role.role + ".log")
    fd = os.open(str(log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "ab") as out:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out.write(f"=== {stamp} role {role.role} release {role.release} ===\n".encode())
        out.flush()
        start = out.tell()
        try:
            proc = _start(home, boot, work, role, out)
        except (OSError, AgentError) as e:
            out.write(f"crv-agent: cannot start the recipe: {one_line(str(e))}\n".encode())
            code: int | None = 127
        else:
            code = _wait(proc, timeout, out)
    return code, _tail(log_path, start)


def _start(home: Path, boot: dict, work: Work, role: Role, out: BinaryIO) -> subprocess.Popen:
    """The recipe gets its own session, so that a timeout can kill everything it started."""
    script = inside(home / "appliance", role.recipe)
    if not script.is_file():
        raise AgentError(f"{role.recipe} is not in the recipe bundle")
    argv = [str(script)] if os.access(str(script), os.X_OK) else ["sh", str(script)]
    return subprocess.Popen(
        argv,
        cwd=str(home / "work"),
        env=recipe_env(home, boot, work, role),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(proc: subprocess.Popen, timeout: float, out: BinaryIO) -> int | None:
    """On success nothing is killed: the daemons a recipe leaves running are its purpose."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out.write(f"crv-agent: recipe timed out after {timeout:g} s; killed\n".encode())
        return None
    except BaseException:  # the agent is stopping: leave no half-run recipe behind
        _kill_group(proc)
        raise
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def report(identity: Identity, role: Role, state: str, code: int | None, output: str) -> None:
    body = {"role": role.role, "release": role.release, "state": state}
    body.update(exit_code=code, output=output)
    resp = identity.call("POST", "/v1/status", body, backoff_cap=DAEMON_BACKOFF)
    if resp.status in (401, 403, 404):
        _raise_for_node(resp, "POST /v1/status")
    elif resp.status == 409:
        log(f"status of role {role.role} release {role.release} is stale; ignored")
    elif not 200 <= resp.status < 300:  # 400, 413: the same report would be refused again
        log(f"status of role {role.role} refused: {resp.detail()}")


def run_role(
    identity: Identity,
    home: Path,
    boot: dict,
    work: Work,
    role: Role,
    state: dict,
    timeout: float,
) -> None:
    """The release is recorded after the final report: a crash in between re-runs the recipe
    (recipes are idempotent) rather than leaving the service waiting for a report."""
    log(f"running role {role.role} release {role.release}")
    report(identity, role, "running", None, "")
    with Keeper(identity):
        code, output = run_recipe(home, boot, work, role, timeout)
    outcome = "done" if code == 0 else "failed"
    report(identity, role, outcome, code, output)
    state["releases"][role.role] = role.release
    save_state(home, state)
    log(f"role {role.role} release {role.release} {outcome} (exit {code})")


def run_check(identity: Identity, home: Path, boot: dict, work: Work, role: Role) -> None:
    """A verify crv cannot run from outside (`verify: {on_node: ...}`: the node is behind NAT,
    or the check needs the node's own view): `sh -c` in the role's environment, reported."""
    assert role.check is not None
    ident, command = role.check["id"], role.check["command"]
    log(f"running check {ident} of role {role.role}")
    try:
        proc = subprocess.Popen(
            ["sh", "-c", command],
            cwd=str(home / "work"),
            env=recipe_env(home, boot, work, role),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        code, output = 127, f"crv-agent: cannot start the check: {one_line(str(e))}"
    else:
        try:
            out, _ = proc.communicate(timeout=CHECK_TIMEOUT)
            code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            output = out.decode("utf-8", "replace")[-OUTPUT_TAIL:]
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code, output = 124, f"crv-agent: check timed out after {CHECK_TIMEOUT:g} s; killed"
    body = {"role": role.role, "check": ident, "exit_code": code, "output": output}
    resp = identity.call("POST", "/v1/check", body, backoff_cap=DAEMON_BACKOFF)
    if resp.status in (401, 403, 404):
        _raise_for_node(resp, "POST /v1/check")
    elif not 200 <= resp.status < 300:  # 409: a newer check was asked meanwhile
        log(f"check {ident} of role {role.role} not taken: {resp.detail()}")
    else:
        log(f"check {ident} of role {role.role}: exit {code}")


def run_renew_hooks(
    home: Path, boot: dict, work: Work | None, state: dict, timeout: float, identity: Identity
) -> None:
    """After a new certificate: each role that ran on this node and declares `renew` runs its
    recipe again ("rerun") or its renew recipe, with CRV_ACTION=renew, so that daemons using
    copies of CRV_CERT_FILE and CRV_KEY_FILE take the new ones. Nothing is reported: the role
    stays as the service knows it; a failure is logged here and in the role's log."""
    identity.changed.clear()
    if work is None:
        return
    for role in work.roles:
        if not role.renew or state["releases"].get(role.role, 0) < 1:
            continue
        recipe = role.recipe if role.renew == "rerun" else role.renew
        hook = role._replace(recipe=recipe, env={**role.env, "CRV_ACTION": "renew"})
        with Keeper(identity):
            code, output = run_recipe(home, boot, work, hook, timeout)
        if code == 0:
            log(f"role {role.role}: renew hook done")
        else:
            log(f"role {role.role}: renew hook failed (exit {code}): {one_line(output[-300:])}")


def load_state(home: Path) -> dict:
    """A lost or damaged state only means running every current release again."""
    path = home / "state.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        releases = data["releases"]
        if isinstance(releases, dict) and all(_int(v) for v in releases.values()):
            return {"bundle": data.get("bundle"), "releases": releases}
    except FileNotFoundError:
        return {"bundle": None, "releases": {}}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log(f"{path} is damaged; starting afresh")
    return {"bundle": None, "releases": {}}


def save_state(home: Path, state: dict) -> None:
    write_file(home / "state.json", json.dumps(state, sort_keys=True).encode(), 0o600)


def serve(home: Path, boot: dict, recipe_timeout: float) -> int:
    identity = Identity(home, boot)
    install_shim(home)
    state = load_state(home)
    generation, backoff = 0, Backoff(cap=DAEMON_BACKOFF)
    work: Work | None = None
    while True:
        try:
            identity.keep()
            if identity.changed.is_set():
                run_renew_hooks(home, boot, work, state, recipe_timeout, identity)
            # the long poll ends in time for the renewal
            wait = int(max(1.0, min(POLL_WAIT, identity.seconds_left() + 1)))
            path = f"/v1/work?after={generation}&wait={wait}"
            resp = identity.call("GET", path, timeout=wait + 15, backoff_cap=DAEMON_BACKOFF)
            _raise_for_node(resp, "GET /v1/work")
            work = parse_work(resp.json())
            if work.stop:
                log("the service stops this node; exiting")
                return EXIT_OK
            sync_bundle(identity, home, state, work.bundle)
        except Refused:
            raise
        except AgentError as e:
            log(f"{e}; retrying")
            time.sleep(backoff.next())
            continue
        backoff.reset()
        generation = work.generation
        for role in work.roles:
            if role.release > state["releases"].get(role.role, 0):
                run_role(identity, home, boot, work, role, state, recipe_timeout)
        for role in work.roles:
            if role.check is not None and state["releases"].get(role.role, 0) >= role.release:
                run_check(identity, home, boot, work, role)


# --- commands -------------------------------------------------------------------------------


def _home(args: argparse.Namespace) -> Path:
    home = args.home or os.environ.get("CRV_AGENT_HOME")
    if not home:
        raise ConfigError("no agent home: pass --home DIR or set CRV_AGENT_HOME")
    return Path(home).resolve()


def _lock(home: Path) -> int:
    """Two agents on one home would run every recipe twice."""
    fd = os.open(str(home / "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"another crv-agent is running on {home}") from None
    return fd


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_run(args: argparse.Namespace) -> int:
    home = _home(args)
    if not home.is_dir():
        raise ConfigError(f"{home} is not a directory")
    signal.signal(signal.SIGTERM, _on_sigterm)
    _lock(home)
    deadline = time.monotonic() + args.deadline
    if args.cmdline:
        bootstrap_from_cmdline(home, Path(args.cmdline), deadline)
    boot = load_bootstrap(home)
    install_ca(home, boot)
    enrol(home, boot, deadline)
    call_back(home, boot, deadline)
    return serve(home, boot, args.recipe_timeout)


def cmd_pair(args: argparse.Namespace) -> int:
    home = _home(args)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _lock(home)
    deadline = time.monotonic() + args.deadline
    pair(home, args.service, args.pin, args.ca_sha256, args.address, deadline)
    boot = load_bootstrap(home)
    if args.no_run:
        return EXIT_OK
    return serve(home, boot, args.recipe_timeout)


def _cli_service(args: argparse.Namespace) -> tuple:
    """A renewal moves the new key, then the new certificate, into place: a reader in between
    sees a pair that does not match, and tries again a moment later."""
    home = _home(args)
    boot = load_bootstrap(home)
    files = [home / n for n in ("ca.crt", "node.crt", "node.key")]
    if not all(f.is_file() for f in files):
        raise ConfigError(f"{home}: not enrolled yet (no ca.crt, node.crt or node.key)")
    for attempt in range(20):
        try:
            return Service(boot["service"], tls_context(*files)), boot
        except ConfigError:
            if attempt == 19:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _attribute_path(role: str, key: str) -> str:
    if not NAME_RE.fullmatch(role):
        raise ConfigError(f"bad role name {role!r}")
    if not KEY_RE.fullmatch(key):
        raise ConfigError(f"bad attribute key {key!r}: lowercase letters, digits and _")
    return f"/v1/attributes/{urllib.parse.quote(role, safe='')}/{key}"


def _cli_call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> tuple:
    """A 403 right after a renewal (the old certificate superseded while this call used it)
    is tried once more with the files as they are now."""
    for _attempt in (1, 2):
        service, boot = _cli_service(args)
        resp = call(service, method, path, body, deadline=time.monotonic() + CLI_DEADLINE)
        service.close()
        if resp.status != 403:
            break
    if resp.status == 404:
        raise AgentError(f"{path}: {resp.detail()}", EXIT_FAILED)
    if not 200 <= resp.status < 300:
        raise AgentError(resp.detail(), EXIT_CONFIG)
    return resp, boot


def cmd_set(args: argparse.Namespace) -> int:
    role = os.environ.get("CRV_ROLE")
    if not role:
        raise ConfigError("CRV_ROLE is not set: `crv-agent set` runs inside a recipe")
    _cli_call(args, "PUT", _attribute_path(role, args.key), {"value": args.value})
    return EXIT_OK


def _values(args: argparse.Namespace) -> tuple:
    # A recipe of an included appliance names that appliance's roles as it wrote them; in the
    # cluster they carry the include's prefix (mysql-ha's `primary` is webshop's `db-primary`).
    role = os.environ.get("CRV_ROLE_PREFIX", "") + args.role
    resp, boot = _cli_call(args, "GET", _attribute_path(role, args.key))
    values = resp.json().get("values")
    if not isinstance(values, list) or not all(
        isinstance(v, dict) and isinstance(v.get("value"), str) for v in values
    ):
        raise AgentError("malformed answer from the service")
    return values, boot


def cmd_get(args: argparse.Namespace) -> int:
    """This node's own value when it hosts the role (a local dependency), else the first."""
    values, boot = _values(args)
    if not values:
        raise AgentError(f"no value for {args.role} {args.key}", EXIT_FAILED)
    mine = [v for v in values if v.get("node") == boot["node"]]
    sys.stdout.write((mine or values)[0]["value"] + "\n")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """Nothing at all is a valid answer (a role scaled to zero): exit 0, print nothing."""
    values, _ = _values(args)
    sys.stdout.write("".join(v["value"] + "\n" for v in values))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crv-agent", description="The crv node agent.")
    parser.add_argument("--version", action="version", version="crv-agent " + VERSION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", metavar="DIR", help="agent home (default: $CRV_AGENT_HOME)")

    run = sub.add_parser("run", parents=[home], help="enrol, then run this node's recipes")
    run.add_argument("--deadline", type=float, default=600.0, help="seconds to enrol (600)")
    run.add_argument("--recipe-timeout", type=float, default=1800.0, help="seconds (1800)")
    run.add_argument(
        "--cmdline",
        metavar="FILE",
        help="take the bootstrap from crv.* words of a kernel command line (/proc/cmdline)",
    )
    run.set_defaults(func=cmd_run)

    pairp = sub.add_parser(
        "pair",
        parents=[home],
        help="join a cluster with a PIN from `crv pair` (a machine crv did not make), then run",
    )
    pairp.add_argument("service", metavar="SERVICE-URL", help="the crv service, https://...")
    pairp.add_argument("pin", metavar="PIN", help="the one-time PIN `crv pair` printed")
    pairp.add_argument(
        "--ca-sha256", required=True, metavar="HEX", help="the CA fingerprint printed with it"
    )
    pairp.add_argument(
        "--address", help="this machine's IP address as other nodes reach it (default: none)"
    )
    pairp.add_argument("--deadline", type=float, default=120.0, help="seconds to pair (120)")
    pairp.add_argument("--recipe-timeout", type=float, default=1800.0, help="seconds (1800)")
    pairp.add_argument("--no-run", action="store_true", help="pair, then exit (run it later)")
    pairp.set_defaults(func=cmd_pair)

    setp = sub.add_parser("set", parents=[home], help="publish KEY=VALUE for $CRV_ROLE")
    setp.add_argument("key")
    setp.add_argument("value")
    setp.set_defaults(func=cmd_set)
    for name, func, text in (
        ("get", cmd_get, "print one value of ROLE's KEY"),
        ("list", cmd_list, "print every value of ROLE's KEY, one per line"),
    ):
        p = sub.add_parser(name, parents=[home], help=text)
        p.add_argument("role")
        p.add_argument("key")
        p.set_defaults(func=func)
    return parser


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AgentError as e:
        sys.stderr.write(f"crv-agent: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
