# shellcheck shell=sh disable=SC2034,SC2154  # sourced: callers use port, define cm_port
# Shared by central-manager.sh, schedd.sh and startd.sh (sourced, not run): installing HTCondor
# from its own apt repository and configuring SSL authentication with the crv node identity.
# Callers have done `set -eu` and sourced crv's lib/crv.sh (need, swap, wait_for_port); this
# file defines variables and functions only.
port=9618
series="${CRV_PARAM_SERIES:-24.x}"
case "$series" in '' | *[!0-9.x]*) echo "bad HTCondor series '$series'" >&2; exit 1 ;; esac
export DEBIAN_FRONTEND=noninteractive

# HTCondor's repository layout: repo/<debian|ubuntu>/<series> <codename> main, signed by
# repo/keys/HTCondor-<series>-Key (fetched over HTTPS once per series).
install_condor() {
    # shellcheck source=/dev/null
    distro=$(. /etc/os-release && echo "$ID")
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    need ca-certificates curl
    key=/etc/apt/keyrings/htcondor-$series.asc
    if [ ! -s "$key" ]; then
        install -d -m 755 /etc/apt/keyrings
        curl -fsSL "https://research.cs.wisc.edu/htcondor/repo/keys/HTCondor-$series-Key" -o "$key.new"
        mv -f "$key.new" "$key"
    fi
    echo "deb [signed-by=$key] https://research.cs.wisc.edu/htcondor/repo/$distro/$series $codename main" \
        >/etc/apt/sources.list.d/htcondor.list.new
    swap /etc/apt/sources.list.d/htcondor.list.new /etc/apt/sources.list.d/htcondor.list || true
    need condor
}

# Writes certificates, map file and 99-crv.config (role-specific lines on stdin), then
# (re)starts condor: a restart until one contextualization succeeded (network identity,
# daemon list), a reconfig afterwards, so that running jobs survive a re-contextualization.
configure_condor() {
    case "$1" in *:*) cm="[$1]" ;; *) cm=$1 ;; esac
    d=/etc/condor/crv
    install -d -m 755 "$d"
    changed=0
    install -m 644 "${CRV_CLUSTER_CA_FILE:-$CRV_CA_FILE}" "$d/ca.pem.new"
    install -m 644 "$CRV_CERT_FILE" "$d/cert.pem.new"
    install -m 600 "$CRV_KEY_FILE" "$d/key.pem.new"
    for f in ca cert key; do swap "$d/$f.pem.new" "$d/$f.pem" && changed=1; done
    cat >"$d/mapfile.new" <<EOF
SSL "^/O=$CRV_CLUSTER/(OU=[^/]+/)*CN=([a-z0-9-]+)\$" \\2@$CRV_CLUSTER
FS (.*) \\1
EOF
    swap "$d/mapfile.new" "$d/mapfile" && changed=1
    {
        echo "# Written by crv (htcondor/$CRV_ROLE); rewritten on every contextualization."
        echo "CONDOR_HOST = $cm"
        echo "COLLECTOR_HOST = \$(CONDOR_HOST):$cm_port"
        # Unique daemon and machine names even when every guest is called 'debian'.
        echo "NETWORK_HOSTNAME = $CRV_NODE"
        # Advertise the address crv gave this node: the interface if it is local, else (NAT)
        # as the forwarding host.
        case " $(hostname -I 2>/dev/null) " in
            *" $CRV_ADDRESS "*) echo "NETWORK_INTERFACE = $CRV_ADDRESS" ;;
            *) echo "TCP_FORWARDING_HOST = $CRV_ADDRESS" ;;
        esac
        cat
        cat <<EOF
SEC_DEFAULT_AUTHENTICATION = REQUIRED
SEC_DEFAULT_ENCRYPTION = REQUIRED
SEC_DEFAULT_INTEGRITY = REQUIRED
# condor_status and condor_q work for anyone who can reach the port, as in HTCondor's default.
SEC_READ_AUTHENTICATION = OPTIONAL
SEC_READ_ENCRYPTION = OPTIONAL
SEC_READ_INTEGRITY = OPTIONAL
# FS first: local users (condor_submit) are known by their login; other machines fall to SSL.
SEC_DEFAULT_AUTHENTICATION_METHODS = FS, SSL
SEC_CLIENT_AUTHENTICATION_METHODS = FS, SSL
AUTH_SSL_SERVER_CAFILE = $d/ca.pem
AUTH_SSL_SERVER_CERTFILE = $d/cert.pem
AUTH_SSL_SERVER_KEYFILE = $d/key.pem
AUTH_SSL_CLIENT_CAFILE = $d/ca.pem
AUTH_SSL_CLIENT_CERTFILE = $d/cert.pem
AUTH_SSL_CLIENT_KEYFILE = $d/key.pem
AUTH_SSL_SERVER_USE_DEFAULT_CAS = False
AUTH_SSL_CLIENT_USE_DEFAULT_CAS = False
AUTH_SSL_REQUIRE_CLIENT_CERTIFICATE = True
# HTCondor checks a server certificate's DNS names, never its IP addresses, and the central
# manager is known here only by address: the peer is still verified against the crv CA and,
# on the server side, mapped and authorized by the rules above.
SSL_SKIP_HOST_CHECK = True
CERTIFICATE_MAPFILE = $d/mapfile
ALLOW_READ = *
ALLOW_DAEMON = *@$CRV_CLUSTER
ALLOW_NEGOTIATOR = *@$CRV_CLUSTER
ALLOW_ADMINISTRATOR = root@*, condor@*
EOF
    } >/etc/condor/config.d/99-crv.config.new
    swap /etc/condor/config.d/99-crv.config.new /etc/condor/config.d/99-crv.config && changed=1
    systemctl enable condor
    if [ ! -e "$d/configured" ]; then
        systemctl restart condor
    elif [ "$changed" = 1 ]; then
        systemctl reload-or-restart condor
    else
        systemctl start condor
    fi
}

wait_port() {
    wait_for_port 127.0.0.1 "$1" 60 || { echo "HTCondor is not listening" >&2; exit 1; }
}
