#!/usr/bin/env bash
# What one hit on a large replica costs Cistern in system calls, and the
# memory it holds: a 256 MiB file from an nginx origin, fetched twice (miss,
# then a warm hit), then a third time under `strace -c -f`. With
# BASELINE_BIN set, the same for that binary first, so a change to the hit
# path is seen side by side (e.g. the fast lane's sendfile against a build
# without it). Counts of calls do not depend on what else the machine does;
# times in strace's table do. Loopback only. See bench/README.md.
#
# Usage: bench/syscalls.sh        (CISTERN_BIN=… BASELINE_BIN=… SIZE_MIB=256)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SIZE_MIB=${SIZE_MIB:-256}
BASELINE_BIN=${BASELINE_BIN:-}
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-syscalls.txt}
LOG_TAG=syscalls
. "$HERE/lib.sh"
find_cistern
need=()
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v strace >/dev/null || need+=(strace)
command -v curl >/dev/null || need+=(curl)
apt_install "${need[@]}"
make_workdir
read -r P_ORIGIN P_PROXY < <(free_ports 2)

mkdir -p "$WORK/www" "$WORK/n"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$WORK/www/big.bin"
cat >"$WORK/nginx.conf" <<NG
daemon off; master_process on; user root; worker_processes 1;
pid $WORK/nginx.pid; error_log $WORK/nginx.err warn;
events {}
http {
    access_log off; sendfile on;
    client_body_temp_path $WORK/n/b; proxy_temp_path $WORK/n/p; fastcgi_temp_path $WORK/n/f; uwsgi_temp_path $WORK/n/u; scgi_temp_path $WORK/n/s;
    server { listen 127.0.0.1:$P_ORIGIN; root $WORK/www; }
}
NG
/usr/sbin/nginx -c "$WORK/nginx.conf" -p "$WORK" </dev/null >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$P_ORIGIN" "$!" 10

one() { # label binary
    local dir="$WORK/$1" pid
    mkdir -p "$dir"
    cat >"$dir/config.kdl" <<KD
listen "127.0.0.1:$P_PROXY"
store { root "$dir/replica"; }
mirror "m" { prefix "/m/"; upstream "http://127.0.0.1:$P_ORIGIN/"; }
KD
    (cd "$dir" && CISTERN_LOG=warn exec "$2" --config config.kdl </dev/null >"$dir/cistern.log" 2>&1) &
    pid=$!
    PIDS+=("$pid")
    wait_port "$P_PROXY" "$pid" 20
    local url="http://127.0.0.1:$P_PROXY/m/big.bin"
    curl -sf -o /dev/null "$url"
    curl -sf -o /dev/null "$url"
    timeout -s INT 30 strace -f -c -p "$pid" -o "$dir/strace.txt" </dev/null >/dev/null 2>&1 &
    local st=$!
    sleep 1
    local got
    got=$(curl -sf -o /dev/null -w '%{size_download}' "$url")
    sleep 0.5
    kill -INT "$st" 2>/dev/null || true
    wait "$st" 2>/dev/null || true
    [ "$got" = $((SIZE_MIB << 20)) ] || die "$1: the hit sent $got bytes"
    {
        echo "$1: $("$2" --version), one hit of $SIZE_MIB MiB, RSS after $(( $(rss_kib "$pid") / 1024 )) MiB"
        awk 'NR > 2 && $NF != "total" && $1 !~ /^-/ { printf "  %-16s %8s calls\n", $NF, $4 }' "$dir/strace.txt" \
            | sort -k2 -n -r | head -8
    } >>"$RESULTS_FILE.tmp"
    stop "$pid"
}

: >"$RESULTS_FILE.tmp"
[ -z "$BASELINE_BIN" ] || one baseline "$BASELINE_BIN"
one cistern "$CISTERN"
{ echo "Syscalls of one warm hit, $(date -u +%Y-%m-%dT%H:%MZ)"; cat "$RESULTS_FILE.tmp"; } >"$RESULTS_FILE"
rm -f "$RESULTS_FILE.tmp"
cat "$RESULTS_FILE"
log "results written to $RESULTS_FILE"
