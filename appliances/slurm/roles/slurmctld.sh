#!/bin/sh
# Role slurmctld (controller): slurm.conf with one NodeName line per compute node, and slurmctld
# serving it to the compute nodes (configless). Re-run when compute nodes come or go: Slurm 22.05
# takes added or removed nodes only on a restart of slurmctld (and of every slurmd: the slurmd
# role depends on this one's `nodes`, which changes with them, so crv re-runs it too).
set -eu
port=6817
partition="${CRV_PARAM_PARTITION:-batch}"
case "$partition" in '' | *[!A-Za-z0-9_-]*) echo "partition '$partition': letters, digits, _ and - only" >&2; exit 1 ;; esac
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
need slurmctld munge

# Lines from other nodes go into slurm.conf: each must be exactly what the munge role writes.
crv-agent list munge slurm_node | sort >nodes.new
while read -r line; do
    printf '%s\n' "$line" | grep -Eqx 'NodeName=[A-Za-z0-9][A-Za-z0-9-]{0,62} NodeAddr=[0-9.]{7,15} CPUs=[0-9]{1,4} RealMemory=[0-9]{1,9}' \
        || { echo "refusing node line '$line'" >&2; exit 1; }
done <nodes.new
[ -s nodes.new ] || { echo "no compute node published its slurm.conf line" >&2; exit 1; }
names=$(sed 's/^NodeName=\([^ ]*\) .*/\1/' nodes.new | paste -sd, -)

install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
cat >/etc/slurm/slurm.conf.new <<CONF
# Written by crv (slurm/slurmctld); rewritten on every contextualization.
ClusterName=$CRV_CLUSTER
SlurmctldHost=$CRV_NODE($CRV_ADDRESS)
SlurmctldPort=$port
SlurmdPort=6818
SlurmctldParameters=enable_configless
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
$(cat nodes.new)
PartitionName=$partition Nodes=$names Default=YES MaxTime=INFINITE State=UP
CONF
systemctl enable slurmctld
if swap /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; then
    systemctl restart slurmctld
else
    systemctl start slurmctld
fi
wait_for_port "$CRV_ADDRESS" "$port" 30 || { echo "slurmctld did not start listening" >&2; tail -5 /var/log/slurm/slurmctld.log >&2; exit 1; }
crv-agent set host "$CRV_ADDRESS"
crv-agent set port "$port"
crv-agent set nodes "$names"
