#!/usr/bin/env bash
# Cistern against nginx (proxy_cache) in front of the same origin, on loopback,
# plus Cistern's cost of the three built-in policies. See bench/README.md.
#
# Usage: bench/run.sh            (DURATION=10 CONNS=64 … to change the knobs)
# Writes the table to $RESULTS_FILE (default bench/last-run.txt).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

DURATION=${DURATION:-10}          # seconds per wrk run
CONNS=${CONNS:-64}                # wrk connections for the 1 KiB object
THREADS=${THREADS:-2}             # wrk threads (= cores on the reference machine)
BIG_CONNS=${BIG_CONNS:-4}         # wrk connections for the 256 MiB object
COLD_CLIENTS=${COLD_CLIENTS:-50}  # simultaneous clients of the slow object
SLOW_RATE=${SLOW_RATE:-16m}       # origin trickle rate of the slow object (nginx limit_rate)
POLICY_ROUNDS=${POLICY_ROUNDS:-3} # alternating no-policy / policy wrk runs
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-run.txt}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}

LOG_TAG=bench
. "$HERE/lib.sh"

# --------------------------------------------------------------------------
# Tools
need_apt=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3-minimal)
apt_install "${need_apt[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

find_cistern

# --------------------------------------------------------------------------
# Work dir, ports, cleanup
make_workdir
read -r P_ORIGIN P_NGINX P_CISTERN < <(free_ports 3)
log "work dir $WORK; ports origin=$P_ORIGIN nginx=$P_NGINX cistern=$P_CISTERN"

# --------------------------------------------------------------------------
# Payloads and origin
mkdir -p "$WORK/www/slow"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
head -c $((256 << 20)) /dev/urandom >"$WORK/www/256m.bin"
head -c $((64 << 20)) /dev/urandom >"$WORK/www/slow/64m.bin"

nginx_common() { # name
    cat <<EOF
daemon off;
master_process on;
user root;
pid $WORK/$1.pid;
error_log $WORK/$1.error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_temp() { # name
    cat <<EOF
    client_body_temp_path $WORK/$1.tmp/body;
    proxy_temp_path $WORK/$1.tmp/proxy;
    fastcgi_temp_path $WORK/$1.tmp/fastcgi;
    uwsgi_temp_path $WORK/$1.tmp/uwsgi;
    scgi_temp_path $WORK/$1.tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    default_type application/octet-stream;
EOF
}

mkdir -p "$WORK/origin.tmp"
{
    nginx_common origin
    echo "worker_processes 1;"
    echo "http {"
    nginx_temp origin
    cat <<EOF
    access_log $WORK/origin.access.log;
    server {
        listen 127.0.0.1:$P_ORIGIN;
        root $WORK/www;
        add_header Cache-Control "public, max-age=86400";
        location /slow/ { limit_rate $SLOW_RATE; }
    }
}
EOF
} >"$WORK/origin.conf"
"$NGINX" -t -q -c "$WORK/origin.conf" 2>>"$WORK/origin.error.log" || die "origin config rejected: $(cat "$WORK/origin.error.log")"
"$NGINX" -c "$WORK/origin.conf" 2>>"$WORK/origin.error.log" &
ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
wait_port "$P_ORIGIN" "$ORIGIN_PID" 10

# --------------------------------------------------------------------------
# The two proxies. Each start uses a fresh cache directory.
start_nginx() { # tag -> sets NGINX_PID
    local dir="$WORK/nginx-$1"
    mkdir -p "$dir/cache"
    {
        nginx_common "nginx-$1"
        echo "worker_processes 2;"
        echo "http {"
        nginx_temp "nginx-$1"
        cat <<EOF
    access_log $dir/access.log;
    proxy_cache_path $dir/cache levels=1:2 keys_zone=bench:10m max_size=4g inactive=1h use_temp_path=off;
    server {
        listen 127.0.0.1:$P_NGINX;
        location /m/ {
            proxy_pass http://127.0.0.1:$P_ORIGIN/;
            proxy_http_version 1.1;
            proxy_cache bench;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            # Long enough that every follower waits for the one fill instead
            # of going to the origin itself after the default 5 s.
            proxy_cache_lock_timeout 300s;
            proxy_cache_lock_age 300s;
            add_header X-Cache-Status \$upstream_cache_status;
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    # nginx_common writes pid/error_log under $WORK/nginx-TAG.*
    mkdir -p "$WORK/nginx-$1.tmp"
    "$NGINX" -c "$dir/nginx.conf" 2>>"$dir/stderr.log" &
    NGINX_PID=$!; PIDS+=("$NGINX_PID")
    wait_port "$P_NGINX" "$NGINX_PID" 10
}

start_cistern() { # tag [extra env] -> sets CISTERN_PID
    local dir="$WORK/cistern-$1"
    mkdir -p "$dir"
    cat >"$dir/config.kdl" <<EOF
listen "127.0.0.1:$P_CISTERN"
store {
    root "$dir/replica"
}
forward {
    enabled #false
}
policy "store-id" path="builtin:store-id" {
    param "rule" "http://127.0.0.1:*/* http://bench.cistern/\$2"
}
policy "metalink" path="builtin:metalink"
policy "distro" path="builtin:distro"
mirror "m" {
    prefix "/m/"
    upstream "http://127.0.0.1:$P_ORIGIN/"
}
mirror "p" {
    prefix "/p/"
    upstream "http://127.0.0.1:$P_ORIGIN/"
    policies "store-id" "metalink" "distro"
}
EOF
    "$CISTERN" check "$dir/config.kdl" >/dev/null || die "cistern rejected its config"
    env ${2:-} "$CISTERN" --config "$dir/config.kdl" 2>>"$dir/stderr.log" &
    CISTERN_PID=$!; PIDS+=("$CISTERN_PID")
    wait_port "$P_CISTERN" "$CISTERN_PID" 10
}

# Peak RSS: clear_refs 5 resets VmHWM, so each test's peak is its own.
reset_hwm() { for p in "$@"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
nginx_workers() { pgrep -P "$1" || true; }
nginx_worker_hwm() { # max over workers, KiB
    local m=0 v
    for w in $(nginx_workers "$1"); do v=$(hwm_kib "$w"); [ "$v" -gt "$m" ] && m=$v; done
    echo "$m"
}

# Context switches of all threads of these processes (voluntary + forced).
ctx_switches() {
    local p
    for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null; done |
        awk '/ctxt_switches/ {n += $2} END {print n + 0}'
}

# --------------------------------------------------------------------------
# Measurements
WRK_LUA="$WORK/report.lua"
cat >"$WRK_LUA" <<'EOF'
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("BENCH requests=%d bytes=%d duration_us=%d p50_us=%d p99_us=%d errors=%d status_errors=%d\n",
        summary.requests, summary.bytes, summary.duration,
        latency:percentile(50), latency:percentile(99),
        e.connect + e.read + e.write + e.timeout, e.status))
end
EOF

# wrk_run URL CONNS DURATION -> prints the BENCH line's fields
wrk_run() {
    local out
    out=$(timeout $(($3 + 30)) wrk -t"$THREADS" -c"$2" -d"$3s" --timeout 30s -s "$WRK_LUA" "$1" 2>&1) || die "wrk failed: $out"
    grep '^BENCH' <<<"$out" | sed 's/^BENCH //' || die "no wrk summary: $out"
}
field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$2"; }
rps() { python3 -c "import sys; print(f'{int(sys.argv[1])/(int(sys.argv[2])/1e6):.0f}')" "$(field requests "$1")" "$(field duration_us "$1")"; }
mbps() { python3 -c "import sys; print(f'{int(sys.argv[1])/(int(sys.argv[2])/1e6)/1e6:.0f}')" "$(field bytes "$1")" "$(field duration_us "$1")"; }
check_errors() { # name line
    local e s
    e=$(field errors "$2"); s=$(field status_errors "$2")
    if [ "$e" != 0 ] || [ "$s" != 0 ]; then log "WARNING: $1: $e socket errors, $s non-2xx/3xx"; WARNINGS+=("$1: $e socket errors, $s bad statuses"); fi
}
WARNINGS=()

warm() { # url expected-cache-header-regex
    local i
    for i in 1 2; do
        curl -sS -o /dev/null --max-time 120 -D "$WORK/warm.h" "$1" || die "warm-up of $1 failed"
    done
    grep -q ' 200' "$WORK/warm.h" || die "warm-up of $1: $(head -1 "$WORK/warm.h")"
    grep -iqE "$2" "$WORK/warm.h" || die "$1 is not a cache hit on the second request: $(cat "$WORK/warm.h")"
}

declare -A R
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log "hot phase: starting both proxies with empty caches"
start_nginx hot; NGINX_HOT=$NGINX_PID
start_cistern hot; CISTERN_HOT=$CISTERN_PID
N="http://127.0.0.1:$P_NGINX/m"
C="http://127.0.0.1:$P_CISTERN/m"
CP="http://127.0.0.1:$P_CISTERN/p"
for obj in 1k.bin 256m.bin; do
    warm "$N/$obj" '^x-cache-status: HIT'
    warm "$C/$obj" '^cache-status: cistern; hit'
    warm "$CP/$obj" '^cache-status: cistern; hit'
done
# For test 4b only: Cistern's replica also gets the 64 MiB object.
warm "$C/slow/64m.bin" '^cache-status: cistern; hit'

R[cistern_rss_idle]=$(hwm_kib "$CISTERN_HOT")

# 1. hot 1 KiB
for sys in nginx cistern; do
    url=$N/1k.bin; [ $sys = cistern ] && url=$C/1k.bin
    wrk_run "$url" "$CONNS" 2 >/dev/null # warm-up: connections, caches, JIT-free but page cache
    log "1. hot 1 KiB: $sys"
    if [ $sys = cistern ]; then procs=("$CISTERN_HOT"); else mapfile -t procs < <(nginx_workers "$NGINX_HOT"); fi
    cs0=$(ctx_switches "${procs[@]}")
    line=$(wrk_run "$url" "$CONNS" "$DURATION"); check_errors "$sys 1k" "$line"
    cs1=$(ctx_switches "${procs[@]}")
    R[${sys}_1k_cs]=$(python3 -c "print(f'{($cs1-$cs0)/$(field requests "$line"):.2f}')")
    R[${sys}_1k_rps]=$(rps "$line")
    R[${sys}_1k_p99]=$(python3 -c "print(f'{$(field p99_us "$line")/1000:.2f}')")
    R[${sys}_1k_p50]=$(python3 -c "print(f'{$(field p50_us "$line")/1000:.2f}')")
done

# 2. hot 256 MiB
for sys in nginx cistern; do
    url=$N/256m.bin; [ $sys = cistern ] && url=$C/256m.bin
    reset_hwm "$CISTERN_HOT" $(nginx_workers "$NGINX_HOT")
    log "2. hot 256 MiB: $sys"
    line=$(wrk_run "$url" "$BIG_CONNS" "$DURATION"); check_errors "$sys 256m" "$line"
    R[${sys}_256m_mbps]=$(mbps "$line")
    R[${sys}_256m_reqs]=$(field requests "$line")
    if [ $sys = cistern ]; then R[cistern_256m_rss]=$(hwm_kib "$CISTERN_HOT"); else R[nginx_256m_rss]=$(nginx_worker_hwm "$NGINX_HOT"); fi
done

# 5. policy chain cost (Cistern only), alternating to spread drift over both
log "5. policy chain: $POLICY_ROUNDS rounds of no-policy / three-policy"
plain=(); pol=()
for round in $(seq "$POLICY_ROUNDS"); do
    wrk_run "$C/1k.bin" "$CONNS" 2 >/dev/null
    line=$(wrk_run "$C/1k.bin" "$CONNS" "$DURATION"); check_errors "cistern 1k no policy" "$line"; plain+=("$(rps "$line")")
    wrk_run "$CP/1k.bin" "$CONNS" 2 >/dev/null
    line=$(wrk_run "$CP/1k.bin" "$CONNS" "$DURATION"); check_errors "cistern 1k policies" "$line"; pol+=("$(rps "$line")")
    log "   round $round: no policy ${plain[-1]} req/s, 3 policies ${pol[-1]} req/s"
done
R[policy_plain]=$(python3 -c "import sys; v=list(map(int,sys.argv[1:])); print(round(sum(v)/len(v)))" "${plain[@]}")
R[policy_chain]=$(python3 -c "import sys; v=list(map(int,sys.argv[1:])); print(round(sum(v)/len(v)))" "${pol[@]}")
R[policy_runs]="no policy: ${plain[*]}; 3 policies: ${pol[*]}"
stop "$NGINX_HOT"; stop "$CISTERN_HOT"

# 1b. diagnostic: Cistern's hot 1 KiB with the access log off (warn level),
# to show what the per-request log line costs. Same replica, new process.
start_cistern hot CISTERN_LOG=warn; CISTERN_QUIET=$CISTERN_PID
warm "$C/1k.bin" '^cache-status: cistern; hit'
wrk_run "$C/1k.bin" "$CONNS" 2 >/dev/null
log "1b. hot 1 KiB: cistern, access log off"
line=$(wrk_run "$C/1k.bin" "$CONNS" "$DURATION"); check_errors "cistern 1k quiet" "$line"
R[cistern_1k_quiet_rps]=$(rps "$line")
stop "$CISTERN_QUIET"

# 4b. peak RSS against object size: a fresh process on the same replica, the
# same $BIG_CONNS-connection load on the 64 MiB then the 256 MiB object.
start_cistern hot; CISTERN_RSS=$CISTERN_PID
warm "$C/1k.bin" '^cache-status: cistern; hit'
R[cistern_rss_fresh]=$(hwm_kib "$CISTERN_RSS")
for obj in 64 256; do
    path=256m.bin; [ $obj = 64 ] && path=slow/64m.bin
    log "4b. peak RSS, hot $obj MiB, $BIG_CONNS connections"
    reset_hwm "$CISTERN_RSS"
    line=$(wrk_run "$C/$path" "$BIG_CONNS" "$DURATION"); check_errors "cistern hot ${obj}m" "$line"
    R[cistern_${obj}m_b_rss]=$(hwm_kib "$CISTERN_RSS")
    R[cistern_${obj}m_b_mbps]=$(mbps "$line")
done
stop "$CISTERN_RSS"

# 3. cold clients of the slow object, one system at a time, fresh caches
origin_count() { grep -c ' "GET /slow/64m.bin ' "$WORK/origin.access.log" || true; }
cold() { # sys base-url pid
    local before after t0 t1 f="$WORK/cold-$1.txt" i curls=()
    before=$(origin_count)
    : >"$f"
    t0=$(date +%s.%N)
    for i in $(seq "$COLD_CLIENTS"); do
        curl -s -o /dev/null --max-time 300 \
            -w '%{time_starttransfer} %{time_total} %{http_code} %{size_download}\n' \
            "$2/slow/64m.bin" >"$f.$i" &
        curls+=($!); PIDS+=($!)
    done
    wait "${curls[@]}" || true
    for i in "${curls[@]}"; do untrack "$i"; done
    cat "$f".* >"$f"
    t1=$(date +%s.%N)
    after=$(origin_count)
    R[${1}_cold_origin]=$((after - before))
    R[${1}_cold_total]=$(python3 -c "print(f'{$t1-$t0:.2f}')")
    read -r R[${1}_cold_ttfb_med] R[${1}_cold_ttfb_max] R[${1}_cold_ok] < <(python3 - "$f" $((64 << 20)) <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ttfb = sorted(float(r[0]) for r in rows)
ok = sum(1 for r in rows if r[2] == "200" and int(r[3]) == int(sys.argv[2]))
print(f"{statistics.median(ttfb):.2f} {max(ttfb):.2f} {ok}")
EOF
)
    [ "${R[${1}_cold_ok]}" = "$COLD_CLIENTS" ] || WARNINGS+=("$1 cold: only ${R[${1}_cold_ok]}/$COLD_CLIENTS clients got the full 64 MiB")
}

log "3. $COLD_CLIENTS cold clients of a 64 MiB object trickling at $SLOW_RATE/s: cistern"
start_cistern cold; CISTERN_COLD=$CISTERN_PID
reset_hwm "$CISTERN_COLD"
cold cistern "$C" "$CISTERN_COLD"
R[cistern_cold_rss]=$(hwm_kib "$CISTERN_COLD")
stop "$CISTERN_COLD"

log "3. $COLD_CLIENTS cold clients of a 64 MiB object trickling at $SLOW_RATE/s: nginx"
start_nginx cold; NGINX_COLD=$NGINX_PID
reset_hwm $(nginx_workers "$NGINX_COLD")
cold nginx "$N" "$NGINX_COLD"
R[nginx_cold_rss]=$(nginx_worker_hwm "$NGINX_COLD")
stop "$NGINX_COLD"

# --------------------------------------------------------------------------
# Report
ratio() { python3 -c "import sys; a,b=map(float,sys.argv[1:]); print(f'{a/b:.2f}' if b else 'n/a')" "$1" "$2"; }
mib() { python3 -c "print(f'{$1/1024:.1f}')"; }
loss=$(python3 -c "print(f'{(1-${R[policy_chain]}/${R[policy_plain]})*100:.1f}')")
{
    echo "Cistern vs nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "machine: $(nproc) cores, $(free -h | awk '/^Mem/ {print $2}') RAM, $(uname -sr)"
    echo "load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "cistern: $CISTERN ($("$CISTERN" --version))"
    echo "knobs: DURATION=$DURATION CONNS=$CONNS THREADS=$THREADS BIG_CONNS=$BIG_CONNS COLD_CLIENTS=$COLD_CLIENTS SLOW_RATE=$SLOW_RATE"
    echo
    printf '%-48s %12s %12s %9s\n' "measure" "cistern" "nginx" "c/n"
    printf '%-48s %12s %12s %9s\n' "1. hot 1 KiB: requests/s" "${R[cistern_1k_rps]}" "${R[nginx_1k_rps]}" "$(ratio "${R[cistern_1k_rps]}" "${R[nginx_1k_rps]}")"
    printf '%-48s %12s %12s %9s\n' "1. hot 1 KiB: p50 latency (ms)" "${R[cistern_1k_p50]}" "${R[nginx_1k_p50]}" "$(ratio "${R[cistern_1k_p50]}" "${R[nginx_1k_p50]}")"
    printf '%-48s %12s %12s %9s\n' "1. hot 1 KiB: p99 latency (ms)" "${R[cistern_1k_p99]}" "${R[nginx_1k_p99]}" "$(ratio "${R[cistern_1k_p99]}" "${R[nginx_1k_p99]}")"
    printf '%-48s %12s %12s %9s\n' "1. hot 1 KiB: context switches per request" "${R[cistern_1k_cs]}" "${R[nginx_1k_cs]}" ""
    printf '%-48s %12s %12s %9s\n' "2. hot 256 MiB: MB/s ($BIG_CONNS conns)" "${R[cistern_256m_mbps]}" "${R[nginx_256m_mbps]}" "$(ratio "${R[cistern_256m_mbps]}" "${R[nginx_256m_mbps]}")"
    printf '%-48s %12s %12s %9s\n' "3. cold 64 MiB x$COLD_CLIENTS: origin requests" "${R[cistern_cold_origin]}" "${R[nginx_cold_origin]}" ""
    printf '%-48s %12s %12s %9s\n' "3. cold: total time (s)" "${R[cistern_cold_total]}" "${R[nginx_cold_total]}" "$(ratio "${R[cistern_cold_total]}" "${R[nginx_cold_total]}")"
    printf '%-48s %12s %12s %9s\n' "3. cold: median time to first byte (s)" "${R[cistern_cold_ttfb_med]}" "${R[nginx_cold_ttfb_med]}" "$(ratio "${R[cistern_cold_ttfb_med]}" "${R[nginx_cold_ttfb_med]}")"
    printf '%-48s %12s %12s %9s\n' "3. cold: max time to first byte (s)" "${R[cistern_cold_ttfb_max]}" "${R[nginx_cold_ttfb_max]}" "$(ratio "${R[cistern_cold_ttfb_max]}" "${R[nginx_cold_ttfb_max]}")"
    printf '%-48s %12s %12s %9s\n' "3. cold: clients with all 64 MiB" "${R[cistern_cold_ok]}" "${R[nginx_cold_ok]}" ""
    printf '%-48s %12s %12s %9s\n' "4. peak RSS MiB, after warm-up (idle)" "$(mib "${R[cistern_rss_idle]}")" "" ""
    printf '%-48s %12s %12s %9s\n' "4. peak RSS MiB during 2 (nginx: max worker)" "$(mib "${R[cistern_256m_rss]}")" "$(mib "${R[nginx_256m_rss]}")" ""
    printf '%-48s %12s %12s %9s\n' "4. peak RSS MiB during 3 (nginx: max worker)" "$(mib "${R[cistern_cold_rss]}")" "$(mib "${R[nginx_cold_rss]}")" ""
    printf '%-48s %12s\n' "4b. fresh process: RSS MiB after one hit" "$(mib "${R[cistern_rss_fresh]}")"
    printf '%-48s %12s\n' "4b. peak RSS MiB, hot 64 MiB x$BIG_CONNS conns" "$(mib "${R[cistern_64m_b_rss]}")"
    printf '%-48s %12s\n' "4b. peak RSS MiB, hot 256 MiB x$BIG_CONNS conns" "$(mib "${R[cistern_256m_b_rss]}")"
    printf '%-48s %12s\n' "4b. MB/s in those runs: 64 MiB / 256 MiB" "${R[cistern_64m_b_mbps]} / ${R[cistern_256m_b_mbps]}"
    echo
    printf '%-48s %12s\n' "5. cistern hot 1 KiB, no policy: requests/s" "${R[policy_plain]}"
    printf '%-48s %12s\n' "5. cistern hot 1 KiB, 3 policies: requests/s" "${R[policy_chain]}"
    printf '%-48s %11s%%\n' "5. loss with store-id+metalink+distro" "$loss"
    echo "   runs: ${R[policy_runs]}"
    printf '%-48s %12s\n' "1b. cistern hot 1 KiB, access log off: req/s" "${R[cistern_1k_quiet_rps]}"
    for w in "${WARNINGS[@]}"; do echo "WARNING: $w"; done
} | tee "$RESULTS_FILE"
log "results written to $RESULTS_FILE"
