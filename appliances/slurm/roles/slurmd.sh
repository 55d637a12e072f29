#!/bin/sh
# Role slurmd (compute): slurmd, configless: it fetches slurm.conf from slurmctld. Re-run (and
# restarted) when the controller's node set changed, which Slurm 22.05 needs.
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
need slurmd munge
host=$(crv-agent get slurmctld host)
port=$(crv-agent get slurmctld port)
nodes=$(crv-agent get slurmctld nodes)
case "$host" in '' | *[!0-9.]*) echo "bad slurmctld host '$host'" >&2; exit 1 ;; esac
case "$port" in '' | *[!0-9]*) echo "bad slurmctld port '$port'" >&2; exit 1 ;; esac
case ",$nodes," in *",$CRV_NODE,"*) ;; *) echo "the controller does not list $CRV_NODE yet" >&2; exit 1 ;; esac

install -d /var/lib/slurm/slurmd /var/log/slurm /etc/systemd/system/slurmd.service.d
# Debian's unit starts only where /etc/slurm/slurm.conf exists; configless nodes have none
printf '[Unit]\nConditionPathExists=\n' >/etc/systemd/system/slurmd.service.d/crv.conf.new
printf 'SLURMD_OPTIONS="--conf-server %s:%s -N %s"\n' "$host" "$port" "$CRV_NODE" >/etc/default/slurmd.new
changed=0
swap /etc/systemd/system/slurmd.service.d/crv.conf.new /etc/systemd/system/slurmd.service.d/crv.conf && changed=1
swap /etc/default/slurmd.new /etc/default/slurmd && changed=1
[ "$changed" = 1 ] && systemctl daemon-reload
systemctl enable slurmd
# always a restart: this runs when the controller's node set changed, and slurmd must re-register
systemctl restart slurmd
wait_for_port "$CRV_ADDRESS" 6818 30 || { echo "slurmd did not start listening" >&2; journalctl -u slurmd -n 5 --no-pager >&2 || true; exit 1; }
crv-agent set host "$CRV_ADDRESS"
