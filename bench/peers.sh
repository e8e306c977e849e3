#!/usr/bin/env bash
# Cistern beside nginx, Varnish and Apache Traffic Server, per core: the load
# generator pinned to one CPU, each proxy and the origin to the other, so no
# system gets a second core (or a second runtime thread) the others lack.
# Same origin, same payloads, same machine, one run. See bench/README.md.
#
# Usage: bench/peers.sh      (DURATION=10 CONNS=64 … to change the knobs)
# Writes the table to $RESULTS_FILE (default bench/last-peers.txt).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

DURATION=${DURATION:-10}          # seconds per wrk run
RUNS=${RUNS:-3}                   # hot runs per object and system: median and spread
CONNS=${CONNS:-64}                # wrk connections, small objects
BIG_CONNS=${BIG_CONNS:-4}         # wrk connections, 256 MiB object
COLD_CLIENTS=${COLD_CLIENTS:-50}  # simultaneous clients of the slow object
SLOW_RATE=${SLOW_RATE:-16m}       # origin trickle rate of the slow object
LOAD_CPU=${LOAD_CPU:-0}           # wrk and curl
SERVER_CPU=${SERVER_CPU:-1}       # the proxy under test and the origin
SYSTEMS=${SYSTEMS:-"nginx varnish ats cistern"}
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-peers.txt}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}

LOG_TAG=peers
. "$HERE/lib.sh"

# --------------------------------------------------------------------------
# Tools (Debian packages)
need_apt=()
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
[ -x /usr/sbin/varnishd ] || need_apt+=(varnish)
command -v traffic_server >/dev/null || need_apt+=(trafficserver)
command -v wrk >/dev/null || need_apt+=(wrk)
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
# Varnish reads its VCL as its own unprivileged user.
chmod 755 "$WORK"

read -r P_ORIGIN P_PROXY < <(free_ports 2)
log "work dir $WORK; origin :$P_ORIGIN, proxy under test :$P_PROXY; load on CPU $LOAD_CPU, servers on CPU $SERVER_CPU"


# --------------------------------------------------------------------------
# Payloads and the origin (nginx, one worker, on the server CPU)
mkdir -p "$WORK/www/slow" "$WORK/origin.tmp"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
head -c $((64 << 10)) /dev/urandom >"$WORK/www/64k.bin"
head -c $((256 << 20)) /dev/urandom >"$WORK/www/256m.bin"
head -c $((64 << 20)) /dev/urandom >"$WORK/www/slow/64m.bin"

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
        location /slow/ { limit_rate $SLOW_RATE; }
    }
}
EOF
"${ON_SERVER[@]}" /usr/sbin/nginx -c "$WORK/origin.conf" 2>>"$WORK/origin.error.log" &
ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
wait_port "$P_ORIGIN" "$ORIGIN_PID"
origin_count() { grep -c "^$1\$" "$WORK/origin.access.log" || true; }

# --------------------------------------------------------------------------
# The proxies: each serves the origin under /m/ with an empty cache, one CPU.
start_nginx() {
    local d="$WORK/nginx"; mkdir -p "$d/cache"
    cat >"$d/nginx.conf" <<EOF
$(nginx_main "$d/nginx.pid" "$d/error.log")
http {
$(nginx_http_common "$d")
    access_log off;
    proxy_cache_path $d/cache levels=1:2 keys_zone=bench:10m max_size=4g inactive=1h use_temp_path=off;
    server {
        listen 127.0.0.1:$P_PROXY;
        location /m/ {
            proxy_pass http://127.0.0.1:$P_ORIGIN/;
            proxy_http_version 1.1;
            proxy_cache bench;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 300s;
            proxy_cache_lock_age 300s;
        }
    }
}
EOF
    "${ON_SERVER[@]}" /usr/sbin/nginx -c "$d/nginx.conf" 2>>"$d/stderr.log" &
    PID=$!
}
start_varnish() {
    local d="$WORK/varnish"; mkdir -p "$d"
    cat >"$d/default.vcl" <<EOF
vcl 4.1;
backend origin { .host = "127.0.0.1"; .port = "$P_ORIGIN"; }
sub vcl_recv { set req.url = regsub(req.url, "^/m/", "/"); }
EOF
    # One thread pool; malloc storage as Varnish is commonly run.
    "${ON_SERVER[@]}" /usr/sbin/varnishd -F -n "$d/state" -a "127.0.0.1:$P_PROXY" -f "$d/default.vcl" \
        -s malloc,1G -p thread_pools=1 -T none >"$d/stderr.log" 2>&1 &
    PID=$!
}
start_ats() {
    local d="$WORK/ats"; mkdir -p "$d/etc" "$d/run" "$d/log" "$d/cache"
    cp -a /etc/trafficserver/. "$d/etc/"
    echo "map /m/ http://127.0.0.1:$P_ORIGIN/" >"$d/etc/remap.config"
    echo "$d/cache 2G" >"$d/etc/storage.config"
    cat >"$d/runroot.yaml" <<EOF
prefix: /usr
exec_prefix: /usr
bindir: /usr/bin
sbindir: /usr/sbin
sysconfdir: $d/etc
datadir: $d/cache
includedir: /usr/include
libdir: /usr/lib/trafficserver
libexecdir: /usr/lib/trafficserver/modules
localstatedir: $d
runtimedir: $d/run
logdir: $d/log
cachedir: $d/cache
EOF
    # One event thread (the unit of work in ATS), logging off as for nginx.
    # taskset and env exec, so $PID is traffic_server's own.
    "${ON_SERVER[@]}" env -C "$d" PROXY_CONFIG_ADMIN_USER_ID='#-1' PROXY_CONFIG_HTTP_SERVER_PORTS="$P_PROXY" \
        PROXY_CONFIG_EXEC_THREAD_AUTOCONFIG=0 PROXY_CONFIG_EXEC_THREAD_LIMIT=1 \
        PROXY_CONFIG_ACCEPT_THREADS=0 PROXY_CONFIG_LOG_LOGGING_ENABLED=0 \
        PROXY_CONFIG_HTTP_CACHE_REQUIRED_HEADERS=0 \
        traffic_server --run-root="$d/runroot.yaml" >"$d/stderr.log" 2>&1 &
    PID=$!
}
start_cistern() {
    local d="$WORK/cistern"; mkdir -p "$d"
    cat >"$d/config.kdl" <<EOF
listen "127.0.0.1:$P_PROXY"
store {
    root "$d/replica"
}
forward {
    enabled #false
}
mirror "m" {
    prefix "/m/"
    upstream "http://127.0.0.1:$P_ORIGIN/"
}
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
wrk_run() { # url conns seconds
    local out
    out=$(timeout $(($3 + 30)) "${ON_LOAD[@]}" wrk -t1 -c"$2" -d"$3s" --timeout 30s -s "$WRK_LUA" "$1" 2>&1) || die "wrk failed: $out"
    grep '^BENCH' <<<"$out" | sed 's/^BENCH //' || die "no wrk summary: $out"
}
field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$2"; }
rps() { python3 -c "import sys; print(f'{int(sys.argv[1])/(int(sys.argv[2])/1e6):.0f}')" "$(field requests "$1")" "$(field duration_us "$1")"; }
mbps() { python3 -c "import sys; print(f'{int(sys.argv[1])/(int(sys.argv[2])/1e6)/1e6:.0f}')" "$(field bytes "$1")" "$(field duration_us "$1")"; }
ms() { python3 -c "print(f'{$(field "$1" "$2")/1000:.2f}')"; }
WARNINGS=()
check() { # name wrk-line
    local e s
    e=$(field errors "$2"); s=$(field status_errors "$2")
    if [ "$e" != 0 ] || [ "$s" != 0 ]; then WARNINGS+=("$1: $e socket errors, $s bad statuses"); log "WARNING: $1: $e socket errors, $s bad statuses"; fi
}
# Two GETs, then the origin must not be asked again: every later request
# of the object is a hit, whatever header each proxy uses to say so.
warm() { # sys path
    local i
    for i in 1 2 3; do
        curl -sS -o /dev/null --max-time 120 -w '%{http_code}\n' "http://127.0.0.1:$P_PROXY/m/$2" >"$WORK/warm.code" || die "$1: warm-up of $2 failed"
        grep -q '^200$' "$WORK/warm.code" || die "$1: warm-up of $2 answered $(cat "$WORK/warm.code")"
        sleep 0.2
    done
}
median() { python3 -c "import sys, statistics; m = statistics.median(float(v) for v in sys.argv[1:]); print(f'{m:.0f}' if m >= 100 else f'{m:.2f}')" "$@"; }
spread() { python3 -c "import sys; v=[float(x) for x in sys.argv[1:]]; f=lambda x: f'{x:g}'; print(f(min(v)) + '-' + f(max(v)))" "$@"; }
declare -A R
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

for sys in $SYSTEMS; do
    log "$sys: starting with an empty cache on CPU $SERVER_CPU"
    "start_$sys"; PROXY_PID=$PID; PIDS+=("$PROXY_PID")
    wait_port "$P_PROXY" "$PROXY_PID"
    for obj in 1k.bin 64k.bin 256m.bin; do warm "$sys" "$obj"; done
    declare -A before=()
    for obj in 1k.bin 64k.bin 256m.bin; do before[$obj]=$(origin_count "/$obj"); done
    base="http://127.0.0.1:$P_PROXY/m"

    wrk_run "$base/1k.bin" "$CONNS" 2 >/dev/null
    declare -A runs=()
    for run in $(seq "$RUNS"); do
        log "$sys: hot 1 KiB, 64 KiB, 256 MiB x $BIG_CONNS (run $run of $RUNS)"
        line=$(wrk_run "$base/1k.bin" "$CONNS" "$DURATION"); check "$sys 1k" "$line"
        runs[1k]+="$(rps "$line") "; runs[1k_p50]+="$(ms p50_us "$line") "; runs[1k_p99]+="$(ms p99_us "$line") "
        line=$(wrk_run "$base/64k.bin" "$CONNS" "$DURATION"); check "$sys 64k" "$line"
        runs[64k]+="$(mbps "$line") "
        line=$(wrk_run "$base/256m.bin" "$BIG_CONNS" "$DURATION"); check "$sys 256m" "$line"
        runs[256m]+="$(mbps "$line") "
    done
    # The table shows each figure's median; the spread rows its runs.
    for key in 1k 1k_p50 1k_p99 64k 256m; do
        R[${sys}_$key]=$(median ${runs[$key]})
        R[${sys}_${key}_spread]=$(spread ${runs[$key]})
    done
    for obj in 1k.bin 64k.bin 256m.bin; do
        now=$(origin_count "/$obj")
        [ "$now" = "${before[$obj]}" ] || WARNINGS+=("$sys: the origin was asked for $obj $((now - before[$obj])) more times during the hot runs (not all hits)")
    done

    log "$sys: $COLD_CLIENTS cold clients of a 64 MiB object trickling at $SLOW_RATE/s"
    c0=$(origin_count "/slow/64m.bin")
    f="$WORK/cold-$sys.txt"; curls=()
    t0=$(date +%s.%N)
    for i in $(seq "$COLD_CLIENTS"); do
        "${ON_LOAD[@]}" curl -s -o /dev/null --max-time 300 \
            -w '%{time_starttransfer} %{time_total} %{http_code} %{size_download}\n' \
            "$base/slow/64m.bin" >"$f.$i" &
        curls+=($!); PIDS+=($!)
    done
    wait "${curls[@]}" || true
    for i in "${curls[@]}"; do untrack "$i"; done
    t1=$(date +%s.%N)
    cat "$f".* >"$f"
    R[${sys}_cold_origin]=$(( $(origin_count "/slow/64m.bin") - c0 ))
    R[${sys}_cold_wall]=$(python3 -c "print(f'{$t1-$t0:.2f}')")
    read -r R[${sys}_cold_ttfb] R[${sys}_cold_ok] < <(python3 - "$f" $((64 << 20)) <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print(f"{max(float(r[0]) for r in rows):.3f}", sum(1 for r in rows if r[2] == "200" and int(r[3]) == int(sys.argv[2])))
EOF
)
    [ "${R[${sys}_cold_ok]}" = "$COLD_CLIENTS" ] || WARNINGS+=("$sys cold: only ${R[${sys}_cold_ok]}/$COLD_CLIENTS clients got all 64 MiB")
    R[${sys}_rss]=$(( $(rss_kib "$PROXY_PID") / 1024 ))
    stop "$PROXY_PID"
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$P_PROXY") 2>/dev/null || break; sleep 0.1; done
    (exec 3<>"/dev/tcp/127.0.0.1/$P_PROXY") 2>/dev/null && die "$sys still listens on :$P_PROXY after it was stopped"
done

# --------------------------------------------------------------------------
# Report: each figure, and Cistern against the best of the others.
best() { # key higher|lower
    python3 - "$2" "${@:3}" <<'EOF'
import sys
mode, vals = sys.argv[1], [float(v) for v in sys.argv[2:] if v not in ("", "-")]
print((max(vals) if mode == "higher" else min(vals)) if vals else "")
EOF
}
row() { # label key higher|lower
    local label=$1 key=$2 mode=$3 vals=() s peers=() b r
    for s in $SYSTEMS; do vals+=("${R[${s}_$key]:--}"); [ "$s" = cistern ] || peers+=("${R[${s}_$key]:-}"); done
    b=$(best "$key" "$mode" "${peers[@]}")
    r=""
    if [ -n "$b" ] && [ -n "${R[cistern_$key]:-}" ]; then
        r=$(python3 -c "import sys; c,b=map(float,sys.argv[1:]); print(f'{c/b:.2f}' if b else 'n/a')" "${R[cistern_$key]}" "$b")
    fi
    printf '%-44s' "$label"; for v in "${vals[@]}"; do printf ' %10s' "$v"; done; printf ' %12s\n' "$r"
}
{
    echo "Cistern beside its peers, per core, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "machine: $(nproc) cores, $(free -h | awk '/^Mem/ {print $2}') RAM, $(uname -sr)"
    echo "load on CPU $LOAD_CPU (wrk -t1, curl), each server and the origin on CPU $SERVER_CPU"
    echo "load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "versions: $(/usr/sbin/nginx -v 2>&1 | sed 's/.*\///'), varnish $(/usr/sbin/varnishd -V 2>&1 | sed -n 's/.*varnish-\([0-9.]*\).*/\1/p'), ATS $(traffic_server --version 2>/dev/null | sed -n 's/.*Server \([0-9.]*\).*/\1/p' | head -1), $("$CISTERN" --version)"
    echo "knobs: RUNS=$RUNS DURATION=$DURATION CONNS=$CONNS BIG_CONNS=$BIG_CONNS COLD_CLIENTS=$COLD_CLIENTS SLOW_RATE=$SLOW_RATE"
    echo
    printf '%-44s' "measure"; for s in $SYSTEMS; do printf ' %10s' "$s"; done; printf ' %12s\n' "cistern/best"
    row "hot 1 KiB, requests/s" 1k higher
    row "hot 1 KiB, p50 ms" 1k_p50 lower
    row "hot 1 KiB, p99 ms" 1k_p99 lower
    row "hot 64 KiB, MB/s" 64k higher
    row "hot 256 MiB x $BIG_CONNS, MB/s" 256m higher
    row "cold 64 MiB x $COLD_CLIENTS: origin requests" cold_origin lower
    row "cold: wall time, s" cold_wall lower
    row "cold: slowest first byte, s" cold_ttfb lower
    row "RSS after the run, MiB" rss lower
    if [ "$RUNS" -gt 1 ]; then
        echo
        echo "spread of the $RUNS hot runs (min-max; the table shows the median)"
        for key in 1k 1k_p99 64k 256m; do
            printf '%-44s' "$key"; for s in $SYSTEMS; do printf ' %10s' "${R[${s}_${key}_spread]:--}"; done; echo
        done
    fi
    for w in "${WARNINGS[@]}"; do echo "WARNING: $w"; done
} | tee "$RESULTS_FILE"
log "results written to $RESULTS_FILE"
