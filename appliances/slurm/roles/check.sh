#!/bin/sh
# Role check (controller): waits until every compute node is up in Slurm (idle or busy), and
# writes the verify, which runs one job step on every compute node and checks who answered.
set -eu
# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
need slurm-client
nodes=$(crv-agent get slurmctld nodes)
case "$nodes" in '' | *[!A-Za-z0-9,-]*) echo "bad node list '$nodes'" >&2; exit 1 ;; esac
count=$(printf '%s\n' "$nodes" | tr ',' '\n' | grep -c .)
i=0
until [ "$(sinfo -h -N -n "$nodes" -t idle,mix,alloc -o %N | sort -u | grep -c .)" -ge "$count" ]; do
    i=$((i + 1))
    if [ "$i" -ge 90 ]; then
        echo "not every compute node is up in Slurm:" >&2; sinfo -N -n "$nodes" >&2; exit 1
    fi
    sleep 1
done
cat >srun-everywhere.sh <<CHECK
#!/bin/sh
# crv's verify of slurm/check: one job step on each of the $count compute nodes
set -eu
out=\$(timeout 50 srun -N $count --ntasks-per-node=1 hostname | sort)
want=\$(printf '%s\n' "$nodes" | tr ',' '\n' | sort)
[ "\$out" = "\$want" ] || { echo "srun -N $count hostname said: \$out" >&2; exit 1; }
echo "srun -N $count hostname ran on: \$(printf '%s ' \$out)"
CHECK
