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
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
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
# (also what the queue publisher below reads: renamed into place, never half written)
printf '%s\n' "$names" | tr ',' '\n' | sort >slurm-compute-nodes.new
mv -f slurm-compute-nodes.new slurm-compute-nodes
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

# The queue, for the compute group's autoscaling (appliance.yaml, `scaling.queue`): every
# queue-every seconds, one publisher (a systemd service: exactly one, whatever re-runs this
# recipe, and started again if it dies) publishes what slurmctld says - pending_nodes (the nodes
# the waiting jobs ask for), pending, running and node_states (`NODE=STATE`, Slurm's long state
# names, the crv compute nodes only). A round whose squeue or sinfo fails, or prints what it
# should not, publishes nothing: the readings age, and the autoscaler does nothing on a stale
# queue. Jobs that more nodes would not start (held, waiting for a dependency or a begin time)
# are left out of pending and pending_nodes.
every="${CRV_PARAM_QUEUE_EVERY:-15}"
case "$every" in '' | *[!0-9]* | 0*) echo "bad queue-every '$every'" >&2; exit 1 ;; esac
if [ "$every" -lt 5 ] || [ "$every" -gt 60 ]; then echo "queue-every '$every': 5 to 60 seconds" >&2; exit 1; fi
cat >slurm-queue.py.new <<'QUEUE'
"""Written by crv (slurm/slurmctld): publishes the Slurm queue on the crv blackboard, as the
slurmctld role's pending_nodes, pending, running and node_states (what the compute group's
autoscaling reads). `slurm-queue.py once` reads and publishes one round; `slurm-queue.py loop
SECONDS` does so every SECONDS (the crv-slurm-queue service). It runs in the agent's work
directory with the recipe's CRV_AGENT_HOME, CRV_ROLE and PATH (slurm-queue.env), and runs the
agent's own `crv-agent set` in this process: a new Python for each value cost the controller
(TCG) 0.7 s of CPU each, 4 values every 15 s."""

import importlib.machinery
import importlib.util
import re
import shutil
import subprocess
import sys
import time

# the order they are published in: the counts first, so that a reader between two calls sees
# fewer waiting nodes than there are (it waits a round), never more (it would grow too much)
KEYS = ("pending_nodes", "pending", "running", "node_states")
# pending jobs that more nodes would not start
NOT_FOR_NODES = {"Dependency", "DependencyNeverSatisfied", "BeginTime", "JobHeld", "JobHeldUser",
                 "JobHeldAdmin"}
JOB = re.compile(r"([A-Z_]+) ([0-9]{1,6})(?:-[0-9]{1,6})? (\S.*)")  # %T %D %r (%D: 2 or 2-4)
NODE = re.compile(r"([a-z][a-z0-9-]{0,62}) ([a-z_+]{1,64}[*~#!%$@^-]?)")  # %N %T


class Skip(Exception):
    """This round publishes nothing; the message says why."""


def run(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise Skip(f"{argv[0]} failed ({e}): nothing published") from None
    if r.returncode != 0:
        said = " ".join(r.stderr.split())[:200]
        raise Skip(f"{argv[0]} failed ({said or r.returncode}): nothing published")
    return [line for line in r.stdout.splitlines() if line.strip()]


def read_queue():
    """KEYS -> values, from squeue and sinfo; Skip when they cannot be had as they should be."""
    try:
        with open("slurm-compute-nodes", encoding="utf-8") as f:
            mine = set(f.read().split())
    except OSError:
        mine = set()
    if not mine:
        raise Skip("no compute node list yet")
    jobs = run(["squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING,CONFIGURING", "-o", "%T %D %r"])
    nodes = run(["sinfo", "-h", "-N", "-o", "%N %T"])
    pending_nodes = pending = running = 0
    for line in jobs:
        m = JOB.fullmatch(line)
        if not m:
            raise Skip(f"squeue printed an unexpected line ({line[:80]!r}): nothing published")
        state, count, reason = m.groups()
        if state != "PENDING":
            running += 1
        elif reason not in NOT_FOR_NODES:
            pending, pending_nodes = pending + 1, pending_nodes + int(count)
    states = {}
    for line in nodes:
        m = NODE.fullmatch(line)
        if not m:
            raise Skip(f"sinfo printed an unexpected line ({line[:80]!r}): nothing published")
        if m.group(1) in mine:  # crv's compute nodes only; a node of two partitions once
            states.setdefault(m.group(1), m.group(2))
    words = " ".join(f"{n}={states[n]}" for n in sorted(states))
    return dict(zip(KEYS, (str(pending_nodes), str(pending), str(running), words), strict=True))


def agent():
    """`crv-agent ARGV...` as a function: the agent's own main() loaded once from its file when
    it is the Python program (as on crv's guests), else the command."""
    path = shutil.which("crv-agent")
    try:
        with open(path or "", "rb") as f:
            python = b"python" in f.readline()
        if python:
            loader = importlib.machinery.SourceFileLoader("crv_agent_cli", path)
            module = importlib.util.module_from_spec(importlib.util.spec_from_loader(
                "crv_agent_cli", loader))
            loader.exec_module(module)
            return module.main
    except (OSError, SyntaxError, ImportError):
        pass
    return lambda argv: subprocess.run(["crv-agent", *argv], check=False, timeout=120).returncode


def publish(values, set_):
    for key in KEYS:
        try:
            code = set_(["set", key, values[key]])
        except Exception as e:  # noqa: BLE001 - whatever the agent raised, this round failed
            code = f"{type(e).__name__}: {e}"
        if code != 0:
            raise Skip(f"crv-agent set {key} failed ({code}): the round is not wholly published")


def main(argv):
    if argv[:1] == ["once"] and len(argv) == 1:
        try:
            publish(read_queue(), agent())
        except Skip as e:
            print(e)
            return 1
        return 0
    if argv[:1] != ["loop"] or len(argv) != 2 or not argv[1].isdigit():
        print("usage: slurm-queue.py once | loop SECONDS", file=sys.stderr)
        return 2
    every, set_, said = int(argv[1]), agent(), None
    while True:
        started = time.monotonic()
        try:
            values = read_queue()
            publish(values, set_)
            now = "published: " + " ".join(f"{k}={values[k]}" for k in KEYS[:3])
            now += f" {values['node_states']}"
        except Skip as e:
            now = str(e)
        if now != said:  # each change once, not every round
            print(now, flush=True)
            said = now
        time.sleep(max(1.0, every - (time.monotonic() - started)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
QUEUE
here=$(pwd)
python=$(command -v python3)
agent=$(command -v crv-agent)
# systemd reads these: paths of this node's agent, nothing secret
for value in "$here" "$python" "${CRV_AGENT_HOME:-}" "$CRV_ROLE" "$PATH"; do
    case "$value" in '' | *[!A-Za-z0-9_./:-]*) echo "cannot hand '$value' to the queue publisher's unit" >&2; exit 1 ;; esac
done
{
    # the agent it loads: a new agent restarts the publisher (the file differs)
    printf '# crv-agent %s\n' "$(sha256sum <"$agent" | cut -d' ' -f1)"
    printf 'CRV_AGENT_HOME=%s\nCRV_ROLE=%s\nPATH=%s\n' "$CRV_AGENT_HOME" "$CRV_ROLE" "$PATH"
} >slurm-queue.env.new
cat >crv-slurm-queue.service.new <<UNIT
# Written by crv (slurm/slurmctld): the Slurm queue on the crv blackboard, every $every s.
[Unit]
Description=crv: publish the Slurm queue for autoscaling
After=slurmctld.service
StartLimitIntervalSec=0
[Service]
WorkingDirectory=$here
EnvironmentFile=$here/slurm-queue.env
Environment=PYTHONUNBUFFERED=1
ExecStart=$python $here/slurm-queue.py loop $every
Restart=always
RestartSec=5
[Install]
WantedBy=multi-user.target
UNIT
queue_changed=0
swap slurm-queue.py.new slurm-queue.py && queue_changed=1
swap slurm-queue.env.new slurm-queue.env && queue_changed=1
swap crv-slurm-queue.service.new /etc/systemd/system/crv-slurm-queue.service && queue_changed=1
[ "$queue_changed" = 0 ] || systemctl daemon-reload
systemctl enable --quiet crv-slurm-queue
if [ "$queue_changed" = 1 ]; then
    systemctl restart crv-slurm-queue
    echo "the queue publisher (crv-slurm-queue) publishes every $every s"
else
    systemctl start crv-slurm-queue  # nothing if it runs: one publisher
fi

crv-agent set host "$CRV_ADDRESS"
crv-agent set port "$port"
crv-agent set nodes "$names"
