#!/bin/sh
# Role proxy: serves the local gmond's XML dump over HTTP, for a server that cannot reach this
# node's gmond (NAT, firewall: gmond itself answers only on loopback). python3 stdlib, run by
# systemd as a throw-away user: GET / is the XML, GET /health is 200 while gmond answers.
# Read-only metrics; it holds no secret.
set -eu
port=8650
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"

# gmond is a local dependency: its XML port is the one its role is checked on.
gmond_port=8649

command -v python3 >/dev/null || { apt-get update -q; apt-get install -y -q --no-install-recommends python3; }

install -d -m 755 /usr/local/lib/crv
cat >/usr/local/lib/crv/ganglia-proxy.py.new <<'PY'
"""HTTP view of the local gmond's XML (crv ganglia/proxy)."""
import http.server
import socket
import sys

GMOND = ("127.0.0.1", int(sys.argv[2]))
LIMIT = 64 * 1024 * 1024  # one node's XML is a few tens of KiB; refuse to buffer a runaway


def dump():
    chunks, size = [], 0
    with socket.create_connection(GMOND, timeout=5) as s:
        while chunk := s.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > LIMIT:
                raise OSError("gmond XML larger than the limit")
    return b"".join(chunks)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path not in ("/", "/xml", "/health"):
            return self.reply(404, b"not found\n", "text/plain")
        try:
            xml = dump()
            ok = b"<GANGLIA_XML" in xml
        except OSError as exc:
            xml, ok = f"gmond unreachable: {exc}\n".encode(), False
        if path == "/health":
            self.reply(200 if ok else 503, b"ok\n" if ok else b"gmond not answering\n", "text/plain")
        else:
            self.reply(200 if ok else 502, xml, "text/xml" if ok else "text/plain")

    def reply(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("", int(sys.argv[1])), Handler).serve_forever()
PY
restart=0
swap /usr/local/lib/crv/ganglia-proxy.py.new /usr/local/lib/crv/ganglia-proxy.py && restart=1

cat >/etc/systemd/system/crv-ganglia-proxy.service.new <<EOF
[Unit]
Description=crv ganglia proxy (local gmond XML over HTTP)
After=network-online.target ganglia-monitor.service
Wants=network-online.target

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/crv/ganglia-proxy.py $port $gmond_port
DynamicUser=yes
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
if swap /etc/systemd/system/crv-ganglia-proxy.service.new /etc/systemd/system/crv-ganglia-proxy.service; then
    systemctl daemon-reload
    restart=1
fi
systemctl enable crv-ganglia-proxy.service
if [ "$restart" = 1 ]; then
    systemctl restart crv-ganglia-proxy.service
else
    systemctl start crv-ganglia-proxy.service
fi

wait_for_port 127.0.0.1 "$port" 30 || { echo "the proxy did not start listening" >&2; exit 1; }
crv-agent set url "http://$CRV_ADDRESS:$port"
