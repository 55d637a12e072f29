#!/bin/sh
# Role munge-key (controller): the cluster's munge key, made once on this node, and munged
# running with it. The key reaches the compute nodes through the blackboard: it is an attribute
# of this role, which the crv service lets only the nodes that host or depend on this role read
# (the slurmd nodes). It is never printed and lives in no file but /etc/munge/munge.key.
# Also publishes where slurmctld (the slurmctld role, on this node) listens.
set -eu
port=6817
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
need munge

key=/etc/munge/munge.key
umask 077
# A key this role made is kept on every re-run (the marker is in the node's work directory);
# any other one (left by a package install or an image) is replaced by a fresh one.
if [ ! -f munge-key.made ] || [ ! -s "$key" ]; then
    trap 'rm -f "$key.new"' EXIT
    rm -f "$key.new"
    mungekey --create --bits=1024 --keyfile="$key.new"
    chown munge:munge "$key.new"
    chmod 0400 "$key.new"
    mv -f "$key.new" "$key"
    trap - EXIT
    : >munge-key.made
    systemctl restart munge
    echo "munge key made (1024 bits)"
else
    echo "munge key kept"
fi
chown munge:munge "$key"
chmod 0400 "$key"
systemctl enable --quiet munge
systemctl start munge

# The value goes from base64 straight to the agent: it is never echoed nor written elsewhere.
crv-agent set munge_key "$(base64 -w0 "$key")"
crv-agent set host "$CRV_ADDRESS"
crv-agent set port "$port"
