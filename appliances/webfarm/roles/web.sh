#!/bin/sh
# Role web: a python3-stdlib HTTP server on this node's address, answering with the node name.
# Idempotent: re-running restarts the server with the current settings.
set -eu
port="${CRV_PARAM_PORT:-8080}"

cat > web.py <<'PY'
import http.server
import os
import sys

NODE = os.environ.get("CRV_NODE", "unknown")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (f"ok {NODE}\n" if self.path == "/health" else f"hello from {NODE}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
PY

if [ -f web.pid ] && kill -0 "$(cat web.pid)" 2>/dev/null; then
    kill "$(cat web.pid)"
    sleep 0.2
fi
nohup python3 web.py "$CRV_ADDRESS" "$port" >web.log 2>&1 &
echo $! >web.pid

python3 - "$CRV_ADDRESS" "$port" <<'PY'
import socket, sys, time
for _ in range(100):
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), 0.2).close()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("web server did not start listening")
PY
crv-agent set url "http://$CRV_ADDRESS:$port"
