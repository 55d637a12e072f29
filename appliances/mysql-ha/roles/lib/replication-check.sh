#!/bin/sh
# The replica's verify (`on_node`, run by the agent in the replica role's environment): a row
# written on the primary, over TLS as crv_client authenticated by this node's certificate, is
# read here, from the local replica, within 30 s.
set -eu
crt=/etc/mysql/crv  # where the replica recipe installed this node's identity (lib/common.sh)
db="${CRV_PARAM_DATABASE:-app}"
case "$db" in '' | *[!A-Za-z0-9_]*) echo "database name '$db': only letters, digits and _" >&2; exit 1 ;; esac
host=$(crv-agent get primary host)
port=$(crv-agent get primary port)
case "$host" in '' | *[!A-Za-z0-9.:-]*) echo "bad primary host '$host'" >&2; exit 1 ;; esac
case "$port" in '' | *[!0-9]*) echo "bad primary port '$port'" >&2; exit 1 ;; esac
token=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
mariadb --host="$host" --port="$port" --user=crv_client --ssl --ssl-verify-server-cert \
    --ssl-ca="$crt/ca.pem" --ssl-cert="$crt/cert.pem" --ssl-key="$crt/key.pem" "$db" -e "
    CREATE TABLE IF NOT EXISTS crv_replication_check (node VARCHAR(64) PRIMARY KEY, token CHAR(16));
    REPLACE INTO crv_replication_check VALUES ('$CRV_NODE', '$token');"
i=0
until [ "$(mariadb -N "$db" -e "SELECT token FROM crv_replication_check WHERE node = '$CRV_NODE'" 2>/dev/null)" = "$token" ]; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || { echo "row $token written on $host never reached this replica" >&2; exit 1; }
    sleep 0.5
done
echo "row $token written on the primary $host is read on this replica"
