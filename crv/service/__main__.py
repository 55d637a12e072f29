"""`python -m crv.service --port P`: what `crv up` starts in the background."""

from __future__ import annotations

import argparse

from crv.base.home import Home
from crv.service.server import serve

parser = argparse.ArgumentParser(prog="python -m crv.service")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()
serve(Home.from_env(), args.host, args.port)
