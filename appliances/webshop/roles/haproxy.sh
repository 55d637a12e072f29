#!/bin/sh
# Role haproxy: HAProxy round-robin over the url of every app node, with health checks on the
# app's /health so a node whose database is unreachable is taken out of rotation.
# Re-contextualization (apps scaled) rewrites the backend list and reloads HAProxy, which keeps
# established connections; nothing happens when the list is unchanged.
set -eu
port=80
cfg=/etc/haproxy/haproxy.cfg
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"

# Each url is http://HOST:PORT, published by an app node; anything else would be injected
# into the configuration, so it is refused.
crv-agent list app url >app-urls
servers=$(
    i=0
    while read -r url; do
        hostport=${url#http://}
        hostport=${hostport%/}
        case "$url" in http://*) ;; *) echo "bad app url '$url'" >&2; exit 1 ;; esac
        case "$hostport" in
            '' | *[!A-Za-z0-9.:-]* | *:) echo "bad app url '$url'" >&2; exit 1 ;;
            *:*) ;;
            *) hostport="$hostport:80" ;;
        esac
        i=$((i + 1))
        printf '    server app%d %s check\n' "$i" "$hostport"
    done <app-urls
)
[ -n "$servers" ] || { echo "no app url published" >&2; exit 1; }

need haproxy

cat >"$cfg.new" <<EOF
# Written by crv (webshop/haproxy); rewritten on every contextualization.
global
    log /dev/log local0
    chroot /var/lib/haproxy
    stats socket /run/haproxy/admin.sock mode 660 level admin
    user haproxy
    group haproxy
    daemon

defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend shop
    bind :$port
    default_backend apps

backend apps
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
$servers
EOF
# Check before swapping: a configuration HAProxy refuses must not replace a working one.
haproxy -c -f "$cfg.new"
systemctl enable haproxy
if swap "$cfg.new" "$cfg"; then
    systemctl reload-or-restart haproxy
else
    systemctl start haproxy
fi

wait_for_port 127.0.0.1 "$port" 30 || { echo "haproxy did not start listening" >&2; exit 1; }
crv-agent set url "http://$CRV_ADDRESS:$port"
