#!/bin/sh
# Role gmetad: polls the collector on this same node and keeps the round-robin databases.
# Each server of a redundant pair has its own collector receiving every client, so each
# gmetad has the whole cluster. Port 8651 (XML) is open to the network for crv's check but
# answers only local clients (trusted_hosts); the web front end uses 8652 on localhost.
set -eu
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"

# The collector is local (a local dependency): poll it on loopback, where its ACL lets us in.
cport=$(crv-agent get collector port)
case "$cport" in '' | *[!0-9]*) echo "bad collector port '$cport'" >&2; exit 1 ;; esac
# The title lands inside a quoted string of gmetad.conf: keep it to harmless characters.
title=$(printf %s "${CRV_PARAM_TITLE:-crv}" | tr -cd 'A-Za-z0-9 ._-')
[ -n "$title" ] || title=crv

need gmetad python3

cat >/etc/ganglia/gmetad.conf.new <<EOF
# Written by crv (ganglia/gmetad); rewritten on every contextualization.
data_source "$CRV_CLUSTER" 15 127.0.0.1:$cport
gridname "$title"
xml_port 8651
interactive_port 8652
trusted_hosts 127.0.0.1
setuid_username "ganglia"
rrd_rootdir "/var/lib/ganglia/rrds"
case_sensitive_hostnames 0
EOF
systemctl enable gmetad
if swap /etc/ganglia/gmetad.conf.new /etc/ganglia/gmetad.conf; then
    systemctl restart gmetad
else
    systemctl start gmetad
fi

wait_for_port 127.0.0.1 8651 30 || { echo "gmetad did not start listening" >&2; exit 1; }

# The verify (run on this node, roles/lib/reports-every-node.py) checks that every gmond host
# appears in gmetad's XML with a recent report: it reads the list written here.
crv-agent list gmond host >gmond-hosts
crv-agent set host "$CRV_ADDRESS"
