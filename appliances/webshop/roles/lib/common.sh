# shellcheck shell=sh
# Shared by the webshop recipes (sourced, not run). Callers have done `set -eu`.

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
