#!/bin/sh
# Role gmond: the Ganglia agent of a compute node. It sends its metrics by unicast UDP to every
# collector (a redundant pair of servers each gets everything) and also to itself, so that its
# own XML on port 8649 holds this node's metrics for the local proxy role.
# Re-contextualization (collectors added or removed) rewrites the send channels and restarts
# gmond only when the list changed.
set -eu
port=8649
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"

# One send channel per collector. Values come from other nodes and end up in gmond.conf:
# anything that is not a host name, an address or a port is refused.
crv-agent list collector host >collector-hosts
crv-agent list collector port >collector-ports
channels=$(
    paste -d' ' collector-hosts collector-ports | while read -r host cport; do
        case "$host" in '' | *[!A-Za-z0-9.:-]*) echo "bad collector host '$host'" >&2; exit 1 ;; esac
        case "$cport" in '' | *[!0-9]*) echo "bad collector port '$cport'" >&2; exit 1 ;; esac
        printf 'udp_send_channel {\n  host = "%s"\n  port = %s\n}\n' "$host" "$cport"
    done
)
[ -n "$channels" ] || { echo "no collector published" >&2; exit 1; }

need ganglia-monitor python3
# Debian's gmond was built with an unexpanded module directory ("${prefix}/lib/..."), so the
# relative module paths printed by `gmond -t` need module_dir set to where libganglia1 put them.
moddir=$(dpkg -L libganglia1 | sed -n 's#/modcpu\.so$##p')
[ -n "$moddir" ] || { echo "ganglia modules not found" >&2; exit 1; }

{
    cat <<EOF
/* Written by crv (ganglia/gmond); rewritten on every contextualization. */
globals {
  daemonize = yes
  setuid = yes
  user = ganglia
  debug_level = 0
  max_udp_msg_len = 1472
  mute = no
  deaf = no
  allow_extra_data = yes
  host_dmax = 86400
  host_tmax = 20
  cleanup_threshold = 300
  gexec = no
  module_dir = "$moddir"
  send_metadata_interval = 60   /* unicast: a restarted collector relearns this host */
  override_hostname = "$CRV_NODE"
  override_ip = "$CRV_ADDRESS"
}
cluster {
  name = "$CRV_CLUSTER"
  owner = "crv"
}
$channels
udp_send_channel {           /* to itself: the local XML then describes this node */
  host = 127.0.0.1
  port = $port
}
udp_recv_channel {
  bind = 127.0.0.1
  port = $port
}
tcp_accept_channel {         /* the XML is for the local proxy only */
  port = $port
  acl {
    default = "deny"
    access {
      ip = 127.0.0.1
      mask = 32
      action = "allow"
    }
  }
}
EOF
    gmond -t | sed -n '/^modules {/,$p'
} >/etc/ganglia/gmond.conf.new
grep -q '^modules {' /etc/ganglia/gmond.conf.new || { echo "gmond -t printed no modules" >&2; exit 1; }
systemctl enable ganglia-monitor
if swap /etc/ganglia/gmond.conf.new /etc/ganglia/gmond.conf; then
    systemctl restart ganglia-monitor
else
    systemctl start ganglia-monitor
fi

wait_for_port 127.0.0.1 "$port" 30 || { echo "gmond did not start listening" >&2; exit 1; }
crv-agent set host "$CRV_ADDRESS"
