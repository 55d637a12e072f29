#!/bin/sh
# Role lb: a python3-stdlib round-robin HTTP proxy over the url of every web node.
# Re-contextualization (scale up/down) rewrites backends.txt; the running proxy picks it up.
# Every rate_every seconds the proxy publishes requests_per_second (the autoscaling metric).
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
port="${CRV_PARAM_PORT:-8080}"
every="${CRV_PARAM_RATE_EVERY:-10}"

crv-agent list web url >backends.txt.new
[ -s backends.txt.new ] || { echo "no web backends published" >&2; exit 1; }
mv backends.txt.new backends.txt

cat > lb.py <<'PY'
import http.server
import itertools
import os
import subprocess
import sys
import threading
import time
import urllib.request

LOCK = threading.Lock()
STATE = {"mtime": None, "cycle": None, "requests": 0}


def publish_rate(every):
    """requests_per_second over each interval, on the blackboard (0 when idle, so a quiet
    farm reads as quiet rather than as silent)."""
    last = time.monotonic()
    while True:
        time.sleep(every)
        now = time.monotonic()
        with LOCK:
            count, STATE["requests"] = STATE["requests"], 0
        rate = count / (now - last)
        last = now
        subprocess.run(
            ["crv-agent", "set", "requests_per_second", f"{rate:.2f}"],
            capture_output=True, timeout=60, check=False,
        )


def next_backend():
    with LOCK:
        mtime = os.stat("backends.txt").st_mtime_ns
        if mtime != STATE["mtime"]:
            with open("backends.txt") as f:
                urls = [line.strip() for line in f if line.strip()]
            STATE["mtime"], STATE["cycle"] = mtime, itertools.cycle(urls)
        return next(STATE["cycle"])


class Proxy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with LOCK:
            STATE["requests"] += 1
        backend = next_backend()
        try:
            with urllib.request.urlopen(backend + self.path, timeout=5) as r:
                status, body = r.status, r.read()
        except Exception as exc:
            status, body = 502, f"backend {backend} failed: {exc}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


threading.Thread(target=publish_rate, args=(float(sys.argv[3]),), daemon=True).start()
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Proxy).serve_forever()
PY

if ! { [ -f lb.pid ] && kill -0 "$(cat lb.pid)" 2>/dev/null; }; then
    nohup python3 lb.py "$CRV_ADDRESS" "$port" "$every" >lb.log 2>&1 &
    echo $! >lb.pid
fi

wait_for_port "$CRV_ADDRESS" "$port" 10 || { echo "load balancer did not start listening" >&2; exit 1; }
crv-agent set url "http://$CRV_ADDRESS:$port"
