# shellcheck shell=bash
# Sourced by scripts/demo and scripts/test: make a fresh Debian machine ready.
#
#   bootstrap [EXTRA_APT_PACKAGES...]
#
# Installs the system packages tproxy and its tests use (only those missing,
# and only as root), creates .venv if needed and installs the project with its
# test extra (again only when pyproject.toml changed). Quiet unless something
# fails. PYTHON picks the interpreter for a new .venv (default python3, >= 3.11).

BOOTSTRAP_PACKAGES=(iptables iproute2 curl iperf3 iputils-ping procps nftables ca-certificates
    openssl jq tshark bind9-dnsutils redis-server redis-tools)

_say() { printf '==> %s\n' "$*"; }

bootstrap_apt() {
    local packages=("${BOOTSTRAP_PACKAGES[@]}" "$@") missing=() pkg log
    local python=${PYTHON:-python3}
    if [[ ! -x .venv/bin/python ]]; then
        if ! command -v "$python" >/dev/null 2>&1; then
            packages+=(python3 python3-venv)
        elif ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
            packages+=(python3-venv)
        fi
    fi
    if [[ $(id -u) -ne 0 ]]; then
        _say "not root: skipping system packages"
        return 0
    fi
    for pkg in "${packages[@]}"; do
        if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    _say "installing system packages: ${missing[*]}"
    log=$(mktemp)
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
               "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "bootstrap: apt-get failed" >&2
        return 2
    fi
    rm -f "$log"
}

bootstrap_venv() {
    local python=${PYTHON:-python3} py stamp want
    if [[ ! -x .venv/bin/python ]]; then
        command -v "$python" >/dev/null 2>&1 || python=python3
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "bootstrap: $python is older than 3.11; set PYTHON=..." >&2
            return 2
        fi
        _say "creating .venv with $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
        "$python" -m venv .venv
    fi
    py=$(pwd)/.venv/bin/python
    stamp=.venv/.tproxy-install-stamp
    want=$( { sha256sum pyproject.toml; "$py" -V; } | sha256sum | cut -d' ' -f1)
    if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
        _say "installing the project with its test extra into .venv"
        "$py" -m pip install -q -e '.[test]'
        echo "$want" >"$stamp"
    fi
}

bootstrap() {
    bootstrap_apt "$@" && bootstrap_venv
}
