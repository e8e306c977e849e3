# bench/lib.sh: the set-up the benchmark scripts in bench/ share. Sourced,
# never run: each script sets its knobs, then
#
#     LOG_TAG=peers                 # the tag of its log lines, [peers 12:00:00] …
#     . "$HERE/lib.sh"
#
# and keeps its own measurement code. What it gives (globals in capitals):
#
#   log MSG… / die MSG…       a tagged, timed line on stderr; die exits 1.
#   apt_install PKG…          install the Debian packages named (none: nothing),
#                             with sudo unless root; dies if there is no
#                             apt-get or a package has no candidate.
#   find_cistern              sets CISTERN: $CISTERN_BIN, else
#                             ${CARGO_TARGET_DIR:-REPO/target}/release/cistern,
#                             built (cargo build --release) if missing; dies if
#                             it is not executable. Needs REPO.
#   make_workdir              WORK=/tmp/cistern-$LOG_TAG.XXXXXX, PIDS=() and an
#                             EXIT trap (INT/TERM exit 130) that stops every pid
#                             in PIDS (TERM, up to 5 s, KILL) and removes WORK,
#                             or keeps it when KEEP_WORKDIR=1.
#   free_ports N [IP…]        prints N distinct free ports of 127.0.0.1, each
#                             also free on every IP named (127.0.0.2 …).
#   wait_port [HOST:]PORT PID [SECONDS]
#                             waits until something listens (default 20 s);
#                             dies if PID exits first or time runs out.
#   untrack PID               drop PID from PIDS (once it is reaped, so the
#                             EXIT trap never signals a reused pid).
#   stop PID                  stop PID and all its descendants (TERM, up to
#                             10 s each, KILL), reap PID, untrack it.
#   tree_pids PID             PID and its descendants, one a line.
#   rss_kib PID               resident memory of that tree, KiB.
#   cpu_ticks PID             user + system CPU time of that tree, in clock
#                             ticks of TICK per second (/proc/PID/stat).
#   nginx_main PIDFILE ERRLOG the main context of a one-worker nginx config
#                             (daemon off, root, 4096 connections), to print
#                             into a config's heredoc with $(...).
#   nginx_http_common DIR     the http-context lines every bench nginx shares:
#                             temp paths under DIR, sendfile, long keep-alive,
#                             application/octet-stream.
#   write_wrk_report FILE     a wrk Lua script whose summary is one line,
#                             BENCH requests= bytes= duration_us= p50_us=
#                             p99_us= errors= status_errors=.
#   write_hit_configs PO PC   $WORK/origin.conf (nginx on PO) and
#                             $WORK/config.kdl (Cistern on PC) of the hot-path
#                             cases: a hit, a hit through policies, a redirect.
#   hit_bench_setup NAME      WORK, PIDS and a kill-by-pid EXIT trap, ports PO
#                             and PC, a 1 KiB object in $WORK/www and the two
#                             configs above (bench/instructions.sh, cpu.sh).
#
# Scripts start processes as `cmd & PIDS+=($!)` and kill them only by pid.

LOG_TAG=${LOG_TAG:-bench}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
TICK=$(getconf CLK_TCK)

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$LOG_TAG" -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

apt_install() { # packages…
    [ $# -gt 0 ] || return 0
    command -v apt-get >/dev/null || die "missing $* and no apt-get"
    local p
    for p in "$@"; do
        apt-cache policy "$p" | grep -q 'Candidate: (none)' && die "no apt candidate for $p"
    done
    log "installing $*"
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    # policy-rc.d-less systems would start the packaged nginx on :80; we never use it.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

find_cistern() {
    CISTERN=${CISTERN_BIN:-}
    if [ -z "$CISTERN" ]; then
        CISTERN=${CARGO_TARGET_DIR:-$REPO/target}/release/cistern
        if [ ! -x "$CISTERN" ]; then
            log "building cistern (release)"
            (cd "$REPO" && cargo build --release -p cistern)
        fi
    fi
    [ -x "$CISTERN" ] || die "no cistern binary at $CISTERN"
}

make_workdir() {
    WORK=$(mktemp -d "/tmp/cistern-$LOG_TAG.XXXXXX")
    PIDS=()
    trap _bench_cleanup EXIT
    trap 'exit 130' INT TERM
}
_bench_cleanup() {
    local rc=$? pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ "$KEEP_WORKDIR" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}

free_ports() { # n [ip…]
    python3 - "$@" <<'EOF'
import socket, sys
n, ips = int(sys.argv[1]), sys.argv[2:]
held = []
while len(held) < n:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    try:
        for ip in ips:
            t = socket.socket(); t.bind((ip, p)); t.close()
    except OSError:
        s.close()
        continue
    held.append(s)
print(*[s.getsockname()[1] for s in held])
EOF
}

wait_port() { # [host:]port pid [seconds]
    local host=127.0.0.1 port=$1 secs=${3:-20}
    case $1 in *:*) host=${1%:*} port=${1##*:};; esac
    for _ in $(seq $((secs * 10))); do
        kill -0 "$2" 2>/dev/null || die "process $2 for $host:$port exited (see $WORK)"
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on $host:$port after $secs s"
}

untrack() { # pid
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

tree_pids() { local p=$1 c; echo "$p"; for c in $(pgrep -P "$p" || true); do tree_pids "$c"; done; }

stop() { # pid: the process and its descendants (nginx's workers, gunicorn's worker, npm's node)
    local all p
    all=$(tree_pids "$1")
    for p in $all; do kill "$p" 2>/dev/null || true; done
    for p in $all; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    wait "$1" 2>/dev/null || true
    untrack "$1"
}

rss_kib() { # pid
    local t=0 p v
    for p in $(tree_pids "$1"); do
        v=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

cpu_ticks() { # pid
    local t=0 p v
    for p in $(tree_pids "$1"); do
        # Fields after "pid (comm) ", which may hold spaces: utime, stime are 12, 13.
        v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

# The origin (nginx serving $WORK/www with a day's max-age) on port $1 and a
# Cistern config on port $2 in $WORK: mirror "m" (a plain hit), mirror "p"
# (the same hit through the three built-in policies, a store-id rule that
# matches) and mirror "vlc" in redirect mode (no mirror ever contacted).
# bench/instructions.sh and bench/cpu.sh measure the same three cases.
write_hit_configs() { # origin-port proxy-port
    local PO=$1 PC=$2
cat >"$WORK/origin.conf" <<EOF
daemon off; master_process off; worker_processes 1;
pid $WORK/origin.pid; error_log $WORK/origin.err warn;
events { worker_connections 1024; }
http {
  access_log off; default_type application/octet-stream;
  client_body_temp_path $WORK/n/b; proxy_temp_path $WORK/n/p; fastcgi_temp_path $WORK/n/f; uwsgi_temp_path $WORK/n/u; scgi_temp_path $WORK/n/s;
  server { listen 127.0.0.1:$PO; root $WORK/www; add_header Cache-Control "public, max-age=86400"; }
}
EOF
cat >"$WORK/config.kdl" <<EOF
listen "127.0.0.1:$PC"
store {
    root "$WORK/replica"
}
forward {
    enabled #false
}
mirror "m" {
    prefix "/m/"
    upstream "http://127.0.0.1:$PO/"
}
mirror "p" {
    prefix "/p/"
    upstream "http://127.0.0.1:$PO/"
    policies "store-id" "metalink" "distro"
}
mirror "vlc" mode="redirect" {
    prefix "/vlc/"
    upstream "http://mirror-a.invalid/vlc/" weight=3
    upstream "http://mirror-b.invalid/vlc/"
}
policy "distro" path="builtin:distro"
policy "store-id" path="builtin:store-id" {
    param "rule" "http://*/* http://p.cistern/\$2"
}
policy "metalink" path="builtin:metalink"
EOF
}

hit_bench_setup() { # name
    WORK=$(mktemp -d "/tmp/cistern-$1.XXXXXX")
    PIDS=()
    trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
    read -r PO PC < <(free_ports 2)
    mkdir -p "$WORK/www" "$WORK/n"
    head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
    write_hit_configs "$PO" "$PC"
}

nginx_main() { # pid-file error-log
    cat <<EOF
daemon off;
master_process on;
user root;
worker_processes 1;
pid $1;
error_log $2 warn;
events { worker_connections 4096; }
EOF
}

nginx_http_common() { # dir
    cat <<EOF
    client_body_temp_path $1/tmp-body;
    proxy_temp_path $1/tmp-proxy;
    fastcgi_temp_path $1/tmp-fastcgi;
    uwsgi_temp_path $1/tmp-uwsgi;
    scgi_temp_path $1/tmp-scgi;
    sendfile on;
    tcp_nopush off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    default_type application/octet-stream;
EOF
}

write_wrk_report() { # file
    cat >"$1" <<'EOF'
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("BENCH requests=%d bytes=%d duration_us=%d p50_us=%d p99_us=%d errors=%d status_errors=%d\n",
        summary.requests, summary.bytes, summary.duration,
        latency:percentile(50), latency:percentile(99),
        e.connect + e.read + e.write + e.timeout, e.status))
end
EOF
}
