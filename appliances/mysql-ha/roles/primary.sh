#!/bin/sh
# Role primary: the writable MariaDB server. It writes a GTID binlog from its first statement on,
# so a replica added at any time (scale up) replays everything from the start.
#
# No password exists anywhere: TLS is required on every network connection and both accounts
# below authenticate by certificate, REQUIRE ISSUER = the CA that signed this node's crv
# certificate. The primary cannot name its peers (it depends on no role, so it never learns
# replica or client node names), hence ISSUER rather than SUBJECT. Caveat: that CA certifies
# every node of the crv service, other clusters' too, so it is the network that must keep
# them away from port 3306 until crv issues per-cluster CAs (MariaDB has no subject pattern).
#   crv_repl   - REPLICATION SLAVE, used by this appliance's replicas.
#   crv_client - all rights on the database; clients of the appliance (e.g. webshop's app role)
#                log in with this name and their own crv certificate.
set -eu
port=3306
db="${CRV_PARAM_DATABASE:-app}"
case "$db" in
    '' | *[!A-Za-z0-9_]*) echo "database name '$db': only letters, digits and _" >&2; exit 1 ;;
esac
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=../../../crv/appliance/lib/crv.sh
. "$CRV_APPLIANCE_DIR/../lib/crv.sh"
# shellcheck source=lib/common.sh
. "$CRV_APPLIANCE_DIR/roles/lib/common.sh"

need mariadb-server openssl

install_identity  # sets crt, and certs=1 when a file changed
server_id=$(node_server_id)
cat >/etc/mysql/mariadb.conf.d/90-crv.cnf.new <<EOF
# Written by crv (mysql-ha/primary); rewritten on every contextualization.
[mysqld]
# Debian binds to 127.0.0.1; replicas and clients come from other nodes (TLS only, see below).
bind-address = 0.0.0.0
port = $port
server_id = $server_id
log_bin = mysql-bin
binlog_format = ROW
gtid_strict_mode = ON
# Keep every binlog: a new replica starts from the first one (Debian expires them after 10 days).
expire_logs_days = 0
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

# MariaDB compares REQUIRE ISSUER with OpenSSL's one-line form (/CN=...), which -nameopt compat prints.
issuer=$(openssl x509 -noout -issuer -nameopt compat -in "$crt/cert.pem" | sed 's/^issuer=//')
case "$issuer" in
    /*=*) ;;
    *) echo "cannot read the issuer of $crt/cert.pem" >&2; exit 1 ;;
esac
case "$issuer" in *\'* | *\\*) echo "unexpected character in issuer '$issuer'" >&2; exit 1 ;; esac

# Root logs in through the unix socket (Debian's default); every statement is idempotent and
# goes to the binlog, so replicas receive the database and both accounts.
mariadb <<SQL
CREATE DATABASE IF NOT EXISTS \`$db\`;
CREATE USER IF NOT EXISTS 'crv_repl'@'%' REQUIRE ISSUER '$issuer';
ALTER USER 'crv_repl'@'%' REQUIRE ISSUER '$issuer';
GRANT REPLICATION SLAVE ON *.* TO 'crv_repl'@'%';
CREATE USER IF NOT EXISTS 'crv_client'@'%' REQUIRE ISSUER '$issuer';
ALTER USER 'crv_client'@'%' REQUIRE ISSUER '$issuer';
GRANT ALL PRIVILEGES ON \`$db\`.* TO 'crv_client'@'%';
SQL

crv-agent set host "$CRV_ADDRESS"
crv-agent set port "$port"
crv-agent set database "$db"
