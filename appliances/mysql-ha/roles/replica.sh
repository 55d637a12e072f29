#!/bin/sh
# Role replica: a read-only MariaDB server replicating from the primary with GTID.
#
# No password: the replica logs in to the primary as crv_repl with its own crv certificate
# (the primary requires a certificate from the crv CA), and it checks the primary's certificate
# against the crv CA and the primary's address (MASTER_SSL_VERIFY_SERVER_CERT). A fresh replica
# starts from the primary's first binlog, which the primary keeps for this purpose.
# Re-contextualization (e.g. a new primary address) repoints replication only if it changed.
set -eu
port=3306
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
# shellcheck source=lib/common.sh
. "$CRV_APPLIANCE_DIR/roles/lib/common.sh"

# Blackboard values end up in SQL: accept only what a host name, an address or a port looks like.
primary_host=$(crv-agent get primary host)
primary_port=$(crv-agent get primary port)
case "$primary_host" in '' | *[!A-Za-z0-9.:-]*) echo "bad primary host '$primary_host'" >&2; exit 1 ;; esac
case "$primary_port" in '' | *[!0-9]*) echo "bad primary port '$primary_port'" >&2; exit 1 ;; esac

need mariadb-server

install_identity  # sets crt, and certs=1 when a file changed
server_id=$(node_server_id)
# No binlog here: the replica never writes transactions of its own, so its GTID history stays
# the primary's (gtid_strict_mode would otherwise stop replication on a local write).
cat >/etc/mysql/mariadb.conf.d/90-crv.cnf.new <<EOF
# Written by crv (mysql-ha/replica); rewritten on every contextualization.
[mysqld]
bind-address = 0.0.0.0
port = $port
server_id = $server_id
read_only = ON
relay_log = relay-bin
gtid_strict_mode = ON
ssl_ca = $crt/ca.pem
ssl_cert = $crt/cert.pem
ssl_key = $crt/key.pem
require_secure_transport = ON
EOF
systemctl enable mariadb
if swap /etc/mysql/mariadb.conf.d/90-crv.cnf.new /etc/mysql/mariadb.conf.d/90-crv.cnf; then
    systemctl restart mariadb
else
    systemctl start mariadb
    if [ "$certs" = 1 ]; then mariadb -e 'FLUSH SSL'; fi
fi

slave_field() {  # one field of SHOW SLAVE STATUS (empty when replication is not set up)
    mariadb -e 'SHOW SLAVE STATUS\G' | sed -n "s/^ *$1: //p"
}

if [ "$(slave_field Master_Host)" != "$primary_host" ] || [ "$(slave_field Master_Port)" != "$primary_port" ]; then
    mariadb <<SQL
STOP SLAVE;
CHANGE MASTER TO
    MASTER_HOST = '$primary_host',
    MASTER_PORT = $primary_port,
    MASTER_USER = 'crv_repl',
    MASTER_PASSWORD = '',
    MASTER_SSL = 1,
    MASTER_SSL_CA = '$crt/ca.pem',
    MASTER_SSL_CERT = '$crt/cert.pem',
    MASTER_SSL_KEY = '$crt/key.pem',
    MASTER_SSL_VERIFY_SERVER_CERT = 1,
    MASTER_USE_GTID = slave_pos;
SQL
fi
mariadb -e 'START SLAVE'

# Fail here, with the server's own reason, rather than publish a replica that does not replicate.
i=0
until [ "$(slave_field Slave_IO_Running)" = Yes ] && [ "$(slave_field Slave_SQL_Running)" = Yes ]; do
    i=$((i + 1))
    if [ "$i" -ge 60 ]; then
        echo "replication from $primary_host:$primary_port is not running:" >&2
        mariadb -e 'SHOW SLAVE STATUS\G' | grep -E 'Running:|Last_(IO|SQL)_Error:' >&2
        exit 1
    fi
    sleep 1
done

crv-agent set host "$CRV_ADDRESS"
crv-agent set port "$port"
