#!/bin/sh
# Drain of role slurmd (compute), run before a shrink removes this node: Slurm stops giving it
# jobs (State=DRAIN), then this waits until the jobs running on it have ended, at most
# drain-wait seconds. Exit 0: the node can go (the controller then writes slurm.conf without
# it). Exit 1: jobs still run; crv keeps the node and the slurmd recipe resumes it in Slurm.
set -eu
wait=${CRV_PARAM_DRAIN_WAIT:-300}
case "$wait" in '' | *[!0-9]*) echo "bad drain-wait '$wait'" >&2; exit 1 ;; esac

conf=/var/lib/slurm/slurmd/conf-cache/slurm.conf  # what slurmd fetched from slurmctld
if [ ! -s "$conf" ]; then
    echo "slurmd never got its configuration: no job can run on $CRV_NODE"
    exit 0
fi
export SLURM_CONF="$conf"
scontrol ping >/dev/null || { echo "slurmctld does not answer: cannot tell whether jobs run on $CRV_NODE" >&2; exit 1; }
if ! scontrol -o show node "$CRV_NODE" >/dev/null 2>&1; then
    echo "$CRV_NODE is not in the controller's node list: no job can run on it"
    exit 0
fi
: >slurmd-drained  # so that the recipe resumes the node if this drain gives up
scontrol update NodeName="$CRV_NODE" State=DRAIN Reason="crv: leaving the cluster"
waited=0
while :; do
    jobs=$(squeue -h -w "$CRV_NODE" -o %A) || { echo "squeue failed: cannot tell whether jobs run here" >&2; exit 1; }
    [ -n "$jobs" ] || break
    if [ "$waited" -ge "$wait" ]; then
        echo "jobs still running on $CRV_NODE after ${wait}s: $(printf '%s\n' "$jobs" | paste -sd' ' -)" >&2
        exit 1
    fi
    sleep 5
    waited=$((waited + 5))
done
echo "$CRV_NODE is drained: no job runs on it"
