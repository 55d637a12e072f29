#!/bin/sh
# Role munge-key (controller): the cluster's munge key, made once, and munged running with it.
# The key goes to the compute nodes through the blackboard: an attribute of this role, which the
# crv service lets only nodes that host or depend on this role read (the munge role's nodes).
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
need munge
key=/etc/munge/munge.key
if [ ! -s "$key" ] || [ ! -f munge-key.made ]; then  # never the key an image may carry
    umask 077
    dd if=/dev/urandom of="$key.new" bs=1024 count=1 2>/dev/null
    chown munge:munge "$key.new" && chmod 400 "$key.new"
    mv -f "$key.new" "$key"
    touch munge-key.made
    systemctl restart munge
fi
systemctl enable munge
systemctl start munge
crv-agent set munge_key "$(base64 -w0 "$key")"
crv-agent set host "$CRV_ADDRESS"
