#!/bin/sh
# Role app: a small python3-stdlib HTTP application (DB driver: Debian's python3-pymysql).
# It writes to the primary and reads from the replicas (falling back to the primary), and
# /health answers 200 only while the primary answers.
#
# The database knows no password for it: the app logs in as mysql-ha's crv_client account with
# this node's crv certificate (mutual TLS, the server's certificate checked against the crv CA
# and its address). The key reaches the service as a systemd credential, never in its unit.
# Re-contextualization (replicas scaled) rewrites db.json only; the running app re-reads it.
set -eu
port=8080
etc=/etc/crv-webshop
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"

endpoint() {  # HOST PORT -> host:port, refusing what is not an address (values come from other nodes)
    case "$1" in '' | *[!A-Za-z0-9.:-]*) echo "bad database host '$1'" >&2; exit 1 ;; esac
    case "$2" in '' | *[!0-9]*) echo "bad database port '$2'" >&2; exit 1 ;; esac
    printf '%s:%s\n' "$1" "$2"
}

primary=$(endpoint "$(crv-agent get db-primary host)" "$(crv-agent get db-primary port)")
database=$(crv-agent get db-primary database)
case "$database" in '' | *[!A-Za-z0-9_]*) echo "bad database name '$database'" >&2; exit 1 ;; esac
crv-agent list db-replica host >replica-hosts
crv-agent list db-replica port >replica-ports
replicas=$(paste -d' ' replica-hosts replica-ports | while read -r h p; do endpoint "$h" "$p"; done)

need python3 python3-pymysql

install -d -m 755 "$etc"
changed=0
install -m 644 "${CRV_CLUSTER_CA_FILE:-$CRV_CA_FILE}" "$etc/ca.pem.new"
install -m 644 "$CRV_CERT_FILE" "$etc/cert.pem.new"
install -m 600 "$CRV_KEY_FILE" "$etc/key.pem.new"
for f in ca cert key; do swap "$etc/$f.pem.new" "$etc/$f.pem" && changed=1; done

# Settings, not secrets: the app reloads this file when it changes, without a restart.
# shellcheck disable=SC2086  # one argument per replica
python3 - "$primary" "$database" $replicas >"$etc/db.json.new" <<'PY'
import json, sys
print(json.dumps({"primary": sys.argv[1], "database": sys.argv[2], "replicas": sys.argv[3:],
                  "user": "crv_client"}, indent=1))
PY
swap "$etc/db.json.new" "$etc/db.json" || true

cat >"$etc/app.py.new" <<'PY'
"""webshop app: counts visits in the primary, reads the count back from a replica."""
import http.server
import itertools
import json
import os
import sys
import threading

import pymysql

CONF = "/etc/crv-webshop/db.json"
NODE = os.environ.get("CRV_NODE", "unknown")
TLS = {
    "ssl_ca": "/etc/crv-webshop/ca.pem",
    "ssl_cert": "/etc/crv-webshop/cert.pem",
    "ssl_key": os.path.join(os.environ["CREDENTIALS_DIRECTORY"], "key"),
    "ssl_verify_cert": True,
    "ssl_verify_identity": True,
}
LOCK = threading.Lock()
STATE = {"mtime": None, "conf": None, "replicas": None}
CREATED = set()  # primaries where the table is known to exist


def conf():
    """Re-read on change: crv rewrites the file when replicas come and go."""
    with LOCK:
        mtime = os.stat(CONF).st_mtime_ns
        if mtime != STATE["mtime"]:
            with open(CONF) as f:
                c = json.load(f)
            STATE.update(mtime=mtime, conf=c, replicas=itertools.cycle(c["replicas"] or [None]))
        return STATE["conf"], next(STATE["replicas"])


def connect(endpoint, database, user):
    host, _, port = endpoint.rpartition(":")
    return pymysql.connect(host=host.strip("[]"), port=int(port), user=user, database=database,
                           connect_timeout=3, read_timeout=5, write_timeout=5, autocommit=True, **TLS)


def count(endpoint, c):
    with connect(endpoint, c["database"], c["user"]) as db, db.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM visits")
        return cur.fetchone()[0]


def visit():
    c, replica = conf()
    with connect(c["primary"], c["database"], c["user"]) as db, db.cursor() as cur:
        if c["primary"] not in CREATED:
            cur.execute("CREATE TABLE IF NOT EXISTS visits (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
                        " node VARCHAR(255) NOT NULL, at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)")
            CREATED.add(c["primary"])
        cur.execute("INSERT INTO visits (node) VALUES (%s)", (NODE,))
    source = replica or c["primary"]
    try:
        n = count(source, c)
    except pymysql.MySQLError:  # a replica down or behind must not take the shop down
        source = c["primary"]
        n = count(source, c)
    return f"webshop on {NODE}: {n} visits (read from {source})\n"


def healthy():
    c, _ = conf()
    with connect(c["primary"], c["database"], c["user"]) as db, db.cursor() as cur:
        cur.execute("SELECT 1")
    return f"ok {NODE}\n"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        action = {"/": visit, "/health": healthy}.get(path)
        if action is None:
            status, body = 404, "not found\n"
        else:
            try:
                status, body = 200, action()
            except Exception as exc:  # the database, not the request, is what failed
                status, body = 503, f"database unavailable: {type(exc).__name__}\n"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("", int(sys.argv[1])), Handler).serve_forever()
PY
swap "$etc/app.py.new" "$etc/app.py" && changed=1

# DynamicUser: the app runs as a throw-away user; LoadCredential hands it a private copy of the key.
cat >/etc/systemd/system/crv-webshop-app.service.new <<EOF
[Unit]
Description=crv webshop application server
After=network-online.target
Wants=network-online.target

[Service]
Environment=CRV_NODE=$CRV_NODE
ExecStart=/usr/bin/python3 $etc/app.py $port
LoadCredential=key:$etc/key.pem
DynamicUser=yes
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
if swap /etc/systemd/system/crv-webshop-app.service.new /etc/systemd/system/crv-webshop-app.service; then
    systemctl daemon-reload
    changed=1
fi
systemctl enable crv-webshop-app.service
if [ "$changed" = 1 ]; then systemctl restart crv-webshop-app.service; else systemctl start crv-webshop-app.service; fi

wait_for_port 127.0.0.1 "$port" 30 || { echo "the app did not start listening" >&2; exit 1; }
crv-agent set url "http://$CRV_ADDRESS:$port"
