#!/usr/bin/env bash
# Failover mid-fill: a 256 MiB file from a mirror set of two nginx origins
# that serve the same bytes with the same strong ETag (nginx derives it from
# size and mtime, and the copies share both). One fill runs uninterrupted;
# in a second, fresh one, the mirror the fill is reading from is killed at
# 50 %: Cistern continues from its offset on the other mirror (Range +
# If-Range). Reports both times, their ratio and the SHA-256 check.
# Loopback only. See bench/README.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SIZE_MIB=${SIZE_MIB:-256}
RATE=${RATE:-64m}   # per-connection origin rate (nginx limit_rate)
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-failover.txt}
LOG_TAG=failover
. "$HERE/lib.sh"
find_cistern
make_workdir
read -r PA PB PC < <(free_ports 3)
mkdir -p "$WORK/a/www" "$WORK/b/www"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$WORK/a/www/big.iso"
cp -p "$WORK/a/www/big.iso" "$WORK/b/www/big.iso"
WANT=$(sha256sum "$WORK/a/www/big.iso" | cut -d' ' -f1)
declare -A OPID
start_origin() { # name port
    local d="$WORK/$1"
    cat >"$d/nginx.conf" <<NG
daemon off; master_process on; user root; worker_processes 1;
pid $d/nginx.pid; error_log $d/err.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $d/b; proxy_temp_path $d/p; fastcgi_temp_path $d/f; uwsgi_temp_path $d/u; scgi_temp_path $d/s;
    server { listen 127.0.0.1:$2; root $d/www; limit_rate $RATE; }
}
NG
    /usr/sbin/nginx -c "$d/nginx.conf" & OPID[$1]=$!; PIDS+=($!); wait_port "$2" "$!" 10
}
fill_once() { # tag kill-at-half(0/1) -> prints seconds and sha
    local d="$WORK/c-$1"; mkdir -p "$d"
    cat >"$d/config.kdl" <<KDL
listen "127.0.0.1:$PC"
store {
    root "$d/replica"
}
mirror "m" {
    prefix "/m/"
    upstream "http://127.0.0.1:$PA/"
    upstream "http://127.0.0.1:$PB/"
}
KDL
    "$CISTERN" --config "$d/config.kdl" 2>"$d/cistern.log" & local cpid=$!; PIDS+=($cpid); wait_port "$PC" "$cpid" 10
    local t0 t1
    t0=$(date +%s.%N)
    curl -s -o "$d/got" "http://127.0.0.1:$PC/m/big.iso" & local curl=$!
    if [ "$2" = 1 ]; then
        # The partial grows in the state directory; at half, kill the origin
        # Cistern is reading from (the one with an established connection).
        while :; do
            local have
            have=$(find "$d/replica.cistern" -name '*.part' -printf '%s\n' 2>/dev/null | sort -n | tail -1)
            [ -n "$have" ] && [ "$have" -ge $((SIZE_MIB << 19)) ] && break
            kill -0 "$curl" 2>/dev/null || break
            sleep 0.02
        done
        local victim
        if ss -tn state established "( sport = :$PA )" | grep -q 127.0.0.1; then victim=a; else victim=b; fi
        # The master and its worker, which holds the connection.
        kill -9 $(tree_pids "${OPID[$victim]}")
        echo "killed mirror $victim at $have bytes" >"$d/killed"
    fi
    wait "$curl"
    t1=$(date +%s.%N)
    stop "$cpid"
    local got
    got=$(sha256sum "$d/got" | cut -d' ' -f1)
    echo "$(python3 -c "print(f'{$t1-$t0:.2f}')") $([ "$got" = "$WANT" ] && echo sha-ok || echo SHA-MISMATCH) $(cat "$d/killed" 2>/dev/null | tr ' ' '_')"
}
start_origin a "$PA"; start_origin b "$PB"
read -r T_PLAIN S_PLAIN _ < <(fill_once plain 0)
read -r T_CUT S_CUT KILLED < <(fill_once cut 1)
{
    echo "Failover mid-fill, $(date -u +%Y-%m-%dT%H:%MZ), $("$CISTERN" --version): $SIZE_MIB MiB at $RATE/s per origin connection"
    echo "uninterrupted: ${T_PLAIN} s, $S_PLAIN"
    echo "first mirror killed at 50 % (${KILLED//_/ }): ${T_CUT} s, $S_CUT"
    echo "ratio: $(python3 -c "print(f'{$T_CUT/$T_PLAIN:.2f}')")"
} | tee "$RESULTS_FILE"
