#!/bin/sh
# Role collector: gmond in receive mode on a server node. Every compute node's gmond sends its
# metrics here by unicast UDP (cloud networks drop Ganglia's default multicast); the gmetad on
# this node polls the resulting XML over TCP. The server reports its own metrics to itself.
set -eu
port=8649
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"

need ganglia-monitor python3
# Debian's gmond was built with an unexpanded module directory ("${prefix}/lib/..."), so the
# relative module paths printed by `gmond -t` need module_dir set to where libganglia1 put them.
moddir=$(dpkg -L libganglia1 | sed -n 's#/modcpu\.so$##p')
[ -n "$moddir" ] || { echo "ganglia modules not found" >&2; exit 1; }

# Our globals and channels, then gmond's compiled-in modules and collection groups (`gmond -t`),
# so the file never depends on what an earlier run left in /etc.
{
    cat <<EOF
/* Written by crv (ganglia/collector); rewritten on every contextualization. */
globals {
  daemonize = yes
  setuid = yes
  user = ganglia
  debug_level = 0
  max_udp_msg_len = 1472
  mute = no
  deaf = no
  allow_extra_data = yes
  host_dmax = 86400          /* forget a host a day after it stopped reporting (scaled down) */
  host_tmax = 20
  cleanup_threshold = 300
  gexec = no
  module_dir = "$moddir"
  send_metadata_interval = 60   /* unicast: a restarted collector relearns every host */
  override_hostname = "$CRV_NODE"
  override_ip = "$CRV_ADDRESS"
}
cluster {
  name = "$CRV_CLUSTER"
  owner = "crv"
}
udp_send_channel {           /* this server's own metrics */
  host = 127.0.0.1
  port = $port
}
udp_recv_channel {           /* every compute node's metrics */
  port = $port
}
tcp_accept_channel {         /* the XML is for the gmetad on this node only */
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
crv-agent set port "$port"
