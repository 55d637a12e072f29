#!/bin/sh
# Role slurmd (compute): the controller's munge key, munged, this node's slurm.conf line on the
# blackboard, and slurmd in configless mode: it fetches slurm.conf from slurmctld
# (`--conf-server`), so this node keeps no copy and a resize never rewrites it (a
# `scontrol reconfigure` on the controller pushes the new file to every running slurmd).
# slurmd exits while the controller does not list this node yet (the controller's slurmctld
# role runs after this one): systemd starts it again every 5 s until it is listed.
set -eu
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
need munge slurmd slurm-client

# Values from another node go into config files: an IPv4 address and a port, nothing else.
host=$(crv-agent get munge-key host)
port=$(crv-agent get munge-key port)
# (a `case` pattern sees the whole value: a newline is refused like any other character)
case "$host" in *[!0-9.]* | '') echo "bad controller address '$host'" >&2; exit 1 ;; esac
printf '%s\n' "$host" | grep -Eqx '([0-9]{1,3}\.){3}[0-9]{1,3}' || { echo "bad controller address '$host'" >&2; exit 1; }
case "$port" in '' | *[!0-9]* | ?????? | 0*) echo "bad slurmctld port '$port'" >&2; exit 1 ;; esac
case "$CRV_NODE" in '' | -* | *[!a-z0-9-]*) echo "bad node name '$CRV_NODE'" >&2; exit 1 ;; esac

# The munge key: decoded from the blackboard straight into a root-only file next to the key,
# checked (munge takes 32 to 1024 bytes), then renamed over it. Never printed.
key=/etc/munge/munge.key
umask 077
trap 'rm -f "$key.new"' EXIT
rm -f "$key.new"
if ! crv-agent get munge-key munge_key | base64 -d >"$key.new" 2>/dev/null; then
    echo "the controller's munge key is not valid base64" >&2
    exit 1
fi
size=$(wc -c <"$key.new")
if [ "$size" -lt 32 ] || [ "$size" -gt 1024 ]; then
    echo "no usable munge key from the controller ($size bytes)" >&2
    exit 1
fi
chown munge:munge "$key.new"
chmod 0400 "$key.new"
systemctl enable --quiet munge
if swap "$key.new" "$key"; then
    systemctl restart munge
    echo "the controller's munge key installed"
else
    systemctl start munge
fi
trap - EXIT

# What slurmd sees of this machine ("NodeName=x CPUs=1 Boards=1 ... RealMemory=721"): the
# controller puts this line into slurm.conf (and checks every field of it first).
line=$(slurmd -C | head -1)
cpus=$(printf '%s\n' "$line" | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
memory=$(printf '%s\n' "$line" | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
if [ -z "$cpus" ] || [ -z "$memory" ]; then echo "slurmd -C said: $line" >&2; exit 1; fi

# slurmd: configless, named after the crv node, started again by systemd until it is listed
install -d /var/lib/slurm/slurmd /var/log/slurm /etc/systemd/system/slurmd.service.d
cat >/etc/systemd/system/slurmd.service.d/crv.conf.new <<'UNIT'
# Written by crv (slurm/slurmd). Configless: no /etc/slurm/slurm.conf on this node.
[Unit]
ConditionPathExists=
StartLimitIntervalSec=0
[Service]
Restart=on-failure
RestartSec=5
UNIT
printf 'SLURMD_OPTIONS="--conf-server %s:%s -N %s"\n' "$host" "$port" "$CRV_NODE" >/etc/default/slurmd.new
changed=0
swap /etc/systemd/system/slurmd.service.d/crv.conf.new /etc/systemd/system/slurmd.service.d/crv.conf && changed=1
swap /etc/default/slurmd.new /etc/default/slurmd && changed=1
[ "$changed" = 0 ] || systemctl daemon-reload
systemctl enable --quiet slurmd
if [ "$changed" = 1 ]; then systemctl restart slurmd; else systemctl start slurmd; fi
echo "slurmd configless from $host:$port as $CRV_NODE ($cpus CPUs, $memory MB): it runs once the controller lists it"

# A drain that gave up (roles/slurmd-drain.sh: the shrink kept this node) is undone.
if [ -f slurmd-drained ]; then
    SLURM_CONF=/var/lib/slurm/slurmd/conf-cache/slurm.conf \
        scontrol update NodeName="$CRV_NODE" State=RESUME \
        || { echo "could not resume $CRV_NODE in Slurm after a failed drain" >&2; exit 1; }
    rm -f slurmd-drained
fi

crv-agent set slurm_node "NodeName=$CRV_NODE NodeAddr=$CRV_ADDRESS CPUs=$cpus RealMemory=$memory"
crv-agent set host "$CRV_ADDRESS"
