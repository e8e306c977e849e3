#!/usr/bin/env bash
# Redirect mode per core: Cistern's `mirror mode="redirect"` (a 302 to the
# mirror chosen for each file) beside nginx answering a static 302, the
# floor of what a redirector can cost. wrk pinned to CPU 0, each server to
# CPU 1. Loopback only; no mirror is ever contacted (a redirect sends the
# client, not the server). See bench/README.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-redirect.txt}
LOG_TAG=redirect
. "$HERE/lib.sh"
find_cistern
command -v wrk >/dev/null && [ -x /usr/sbin/nginx ] || die "needs wrk and nginx (apt-get install wrk nginx-light)"
make_workdir
P=$(free_ports 1)
cat >"$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
    io.write(string.format("BENCH %d %d %d %d\n", summary.requests, summary.duration,
        latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read))
end
LUA
run() { # name url
    timeout $((DURATION + 30)) taskset -c 0 wrk -t1 -c"$CONNS" -d2s "$2" >/dev/null
    local line
    line=$(timeout $((DURATION + 30)) taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$WORK/report.lua" "$2" | grep '^BENCH')
    read -r _ req dur p99 err <<<"$line"
    printf '%-10s %10.0f req/s  p99 %6.2f ms  errors %s\n' "$1" "$(python3 -c "print($req/($dur/1e6))")" "$(python3 -c "print($p99/1000)")" "$err"
}
mkdir -p "$WORK/n"
cat >"$WORK/nginx.conf" <<NG
daemon off; master_process on; user root; worker_processes 1;
pid $WORK/nginx.pid; error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
    access_log off; keepalive_requests 1000000;
    client_body_temp_path $WORK/n/b; proxy_temp_path $WORK/n/p; fastcgi_temp_path $WORK/n/f; uwsgi_temp_path $WORK/n/u; scgi_temp_path $WORK/n/s;
    server { listen 127.0.0.1:$P; location /vlc/ { return 302 http://mirror-a.invalid\$request_uri; } }
}
NG
cat >"$WORK/config.kdl" <<KDL
listen "127.0.0.1:$P"
store {
    root "$WORK/replica"
}
mirror "vlc" mode="redirect" {
    prefix "/vlc/"
    upstream "http://mirror-a.invalid/vlc/" weight=3
    upstream "http://mirror-b.invalid/vlc/"
}
KDL
taskset -c 1 /usr/sbin/nginx -c "$WORK/nginx.conf" & PIDS+=($!); wait_port "$P" "${PIDS[-1]}" 10
curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$P/vlc/3.0/vlc.dmg" | grep -q 302 || die "nginx gives no 302"
{
    echo "Redirect mode per core, $(date -u +%Y-%m-%dT%H:%MZ), $("$CISTERN" --version); wrk -t1 -c$CONNS ${DURATION}s on CPU 0, server on CPU 1"
    run nginx "http://127.0.0.1:$P/vlc/3.0/vlc.dmg"
} >"$RESULTS_FILE"
stop "${PIDS[-1]}"; sleep 0.5
# First with the access log on, at Cistern's default level; then with
# it off, as nginx's is here (`access_log off`).
for mode in cistern cistern-nolog; do
    log=info
    [ "$mode" = cistern ] || log=info,cistern::access=off
    CISTERN_LOG=$log taskset -c 1 "$CISTERN" --config "$WORK/config.kdl" 2>"$WORK/$mode.log" & PIDS+=($!); wait_port "$P" "${PIDS[-1]}" 10
    curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$P/vlc/3.0/vlc.dmg" | grep -q 302 || die "cistern gives no 302"
    run "$mode" "http://127.0.0.1:$P/vlc/3.0/vlc.dmg" >>"$RESULTS_FILE"
    stop "${PIDS[-1]}"; sleep 0.5
done
# A log that is off must be off: the run above wrote no access line.
! grep -q 'vlc.dmg' "$WORK/cistern-nolog.log" || die "the access log was not off"
grep -q 'vlc.dmg' "$WORK/cistern.log" || die "the access log was not on"
cat "$RESULTS_FILE"
