#!/bin/sh
# Role munge (compute): the controller's munge key, munged, and this node's size for slurm.conf.
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
need munge slurmd
key=/etc/munge/munge.key
umask 077
crv-agent get munge-key munge_key | base64 -d >"$key.new"
[ "$(wc -c <"$key.new")" -ge 32 ] || { echo "no usable munge key from the controller" >&2; exit 1; }
chown munge:munge "$key.new" && chmod 400 "$key.new"
systemctl enable munge
if swap "$key.new" "$key"; then systemctl restart munge; else systemctl start munge; fi
# What slurmd sees of this machine: "NodeName=x CPUs=1 ... RealMemory=721"
line=$(slurmd -C | head -1)
cpus=$(printf '%s\n' "$line" | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
memory=$(printf '%s\n' "$line" | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
[ -n "$cpus" ] && [ -n "$memory" ] || { echo "slurmd -C said: $line" >&2; exit 1; }
# slurm.conf's line for this node, as the controller will write it (it checks every field)
crv-agent set slurm_node "NodeName=$CRV_NODE NodeAddr=$CRV_ADDRESS CPUs=$cpus RealMemory=$memory"
crv-agent set host "$CRV_ADDRESS"
