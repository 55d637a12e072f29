#!/bin/sh
# A python3 web server on this node's address (port 8080), published as `url`.
set -eu
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
if [ -f web.pid ] && kill -0 "$(cat web.pid)" 2>/dev/null; then kill "$(cat web.pid)"; sleep 0.2; fi
nohup python3 -m http.server --bind "$CRV_ADDRESS" 8080 >web.log 2>&1 &
echo $! >web.pid
wait_for_port "$CRV_ADDRESS" 8080 10 || { echo "web server did not start listening" >&2; exit 1; }
crv-agent set url "http://$CRV_ADDRESS:8080"
