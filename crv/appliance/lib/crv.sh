# shellcheck shell=sh
# crv's shell helpers for recipes (sourced, not run). Every recipe bundle carries this file at
# lib/crv.sh, next to the appliance directories, so a recipe loads it with
#     . "$CRV_APPLIANCE_DIR/../lib/crv.sh"
# It defines functions only. Callers have done `set -eu`.

need() {  # PACKAGE...: installs only what is missing, so a re-run does not touch apt
    missing=""
    for p in "$@"; do
        dpkg-query -W -f="\${Status}\n" "$p" 2>/dev/null | grep -q ' installed$' || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    apt-get update -q
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -q --no-install-recommends $missing
}

swap() {  # NEW FILE: moves NEW over FILE (rename, atomic) only if the content differs; true when FILE changed
    if cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
    mv -f "$1" "$2" || exit 1
}

wait_for_port() {  # HOST PORT [TIMEOUT]: true once HOST:PORT accepts a TCP connection, false after TIMEOUT seconds (30)
    python3 - "$1" "$2" "${3:-30}" <<'PY'
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    left = deadline - time.monotonic()
    try:
        socket.create_connection((host, port), max(0.05, min(1.0, left))).close()
        sys.exit(0)
    except OSError:
        if left <= 0:
            sys.exit(1)
        time.sleep(min(0.1, max(0.0, left)))
PY
}
