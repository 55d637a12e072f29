# shellcheck shell=sh disable=SC2034  # install_identity sets crt and certs for the caller
# Shared by the mysql-ha recipes (sourced, not run). Callers have done `set -eu`.

need() {  # installs only what is missing, so a re-run does not touch apt
    missing=""
    for p in "$@"; do
        dpkg-query -W -f="\${Status}\n" "$p" 2>/dev/null | grep -q ' installed$' || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    apt-get update -q
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -q --no-install-recommends $missing
}

swap() {  # moves $1 over $2 only if the content differs; true when $2 changed
    if cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
    mv -f "$1" "$2" || exit 1
}

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
