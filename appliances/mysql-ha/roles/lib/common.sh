# shellcheck shell=sh disable=SC2034  # install_identity sets crt and certs for the caller
# Shared by the mysql-ha recipes (sourced, not run). Callers have done `set -eu` and sourced
# crv's lib/crv.sh (need, swap).

# mysqld runs as mysql and cannot read the agent's files; the key stays readable by mysql only.
# crv renews node certificates: a re-run with new files reloads them (FLUSH SSL), no restart.
install_identity() {
    crt=/etc/mysql/crv
    install -d -m 750 -o root -g mysql "$crt"
    certs=0
    install -m 644 "${CRV_CLUSTER_CA_FILE:-$CRV_CA_FILE}" "$crt/ca.pem.new"
    install -m 644 "$CRV_CERT_FILE" "$crt/cert.pem.new"
    install -m 600 -o mysql -g mysql "$CRV_KEY_FILE" "$crt/key.pem.new"
    for f in ca cert key; do swap "$crt/$f.pem.new" "$crt/$f.pem" && certs=1; done
}

# server_id must differ between primary and replicas; a checksum of the node name is stable.
node_server_id() {
    id=$(printf %s "$CRV_NODE" | cksum | cut -d' ' -f1)
    [ "$id" -ne 0 ] || id=1
    echo "$id"
}
