#!/usr/bin/env bash
# TLS per core: Cistern (a TLS `site`) beside nginx (`proxy_cache`, one
# worker, TLS 1.3), both caching the same nginx origin, over HTTPS with
# HTTP/1.1 (wrk) and HTTP/2 (h2load). The load generator is pinned to one
# CPU, the server under test and the origin to the other, as in
# bench/peers.sh. One self-signed certificate serves both. See
# bench/README.md.
#
# Usage: bench/tls.sh      (DURATION=10 CONNS=64 STREAMS=10 … to change the knobs)
# Writes the table to $RESULTS_FILE (default bench/last-tls.txt).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

DURATION=${DURATION:-10}          # seconds per measured run
CONNS=${CONNS:-64}                # connections (wrk and h2load)
STREAMS=${STREAMS:-10}            # h2load streams per connection (-m)
LOAD_CPU=${LOAD_CPU:-0}           # wrk and h2load
SERVER_CPU=${SERVER_CPU:-1}       # the server under test and the origin
SYSTEMS=${SYSTEMS:-"nginx cistern"}
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-tls.txt}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
SITE=bench.test

LOG_TAG=tls
. "$HERE/lib.sh"

# --------------------------------------------------------------------------
# Tools (Debian packages)
need_apt=()
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl)
command -v taskset >/dev/null || need_apt+=(util-linux)
apt_install "${need_apt[@]}"
[ "$(nproc)" -ge 2 ] || die "needs two CPUs: one for the load, one for the server"

find_cistern

ON_SERVER=(taskset -c "$SERVER_CPU")
ON_LOAD=(taskset -c "$LOAD_CPU")

# --------------------------------------------------------------------------
# Work dir, ports, cleanup
make_workdir

read -r P_ORIGIN P_PROXY < <(free_ports 2)
log "work dir $WORK; origin :$P_ORIGIN, server under test :$P_PROXY (https); load on CPU $LOAD_CPU, servers on CPU $SERVER_CPU"


# --------------------------------------------------------------------------
# One self-signed certificate (ECDSA P-256, the usual choice for TLS 1.3
# sites) for both servers.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=$SITE" -addext "subjectAltName=DNS:$SITE" \
    -keyout "$WORK/site.key" -out "$WORK/site.pem" 2>/dev/null || die "openssl could not make a certificate"

# --------------------------------------------------------------------------
# Payloads and the origin (plain HTTP nginx, one worker, on the server CPU)
mkdir -p "$WORK/www" "$WORK/origin.tmp"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
head -c $((64 << 10)) /dev/urandom >"$WORK/www/64k.bin"

cat >"$WORK/origin.conf" <<EOF
$(nginx_main "$WORK/origin.pid" "$WORK/origin.error.log")
http {
$(nginx_http_common "$WORK/origin.tmp")
    log_format counted '\$request_uri';
    access_log $WORK/origin.access.log counted;
    server {
        listen 127.0.0.1:$P_ORIGIN;
        root $WORK/www;
        add_header Cache-Control "public, max-age=86400";
    }
}
EOF
"${ON_SERVER[@]}" /usr/sbin/nginx -c "$WORK/origin.conf" 2>>"$WORK/origin.error.log" &
ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
wait_port "$P_ORIGIN" "$ORIGIN_PID"
origin_count() { grep -c "^$1\$" "$WORK/origin.access.log" || true; }

# --------------------------------------------------------------------------
# The servers under test: each caches the origin at / of https://$SITE,
# with an empty cache, on one CPU.
start_nginx() {
    local d="$WORK/nginx"; mkdir -p "$d/cache"
    cat >"$d/nginx.conf" <<EOF
$(nginx_main "$d/nginx.pid" "$d/error.log")
http {
$(nginx_http_common "$d")
    access_log off;
    proxy_cache_path $d/cache levels=1:2 keys_zone=bench:10m max_size=4g inactive=1h use_temp_path=off;
    server {
        listen 127.0.0.1:$P_PROXY ssl http2;
        server_name $SITE;
        ssl_certificate $WORK/site.pem;
        ssl_certificate_key $WORK/site.key;
        ssl_protocols TLSv1.3;
        http2_max_concurrent_streams 128;
        location / {
            proxy_pass http://127.0.0.1:$P_ORIGIN;
            proxy_http_version 1.1;
            proxy_cache bench;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
        }
    }
}
EOF
    "${ON_SERVER[@]}" /usr/sbin/nginx -c "$d/nginx.conf" 2>>"$d/stderr.log" &
    PID=$!
}
start_cistern() {
    local d="$WORK/cistern"; mkdir -p "$d"
    # The default site answers requests that name 127.0.0.1 rather than
    # $SITE (wrk and h2load connect by address, without SNI).
    cat >"$d/config.kdl" <<EOF
listen "127.0.0.1:0"
store {
    root "$d/replica"
}
forward {
    enabled #false
}
site "$SITE" {
    listen "127.0.0.1:$P_PROXY"
    tls cert="$WORK/site.pem" key="$WORK/site.key"
    upstream "http://127.0.0.1:$P_ORIGIN/"
}
default-site "$SITE"
EOF
    "$CISTERN" check "$d/config.kdl" >/dev/null || die "cistern rejected its config"
    # The access log stays on, at Cistern's default level.
    "${ON_SERVER[@]}" "$CISTERN" --config "$d/config.kdl" 2>>"$d/stderr.log" &
    PID=$!
}

# --------------------------------------------------------------------------
# Measurements
WRK_LUA="$WORK/report.lua"
write_wrk_report "$WRK_LUA"
wrk_run() { # url seconds
    local out
    out=$(timeout $(($2 + 30)) "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d"$2s" --timeout 30s -s "$WRK_LUA" "$1" 2>&1) || die "wrk failed: $out"
    grep '^BENCH' <<<"$out" | sed 's/^BENCH //' || die "no wrk summary: $out"
}
# h2load over HTTP/2 (ALPN h2): the same kind of line, the percentiles
# from its per-request log (start µs, status, duration µs).
h2_run() { # url seconds size
    local out logf="$WORK/h2load.log"
    rm -f "$logf"
    out=$(timeout $(($2 + 30)) "${ON_LOAD[@]}" h2load -t1 -c"$CONNS" -m"$STREAMS" -D"$2" --warm-up-time=1 \
        --log-file="$logf" "$1" 2>&1) || die "h2load failed: $out"
    grep -qi '^application protocol: h2' <<<"$out" || die "h2load did not speak h2: $out"
    printf '%s\n' "$out" >"$WORK/h2load.out"
    python3 - "$logf" "$3" "$WORK/h2load.out" "$2" <<'EOF'
import re, sys
text = open(sys.argv[3]).read()
done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
# h2load counts the requests of the main duration (-D) only; its
# "finished in" includes the warm-up.
secs = float(sys.argv[4])
lat = sorted(int(l.split("\t")[2]) for l in open(sys.argv[1]) if l.strip())
pct = lambda p: lat[min(len(lat) - 1, int(len(lat) * p / 100))] if lat else 0
ok = int(done.group(1))
bad = sum(int(done.group(i)) for i in (2, 3, 4))
status_bad = sum(1 for l in open(sys.argv[1]) if l.strip() and l.split("\t")[1] != "200")
print(f"requests={ok} bytes={ok * int(sys.argv[2])} duration_us={int(secs * 1e6)} p50_us={pct(50)} p99_us={pct(99)} errors={bad} status_errors={status_bad}")
EOF
}
field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$2"; }
rps() { python3 -c "import sys; print(f'{int(sys.argv[1])/(int(sys.argv[2])/1e6):.0f}')" "$(field requests "$1")" "$(field duration_us "$1")"; }
mbps() { python3 -c "import sys; print(f'{int(sys.argv[1])/(int(sys.argv[2])/1e6)/1e6:.0f}')" "$(field bytes "$1")" "$(field duration_us "$1")"; }
ms() { python3 -c "print(f'{$(field "$1" "$2")/1000:.2f}')"; }
WARNINGS=()
check() { # name line
    local e s
    e=$(field errors "$2"); s=$(field status_errors "$2")
    if [ "$e" != 0 ] || [ "$s" != 0 ]; then WARNINGS+=("$1: $e socket errors, $s bad statuses"); log "WARNING: $1: $e socket errors, $s bad statuses"; fi
}
warm() { # sys path
    local i
    for i in 1 2 3; do
        curl -sSk -o /dev/null --max-time 60 -w '%{http_code}\n' --resolve "$SITE:$P_PROXY:127.0.0.1" \
            "https://$SITE:$P_PROXY/$2" >"$WORK/warm.code" || die "$1: warm-up of $2 failed"
        grep -q '^200$' "$WORK/warm.code" || die "$1: warm-up of $2 answered $(cat "$WORK/warm.code")"
        sleep 0.2
    done
}
# The server's CPU over a measured run: busy % of its one CPU (below 100,
# the load generator, not the server, set the pace) and µs per request.
# h2load's figure includes its 1 s warm-up, so its busy % is over
# DURATION + 1 and its per-request cost slightly high.
cpu() { # sys key ticks-before line
    local used=$(( $(cpu_ticks "$PROXY_PID") - $3 )) secs=$DURATION
    [[ $2 == h2_* ]] && secs=$((DURATION + 1))
    R[${1}_${2}_busy]=$(python3 -c "print(f'{$used / $TICK / $secs * 100:.0f}')")
    R[${1}_${2}_us]=$(python3 -c "print(f'{$used / $TICK * 1e6 / max(1, $(field requests "$4")):.1f}')")
}
declare -A R
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

for sys in $SYSTEMS; do
    log "$sys: starting with an empty cache on CPU $SERVER_CPU"
    "start_$sys"; PROXY_PID=$PID; PIDS+=("$PROXY_PID")
    wait_port "$P_PROXY" "$PROXY_PID"
    for obj in 1k.bin 64k.bin; do warm "$sys" "$obj"; done
    R[${sys}_tls]=$(openssl s_client -connect "127.0.0.1:$P_PROXY" -servername "$SITE" -alpn h2 </dev/null 2>/dev/null \
        | sed -n 's/^New, \(.*\)$/\1/p' | head -1)
    declare -A before=()
    for obj in 1k.bin 64k.bin; do before[$obj]=$(origin_count "/$obj"); done
    base="https://127.0.0.1:$P_PROXY"

    wrk_run "$base/1k.bin" 2 >/dev/null
    log "$sys: hot 1 KiB, HTTP/1.1 (wrk)"
    c0=$(cpu_ticks "$PROXY_PID")
    line=$(wrk_run "$base/1k.bin" "$DURATION"); check "$sys 1k h1" "$line"
    cpu "$sys" h1_1k "$c0" "$line"
    R[${sys}_h1_1k]=$(rps "$line"); R[${sys}_h1_1k_p50]=$(ms p50_us "$line"); R[${sys}_h1_1k_p99]=$(ms p99_us "$line")
    log "$sys: hot 64 KiB, HTTP/1.1 (wrk)"
    c0=$(cpu_ticks "$PROXY_PID")
    line=$(wrk_run "$base/64k.bin" "$DURATION"); check "$sys 64k h1" "$line"
    cpu "$sys" h1_64k "$c0" "$line"
    R[${sys}_h1_64k]=$(mbps "$line")

    log "$sys: hot 1 KiB, HTTP/2 (h2load -m$STREAMS)"
    c0=$(cpu_ticks "$PROXY_PID")
    line=$(h2_run "$base/1k.bin" "$DURATION" 1024); check "$sys 1k h2" "$line"
    cpu "$sys" h2_1k "$c0" "$line"
    R[${sys}_h2cipher]=$(sed -n 's/^Cipher: //p' "$WORK/h2load.out" | head -1)
    R[${sys}_h2_1k]=$(rps "$line"); R[${sys}_h2_1k_p50]=$(ms p50_us "$line"); R[${sys}_h2_1k_p99]=$(ms p99_us "$line")
    log "$sys: hot 64 KiB, HTTP/2 (h2load -m$STREAMS)"
    c0=$(cpu_ticks "$PROXY_PID")
    line=$(h2_run "$base/64k.bin" "$DURATION" 65536); check "$sys 64k h2" "$line"
    cpu "$sys" h2_64k "$c0" "$line"
    R[${sys}_h2_64k]=$(mbps "$line")

    for obj in 1k.bin 64k.bin; do
        now=$(origin_count "/$obj")
        [ "$now" = "${before[$obj]}" ] || WARNINGS+=("$sys: the origin was asked for $obj $((now - before[$obj])) more times during the hot runs (not all hits)")
    done
    stop "$PROXY_PID"
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$P_PROXY") 2>/dev/null || break; sleep 0.1; done
    (exec 3<>"/dev/tcp/127.0.0.1/$P_PROXY") 2>/dev/null && die "$sys still listens on :$P_PROXY after it was stopped"
done

# --------------------------------------------------------------------------
# Report: each figure, and Cistern / nginx.
row() { # label key
    local label=$1 key=$2 s r=""
    printf '%-40s' "$label"
    for s in $SYSTEMS; do printf ' %10s' "${R[${s}_$key]:--}"; done
    if [ -n "${R[cistern_$key]:-}" ] && [ -n "${R[nginx_$key]:-}" ]; then
        r=$(python3 -c "import sys; c,n=map(float,sys.argv[1:]); print(f'{c/n:.2f}' if n else 'n/a')" "${R[cistern_$key]}" "${R[nginx_$key]}")
    fi
    printf ' %14s\n' "$r"
}
{
    echo "TLS per core, Cistern beside nginx, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "machine: $(nproc) cores, $(free -h | awk '/^Mem/ {print $2}') RAM, $(uname -sr)"
    echo "load on CPU $LOAD_CPU (wrk -t1 / h2load -t1, $CONNS connections, h2load -m$STREAMS), each server and the origin on CPU $SERVER_CPU"
    echo "load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "versions: $(/usr/sbin/nginx -v 2>&1 | sed 's/.*\///') ($(openssl version | cut -d' ' -f1-2)), $("$CISTERN" --version), $(h2load --version | head -1), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
    for s in $SYSTEMS; do echo "TLS with $s: openssl s_client ${R[${s}_tls]:-?}; h2load's cipher ${R[${s}_h2cipher]:-?}"; done
    echo "knobs: DURATION=$DURATION CONNS=$CONNS STREAMS=$STREAMS"
    echo
    printf '%-40s' "measure"; for s in $SYSTEMS; do printf ' %10s' "$s"; done; printf ' %14s\n' "cistern/nginx"
    row "HTTP/1.1 hot 1 KiB, requests/s" h1_1k
    row "HTTP/1.1 hot 1 KiB, p50 ms" h1_1k_p50
    row "HTTP/1.1 hot 1 KiB, p99 ms" h1_1k_p99
    row "HTTP/1.1 hot 1 KiB, server CPU busy %" h1_1k_busy
    row "HTTP/1.1 hot 1 KiB, server CPU µs/req" h1_1k_us
    row "HTTP/1.1 hot 64 KiB, MB/s" h1_64k
    row "HTTP/1.1 hot 64 KiB, server CPU busy %" h1_64k_busy
    row "HTTP/1.1 hot 64 KiB, server CPU µs/req" h1_64k_us
    row "HTTP/2 hot 1 KiB, requests/s" h2_1k
    row "HTTP/2 hot 1 KiB, p50 ms" h2_1k_p50
    row "HTTP/2 hot 1 KiB, p99 ms" h2_1k_p99
    row "HTTP/2 hot 1 KiB, server CPU busy %" h2_1k_busy
    row "HTTP/2 hot 1 KiB, server CPU µs/req" h2_1k_us
    row "HTTP/2 hot 64 KiB, MB/s" h2_64k
    row "HTTP/2 hot 64 KiB, server CPU busy %" h2_64k_busy
    row "HTTP/2 hot 64 KiB, server CPU µs/req" h2_64k_us
    for w in "${WARNINGS[@]}"; do echo "WARNING: $w"; done
} | tee "$RESULTS_FILE"
log "results written to $RESULTS_FILE"
