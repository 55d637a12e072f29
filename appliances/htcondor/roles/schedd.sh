#!/bin/sh
# Role schedd: the submit node. Its schedd advertises itself to the central manager; local
# users submit with condor_submit (known by their login, FS), and jobs reach the execute
# nodes through the sessions the negotiator sets up.
#
# Security: as in central-manager.sh - every daemon authenticates with its crv node certificate
# (SSL, crv CA only) and only certificates of this cluster (O=<cluster>) are authorized.
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
# shellcheck source=lib/condor.sh
. "$CRV_APPLIANCE_DIR/roles/lib/condor.sh"

# The central manager's address comes from another node and lands in condor's configuration.
cm_host=$(crv-agent get central-manager host)
cm_port=$(crv-agent get central-manager port)
case "$cm_host" in '' | *[!A-Za-z0-9.:-]*) echo "bad central manager host '$cm_host'" >&2; exit 1 ;; esac
case "$cm_port" in '' | *[!0-9]*) echo "bad central manager port '$cm_port'" >&2; exit 1 ;; esac

install_condor
# ALLOW_WRITE = *: local users submit here (authenticated by FS); READ stays open, the rest
# needs a certificate of this cluster.
configure_condor "$cm_host" <<EOF
use ROLE : Submit
ALLOW_WRITE = *
EOF
wait_port "$port"

# Publish only once the central manager lists this schedd: proof that SSL and the map work.
i=0
until [ -n "$(condor_status -schedd -constraint "Name == \"$CRV_NODE\"" -af Name 2>/dev/null || true)" ]; do
    i=$((i + 1))
    if [ "$i" -ge 60 ]; then
        echo "the central manager at $cm_host:$cm_port does not list this schedd; recent log lines:" >&2
        grep -hiE 'error|denied|ssl|secman' /var/log/condor/MasterLog /var/log/condor/SchedLog 2>/dev/null | tail -n 15 >&2
        exit 1
    fi
    sleep 2
done
touch /etc/condor/crv/configured

crv-agent set host "$CRV_ADDRESS"
