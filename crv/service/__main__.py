"""`python -m crv.service --port P`: what `crv up` starts in the background."""

from __future__ import annotations

import argparse
import sys

from crv.base.errors import CrvError
from crv.base.home import Home
from crv.base.netns import netns_path
from crv.service.server import serve

parser = argparse.ArgumentParser(prog="python -m crv.service")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument(
    "--netns-listen",
    action="append",
    default=[],
    metavar="NAMESPACE=ADDRESS",
    help="also listen on ADDRESS (same port) inside the network namespace NAMESPACE (the lab)",
)
args = parser.parse_args()
netns = []
for item in args.netns_listen:
    name, _, address = item.partition("=")
    if not name or not address:
        parser.error(f"--netns-listen {item!r}: give NAMESPACE=ADDRESS")
    netns.append((netns_path(name), address))
try:
    serve(Home.from_env(), args.host, args.port, netns)
except CrvError as e:  # a refused setting or an unusable database: one line, not a traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
