#!/bin/sh
# Role web: a python3-stdlib HTTP server on this node's address, answering with the node name.
# Idempotent: re-running restarts the server with the current settings.
# Every rate_every seconds it publishes `busy`, the requests per second it served (health checks
# left out): a shrink of the autoscaled group removes the idlest nodes first.
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
port="${CRV_PARAM_PORT:-8080}"
every="${CRV_PARAM_RATE_EVERY:-10}"

cat > web.py <<'PY'
import http.server
import os
import subprocess
import sys
import threading
import time

NODE = os.environ.get("CRV_NODE", "unknown")
LOCK = threading.Lock()
SERVED = [0]


def publish_busy(every):
    last = time.monotonic()
    while True:
        time.sleep(every)
        now = time.monotonic()
        with LOCK:
            count, SERVED[0] = SERVED[0], 0
        subprocess.run(
            ["crv-agent", "set", "busy", f"{count / (now - last):.2f}"],
            capture_output=True, timeout=60, check=False,
        )
        last = now


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/health":
            with LOCK:
                SERVED[0] += 1
        body = (f"ok {NODE}\n" if self.path == "/health" else f"hello from {NODE}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


threading.Thread(target=publish_busy, args=(float(sys.argv[3]),), daemon=True).start()
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
PY

if [ -f web.pid ] && kill -0 "$(cat web.pid)" 2>/dev/null; then
    kill "$(cat web.pid)"
    sleep 0.2
fi
nohup python3 web.py "$CRV_ADDRESS" "$port" "$every" >web.log 2>&1 &
echo $! >web.pid

wait_for_port "$CRV_ADDRESS" "$port" 10 || { echo "web server did not start listening" >&2; exit 1; }
crv-agent set url "http://$CRV_ADDRESS:$port"
