"""The bootstrap a machine pool hands to a new machine, as cloud-init user-data.

The same document serves every pool whose machines run cloud-init: the libvirt pool puts it on
a NoCloud seed ISO, a libcloud pool passes it as user-data (EC2's is limited to 16 KiB, hence
gzip: cloud-init recognises gzip-compressed user-data by its magic bytes). It carries:

- the agent program itself (`/usr/local/bin/crv-agent`, stdlib-only Python without its
  comments and docstrings), so a stock cloud image with python3 and cloud-init needs nothing
  else; or, in a compressed document (cloud user-data: EC2's 16 KiB no longer holds the agent,
  about 15 KiB compressed by now), a small fetcher that cloud-init runs first: it downloads the
  agent from the service (`GET /v1/agent`) over TLS checked against the bootstrap's CA (itself
  checked against its fingerprint) and installs it only if its SHA-256 is the one the pool
  pinned in the document;
- the bootstrap data (`/var/lib/crv-agent/bootstrap.json`, mode 0600: the one-time token, the
  service URL, the CA and its fingerprint);
- a systemd unit that runs `crv-agent run` and restarts it, started at once.

`parse` reads a document back (tests prove that what a pool handed over is exactly what the
agent needs, by running the real agent with it).
"""

from __future__ import annotations

import ast
import base64
import gzip
import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

import yaml

from pools import AGENT

AGENT_PATH = "/usr/local/bin/crv-agent"
AGENT_HOME = "/var/lib/crv-agent"
BOOTSTRAP_PATH = f"{AGENT_HOME}/bootstrap.json"
UNIT_PATH = "/etc/systemd/system/crv-agent.service"
EC2_USER_DATA_LIMIT = 16 * 1024
FETCH_PATH = "/usr/local/lib/crv-agent-fetch"
# argv: bootstrap.json, where the agent goes, its SHA-256. Tries for 10 minutes (the network or
# the service may not be up yet); a node that never gets its agent never enrols, and its deploy
# step gives up on it like on any node that does not boot.
FETCH = """\
import hashlib, json, os, ssl, sys, time, urllib.request
boot_path, target, want = sys.argv[1:4]
boot = json.load(open(boot_path))
der = ssl.PEM_cert_to_DER_cert(boot["ca"].strip())
if hashlib.sha256(der).hexdigest() != boot["ca_sha256"].strip().lower().replace(":", ""):
    sys.exit("crv-agent-fetch: the CA does not match ca_sha256; not trusting it")
ctx = ssl.create_default_context(cadata=ssl.DER_cert_to_PEM_cert(der))
url = boot["service"].rstrip("/") + "/v1/agent"
for attempt in range(120):
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=30) as answer:
            body = answer.read(1 << 22)
        break
    except OSError as e:
        print(f"crv-agent-fetch: {url}: {e}; retrying", file=sys.stderr, flush=True)
        time.sleep(5)
else:
    sys.exit(f"crv-agent-fetch: no agent from {url}")
if hashlib.sha256(body).hexdigest() != want:
    sys.exit("crv-agent-fetch: the service's agent is not the one this node was made for")
tmp = target + ".tmp"
with open(tmp, "wb") as f:
    f.write(body)
os.chmod(tmp, 0o755)
os.replace(tmp, target)
"""

UNIT = f"""\
[Unit]
Description=crv node agent
Wants=network-online.target
After=network-online.target

[Service]
Environment=CRV_AGENT_HOME={AGENT_HOME}
ExecStart=/usr/bin/python3 {AGENT_PATH} run --home {AGENT_HOME}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


_SOURCE_LOCK = threading.Lock()
_source: tuple[int, str] | None = None  # (the agent file's mtime, its stripped source)


def agent_source() -> str:
    """The agent without comments and docstrings (the same program, 40 % smaller, so that the
    document stays well under EC2's 16 KiB with room for the agent to grow). Made once per
    version of the file, under a lock: CPython 3.11's `ast` keeps its recursion depth per
    interpreter, so two threads converting at once fail with "AST constructor recursion depth
    mismatch" (seen when several nodes were provisioned in parallel)."""
    global _source
    mtime = AGENT.stat().st_mtime_ns
    with _SOURCE_LOCK:
        if _source is None or _source[0] != mtime:
            _source = (mtime, _strip(AGENT.read_text()))
        return _source[1]


def _strip(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return "#!/usr/bin/env python3\n" + ast.unparse(tree) + "\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def agent_sha256() -> str:
    """What `GET /v1/agent` serves (the agent file as it is), by its SHA-256."""
    return hashlib.sha256(AGENT.read_bytes()).hexdigest()


def user_data(bootstrap: Mapping[str, str], hostname: str, *, compress: bool = False) -> bytes:
    """The cloud-config for one node. `compress` (cloud user-data): gzip-compressed, and the
    agent is fetched from the service rather than carried (module doc)."""
    if compress:
        agent: dict[str, Any] = {"path": FETCH_PATH, "permissions": "0755", "content": FETCH}
        fetch = [["/usr/bin/python3", FETCH_PATH, BOOTSTRAP_PATH, AGENT_PATH, agent_sha256()]]
    else:  # plain text: the whole document compresses best
        agent = {"path": AGENT_PATH, "permissions": "0755", "owner": "root:root",
                 "content": agent_source()}  # fmt: skip
        fetch = []
    doc: dict[str, Any] = {
        "hostname": hostname,
        "write_files": [
            agent,
            {
                "path": BOOTSTRAP_PATH,
                "permissions": "0600",
                "owner": "root:root",
                "encoding": "b64",
                "content": _b64(json.dumps(dict(bootstrap), sort_keys=True).encode()),
            },
            {"path": UNIT_PATH, "permissions": "0644", "content": UNIT},
        ],
        "runcmd": [
            *fetch,
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "crv-agent.service"],
        ],
    }
    text = "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, width=1 << 20)
    data = text.encode()
    return gzip.compress(data, mtime=0) if compress else data


def _document(data: bytes) -> dict[str, Any]:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    text = data.decode()
    if not text.startswith("#cloud-config\n"):
        raise ValueError("not a #cloud-config document")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def runcmd(data: bytes) -> list[list[str]]:
    """The commands a user-data document runs at first boot, in order."""
    return [list(c) for c in _document(data).get("runcmd", [])]


def parse(data: bytes) -> dict[str, bytes]:
    """The files a user-data document writes, by path (gzip-compressed documents too)."""
    files: dict[str, bytes] = {}
    for f in _document(data).get("write_files", []):
        content = f["content"].encode() if isinstance(f["content"], str) else f["content"]
        encoding = f.get("encoding", "")
        if encoding in ("b64", "base64"):
            content = base64.b64decode(content)
        elif encoding in ("gz+b64", "gzip+base64", "gz+base64"):
            content = gzip.decompress(base64.b64decode(content))
        files[f["path"]] = content
    return files
