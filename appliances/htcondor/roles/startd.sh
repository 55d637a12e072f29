#!/bin/sh
# Role startd: an execute node. Its startd joins the pool through the central manager with
# static slots: `slots` of them (one CPU each), or one per core when the parameter is 0.
#
# Security: as in central-manager.sh - every daemon authenticates with its crv node certificate
# (SSL, crv CA only) and only certificates of this cluster (O=<cluster>) are authorized.
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
# shellcheck source=lib/condor.sh
. "$CRV_APPLIANCE_DIR/roles/lib/condor.sh"
slots="${CRV_PARAM_SLOTS:-0}"
case "$slots" in '' | *[!0-9]*) echo "bad slots '$slots'" >&2; exit 1 ;; esac

# The central manager's address comes from another node and lands in condor's configuration.
cm_host=$(crv-agent get central-manager host)
cm_port=$(crv-agent get central-manager port)
case "$cm_host" in '' | *[!A-Za-z0-9.:-]*) echo "bad central manager host '$cm_host'" >&2; exit 1 ;; esac
case "$cm_port" in '' | *[!0-9]*) echo "bad central manager port '$cm_port'" >&2; exit 1 ;; esac

install_condor
# NUM_CPUS makes the startd count `slots` CPUs, so StaticSlots cuts exactly that many.
{
    echo "use ROLE : Execute"
    if [ "$slots" -gt 0 ]; then echo "NUM_CPUS = $slots"; fi
    echo "use FEATURE : StaticSlots"
    echo "ALLOW_WRITE = *@$CRV_CLUSTER"
} | configure_condor "$cm_host"
wait_port "$port"

# Publish the slots the central manager actually lists for this machine, and only once it
# lists them: proof that SSL and the map work.
i=0
while :; do
    n=$(condor_status -startd -constraint "Machine == \"$CRV_NODE\"" -af Name 2>/dev/null | wc -l)
    [ "$n" -gt 0 ] && break
    i=$((i + 1))
    if [ "$i" -ge 60 ]; then
        echo "the central manager at $cm_host:$cm_port lists no slot of this node; recent log lines:" >&2
        grep -hiE 'error|denied|ssl|secman' /var/log/condor/MasterLog /var/log/condor/StartLog 2>/dev/null | tail -n 15 >&2
        exit 1
    fi
    sleep 2
done
touch /etc/condor/crv/configured

crv-agent set host "$CRV_ADDRESS"
crv-agent set slots "$n"
