#!/bin/sh
# Role central-manager: condor_collector + condor_negotiator, from HTCondor's own apt repository
# (Debian does not package HTCondor) for the series chosen by the `series` parameter.
#
# Security: no pool password, no token. Every daemon authenticates with its crv node
# certificate (SSL method, crv CA only); the map file turns a certificate of THIS cluster
# (subject /O=<cluster>/.../CN=<node>) into <node>@<cluster>, and only those identities may
# advertise, negotiate or write. The crv CA serves every cluster of the service, so the
# O=<cluster> match, not the CA, is what keeps other clusters' nodes out.
# The shared part (install, SSL identity, configuration) is in lib/condor.sh.
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
# shellcheck source=lib/condor.sh
. "$CRV_APPLIANCE_DIR/roles/lib/condor.sh"

cm_port=$port
install_condor
configure_condor "$CRV_ADDRESS" <<EOF
use ROLE : CentralManager
ALLOW_WRITE = *@$CRV_CLUSTER
EOF
wait_port "$port"
touch /etc/condor/crv/configured

crv-agent set host "$CRV_ADDRESS"
crv-agent set port "$port"
