#!/bin/sh
# Role slurmctld (controller), the node list: slurm.conf with one NodeName line per compute
# node and the partition over them, and slurmctld serving it to the configless slurmds. It
# depends on slurmd, so crv runs it again whenever compute nodes come or go (and nothing else
# on the controller). Slurm 22.05 takes added or removed nodes only on a restart of slurmctld;
# the `scontrol reconfigure` after it pushes the new slurm.conf to every running slurmd, so the
# compute nodes that stay learn the new node list without crv running anything on them.
set -eu
export DEBIAN_FRONTEND=noninteractive
partition="${CRV_PARAM_PARTITION:-batch}"
# (a `case` pattern sees the whole value: a newline is refused like any other character)
case "$partition" in '' | *[!A-Za-z0-9_-]*) echo "partition '$partition': letters, digits, _ and - only" >&2; exit 1 ;; esac
[ "${#partition}" -le 32 ] || { echo "partition '$partition': 32 characters at most" >&2; exit 1; }
case "$CRV_CLUSTER" in '' | -* | *[!a-z0-9-]*) echo "bad cluster name '$CRV_CLUSTER'" >&2; exit 1 ;; esac
# slurmctld runs only where the host name is the SlurmctldHost name
me=$(hostname -s)
case "$me" in '' | -* | *[!A-Za-z0-9-]*) echo "bad host name '$me'" >&2; exit 1 ;; esac

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
need slurmctld slurm-client munge

port=$(crv-agent get munge-key port)  # local: this node's own munge-key role
case "$port" in '' | *[!0-9]* | ?????? | 0*) echo "bad slurmctld port '$port'" >&2; exit 1 ;; esac

# Lines from the compute nodes go into slurm.conf: each must be exactly what slurmd.sh writes,
# and a node name may appear once.
crv-agent list slurmd slurm_node >slurm-nodes
[ -s slurm-nodes ] || { echo "no compute node published its slurm.conf line" >&2; exit 1; }
while IFS= read -r line; do
    printf '%s\n' "$line" \
        | grep -Eqx 'NodeName=[a-z][a-z0-9-]{0,62} NodeAddr=([0-9]{1,3}\.){3}[0-9]{1,3} CPUs=[1-9][0-9]{0,3} RealMemory=[1-9][0-9]{0,8}' \
        || { echo "refusing node line '$line'" >&2; exit 1; }
done <slurm-nodes
names=$(sed 's/^NodeName=\([^ ]*\) .*/\1/' slurm-nodes | paste -sd, -)
count=$(wc -l <slurm-nodes)
[ "$(sed 's/ .*//' slurm-nodes | sort -u | wc -l)" = "$count" ] || { echo "a compute node name is listed twice" >&2; exit 1; }

conf=/etc/slurm/slurm.conf
# the node lines slurmctld runs with now: a change of them needs a restart (below)
before=$(grep '^NodeName=' "$conf" 2>/dev/null | sort) || before=""
after=$(sort slurm-nodes)
was=$(printf '%s\n' "$before" | sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' | paste -sd, -)

install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
cat >"$conf.new" <<CONF
# Written by crv (slurm/slurmctld); rewritten on every contextualization. Served to the compute
# nodes by slurmctld (configless): they keep no copy.
ClusterName=$CRV_CLUSTER
SlurmctldHost=$me($CRV_ADDRESS)
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
SlurmdTimeout=120
JobCompType=jobcomp/none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
$(cat slurm-nodes)
PartitionName=$partition Nodes=$names Default=YES MaxTime=INFINITE State=UP
CONF
# Sent to the slurmds too. The guests have no D-Bus, which slurmd's cgroup/v2 plugin would ask
# systemd for a scope through: it makes its cgroup directories itself (slurmd's unit delegates).
cat >/etc/slurm/cgroup.conf.new <<'CONF'
# Written by crv (slurm/slurmctld).
CgroupPlugin=autodetect
IgnoreSystemd=yes
CONF
changed=0
swap /etc/slurm/cgroup.conf.new /etc/slurm/cgroup.conf && changed=1
swap "$conf.new" "$conf" && changed=1

reconfigure() {  # retried: slurmctld may listen before it answers
    i=0
    until scontrol reconfigure >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -lt 30 ] || { echo "scontrol reconfigure failed" >&2; scontrol reconfigure >&2 || true; exit 1; }
        sleep 1
    done
}

# this node runs no slurmd (the package came with it): off, as slurm.conf now exists here
if systemctl is-enabled --quiet slurmd 2>/dev/null; then systemctl disable --quiet --now slurmd; fi
systemctl enable --quiet slurmctld
if ! systemctl is-active --quiet slurmctld; then
    systemctl start slurmctld
    echo "slurmctld started with $count compute nodes: $names"
elif [ "$before" != "$after" ]; then
    systemctl restart slurmctld  # nodes came, went or moved: 22.05 needs the restart
    wait_for_port "$CRV_ADDRESS" "$port" 60 || { echo "slurmctld did not start listening" >&2; tail -5 /var/log/slurm/slurmctld.log >&2; exit 1; }
    reconfigure  # pushes the new slurm.conf to every running slurmd
    echo "slurmctld restarted: compute nodes were ${was:-none}, are $names"
elif [ "$changed" = 1 ]; then
    reconfigure
    echo "slurmctld reconfigured"
fi
wait_for_port "$CRV_ADDRESS" "$port" 60 || { echo "slurmctld did not start listening" >&2; tail -5 /var/log/slurm/slurmctld.log >&2; exit 1; }

# Every compute node registered and able to run jobs: a new slurmd is started again by systemd
# every 5 s until it fetches a slurm.conf that lists it.
i=0
until [ "$(sinfo -h -N -n "$names" -t idle,mix,alloc,comp -o %N 2>/dev/null | sort -u | grep -c .)" -ge "$count" ]; do
    i=$((i + 1))
    if [ "$i" -ge 120 ]; then
        echo "not every compute node is up in Slurm after 120 s:" >&2
        sinfo -N -o '%N %T %E' >&2 || true
        exit 1
    fi
    sleep 1
done
echo "every compute node is up in Slurm (after ${i} s)"

# The verify (run on this node by the agent): every compute node, and no other, runs a job step
# that answers with its name. A node whose CPUs users' jobs hold all cannot take a step now (and
# the verify has 60 s): it passes if Slurm has it allocated and responding, so a resize while
# the cluster is busy does not fail.
printf '%s\n' "$names" | tr ',' '\n' | sort >slurm-compute-nodes
cat >slurm-srun-everywhere.sh <<'CHECK'
#!/bin/sh
# Written by crv (slurm/slurmctld): the verify of the node list in slurm-compute-nodes.
set -eu
want=$(cat slurm-compute-nodes)
names=$(printf '%s\n' "$want" | paste -sd, -)
for try in 1 2; do
    free="" busy=""
    states=$(sinfo -h -N -n "$names" -o '%N %t' | sort -u)
    for node in $want; do
        state=$(printf '%s\n' "$states" | sed -n "s/^$node //p" | head -1)
        case "$state" in
            idle | mix) free="$free $node" ;;
            alloc) busy="$busy $node" ;;
            *) echo "$node is '${state:-not listed}' in Slurm" >&2; exit 1 ;;
        esac
    done
    # shellcheck disable=SC2086  # node names: one word each
    n=$(printf '%s\n' $free | grep -c . || true)
    out=""
    if [ "$n" -gt 0 ]; then
        # shellcheck disable=SC2086
        nodes=$(printf '%s\n' $free | paste -sd, -)
        out=$(timeout 25 srun -N "$n" -w "$nodes" --ntasks-per-node=1 -t 1 --immediate=15 --chdir=/ hostname | sort) || true
    fi
    # shellcheck disable=SC2086
    if [ "$out" = "$(printf '%s\n' $free | sort)" ] || { [ "$n" = 0 ] && [ -z "$out" ]; }; then
        if [ "$n" = 0 ]; then
            echo "every compute node is busy with users' jobs:$busy"
        elif [ -n "$busy" ]; then
            echo "srun -N $n hostname ran on: $(printf '%s\n' "$out" | paste -sd' ' -) (busy with users' jobs:$busy)"
        else
            echo "srun -N $n hostname ran on: $(printf '%s\n' "$out" | paste -sd' ' -)"
        fi
        exit 0
    fi
    [ "$try" = 2 ] || sleep 2  # a free node may have been taken meanwhile
done
echo "srun -N $n hostname said: $(printf '%s\n' "$out" | paste -sd' ' -)" >&2
exit 1
CHECK

crv-agent set host "$CRV_ADDRESS"
crv-agent set port "$port"
crv-agent set nodes "$names"
