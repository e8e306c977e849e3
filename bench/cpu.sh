#!/usr/bin/env bash
# Server CPU time per request (utime + stime over the run, divided by
# requests) and req/s of a 1 KiB hit on a mirror and of the same hit on a
# mirror with the three built-in policies chained (store-id, metalink,
# distro), for one or more builds, alternating builds in each round: on a
# shared machine CPU time per request moves much less than req/s, and
# alternating spreads the load's drift over every build. wrk on CPU 0,
# the server on CPU 1 (one runtime worker's worth of CPU), the origin on
# CPU 1 too (it is asked once per case).
#
# Usage: bench/cpu.sh BINARY...   (ROUNDS=2 D=8s C=64 to change the knobs)
# Needs wrk, nginx (the origin), curl, python3.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 1 ] || { echo "usage: $0 BINARY..." >&2; exit 1; }
BINS=("$@")
ROUNDS=${ROUNDS:-2}
D=${D:-8s}
C=${C:-64}
TICK=$(getconf CLK_TCK)
command -v wrk >/dev/null && [ -x /usr/sbin/nginx ] \
    || { echo "needs wrk and nginx (apt-get install wrk nginx-light)" >&2; exit 1; }
. "$HERE/lib.sh"
hit_bench_setup cpu
wait_port() { for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing on $1" >&2; exit 1; }
taskset -c 1 /usr/sbin/nginx -c "$WORK/origin.conf" </dev/null >"$WORK/origin.log" 2>&1 & PIDS+=($!)
wait_port "$PO"
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); wrk -t1 -c$C -d$D on CPU 0, server on CPU 1"
printf '%-6s %-40s %-9s %10s %8s\n' round binary case req/s "µs CPU"
for round in $(seq "$ROUNDS"); do
    for bin in "${BINS[@]}"; do
        rm -rf "$WORK/replica"
        taskset -c 1 "$bin" --config "$WORK/config.kdl" </dev/null >"$WORK/cistern.log" 2>&1 & SPID=$!; PIDS+=($SPID)
        wait_port "$PC"
        for p in /m/1k.bin /p/1k.bin; do curl -s -o /dev/null "http://127.0.0.1:$PC$p"; curl -s -o /dev/null "http://127.0.0.1:$PC$p"; done
        for case in "hit /m/1k.bin" "policies /p/1k.bin"; do
            set -- $case
            taskset -c 0 wrk -t1 -c"$C" -d2s "http://127.0.0.1:$PC$2" >/dev/null
            before=$(ticks "$SPID")
            out=$(taskset -c 0 wrk -t1 -c"$C" -d"$D" "http://127.0.0.1:$PC$2")
            after=$(ticks "$SPID")
            reqs=$(awk '/requests in/ {print $1}' <<<"$out")
            rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
            ! grep -q "Non-2xx" <<<"$out" || { echo "$bin $2: non-2xx answers" >&2; exit 1; }
            us=$(python3 -c "print(f'{($after-$before)/$TICK*1e6/$reqs:.2f}')")
            printf '%-6s %-40s %-9s %10.0f %8s\n' "$round" "$bin" "$1" "$rps" "$us"
        done
        kill "$SPID"; wait "$SPID" 2>/dev/null || true
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
