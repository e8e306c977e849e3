#!/usr/bin/env bash
# A fleet of three Cisterns (`cluster`) beside three independent ones, in
# front of one nginx origin: OBJECTS objects, each requested once on every
# node; the origin's request count and bytes say what the fleet saved. Then
# the latency a peer hit adds over a local hit (a fleet with store-on
# "owner", so a non-owner's request always goes through the owner), over
# LAT_REQUESTS keep-alive requests each. See bench/README.md.
#
# Usage: bench/fleet.sh      (OBJECTS=100 OBJECT_KIB=64 LAT_REQUESTS=1000)
# Writes the table to $RESULTS_FILE (default bench/last-fleet.txt).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

OBJECTS=${OBJECTS:-100}            # objects, each requested on every node
OBJECT_KIB=${OBJECT_KIB:-64}       # their size
LAT_OBJECTS=${LAT_OBJECTS:-30}     # 1 KiB objects for the latency runs
LAT_REQUESTS=${LAT_REQUESTS:-1000} # requests per latency figure
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-fleet.txt}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
SECRET=bench-fleet-secret-0123456789

LOG_TAG=fleet
. "$HERE/lib.sh"

need_apt=()
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v curl >/dev/null || need_apt+=(curl)
apt_install "${need_apt[@]}"

find_cistern

# --------------------------------------------------------------------------
# Work dir, ports, cleanup: every process started is killed by its pid.
make_workdir

# One origin port, one proxy port and one admin port, free on all three
# loopback addresses.
read -r P_ORIGIN P_PROXY P_ADMIN < <(free_ports 3 127.0.0.2 127.0.0.3)
log "work dir $WORK; origin :$P_ORIGIN, nodes 127.0.0.{1,2,3}:$P_PROXY, admin :$P_ADMIN"


# --------------------------------------------------------------------------
# Payloads and the origin (nginx, one worker), logging each request's
# path and body bytes.
mkdir -p "$WORK/www/o" "$WORK/www/l" "$WORK/origin.tmp"
for i in $(seq 0 $((OBJECTS - 1))); do head -c $((OBJECT_KIB << 10)) /dev/urandom >"$WORK/www/o/$i.bin"; done
for i in $(seq 0 $((LAT_OBJECTS - 1))); do head -c 1024 /dev/urandom >"$WORK/www/l/$i.bin"; done
cat >"$WORK/origin.conf" <<EOF
$(nginx_main "$WORK/origin.pid" "$WORK/origin.error.log")
http {
$(nginx_http_common "$WORK/origin.tmp")
    log_format counted '\$request_uri \$body_bytes_sent';
    access_log $WORK/origin.access.log counted;
    server {
        listen 127.0.0.1:$P_ORIGIN;
        root $WORK/www;
        add_header Cache-Control "public, max-age=86400";
    }
}
EOF
/usr/sbin/nginx -c "$WORK/origin.conf" 2>>"$WORK/origin.error.log" &
ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
wait_port "$P_ORIGIN" "$ORIGIN_PID"
# Requests and body bytes the origin served below a prefix, since the log
# was emptied.
origin_stats() { awk -v p="$1" 'index($1, p) == 1 { n++; b += $2 } END { printf "%d %d\n", n, b }' "$WORK/origin.access.log"; }
origin_reset() { : >"$WORK/origin.access.log"; }

# --------------------------------------------------------------------------
# Three Cisterns on 127.0.0.1, .2 and .3; `$1` is the mode: independent
# (no cluster), fleet (store-on "every") or owner (store-on "owner").
NODE_PIDS=()
start_nodes() { # mode
    local mode=$1 i ip d cluster
    NODE_PIDS=()
    for i in 1 2 3; do
        ip=127.0.0.$i; d="$WORK/$mode-$i"; mkdir -p "$d"
        cluster=
        if [ "$mode" != independent ]; then
            local store_on=every; [ "$mode" = owner ] && store_on=owner
            cluster="cluster {
    node \"n$i\"
    peer \"n1\" \"http://127.0.0.1:$P_PROXY\"
    peer \"n2\" \"http://127.0.0.2:$P_PROXY\"
    peer \"n3\" \"http://127.0.0.3:$P_PROXY\"
    secret \"$SECRET\"
    store-on \"$store_on\"
}"
        fi
        cat >"$d/config.kdl" <<EOF
listen "$ip:$P_PROXY"
admin {
    listen "$ip:$P_ADMIN"
}
store {
    root "$d/replica"
}
mirror "m" {
    prefix "/m/"
    upstream "http://127.0.0.1:$P_ORIGIN/"
}
$cluster
EOF
        "$CISTERN" check "$d/config.kdl" >/dev/null || die "cistern rejected $d/config.kdl"
        (cd "$d" && exec "$CISTERN" --config config.kdl) </dev/null >"$d/log" 2>&1 &
        NODE_PIDS+=($!); PIDS+=($!)
    done
    for i in 1 2 3; do wait_port "127.0.0.$i:$P_PROXY" "${NODE_PIDS[$((i - 1))]}"; done
}
stop_nodes() { local p; for p in "${NODE_PIDS[@]}"; do stop "$p"; done; NODE_PIDS=(); }
metric() { # ip name
    curl -s "http://$1:$P_ADMIN/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d\n", s }'
}

# Every object on node 1, then node 2, then node 3 (each a miss there);
# every body checked against the origin's file.
request_all() {
    local i n code
    for n in 1 2 3; do
        for i in $(seq 0 $((OBJECTS - 1))); do
            curl -s -o "$WORK/got" -w '%{http_code}' "http://127.0.0.$n:$P_PROXY/m/o/$i.bin" >"$WORK/code"
            code=$(cat "$WORK/code")
            [ "$code" = 200 ] || die "node $n, object $i: status $code"
            cmp -s "$WORK/got" "$WORK/www/o/$i.bin" || die "node $n, object $i: wrong bytes"
        done
    done
}

declare -A R
for mode in independent fleet; do
    log "$mode: $OBJECTS objects of $OBJECT_KIB KiB, each requested on all three nodes"
    start_nodes "$mode"
    origin_reset
    t0=$(date +%s.%N)
    request_all
    t1=$(date +%s.%N)
    read -r n b < <(origin_stats /o/)
    R[${mode}_requests]=$n; R[${mode}_bytes]=$b
    R[${mode}_secs]=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
    pb=0; ub=0
    for i in 1 2 3; do
        pb=$((pb + $(metric 127.0.0.$i cistern_peer_bytes_total)))
        ub=$((ub + $(metric 127.0.0.$i cistern_upstream_bytes_total)))
    done
    R[${mode}_peer_bytes]=$pb; R[${mode}_upstream_bytes]=$ub
    log "$mode: origin $n requests, $b bytes; nodes: $pb peer bytes, $ub upstream bytes"
    stop_nodes
done

# --------------------------------------------------------------------------
# Latency: store-on "owner", so only the owner keeps each object. Warm
# every object once through node 1; the owner is the node whose replica
# holds it. A local hit asks the owner; a peer hit asks another node,
# which fills from the owner's replica (no origin request).
log "latency: $LAT_OBJECTS objects of 1 KiB, $LAT_REQUESTS requests per figure"
start_nodes owner
for i in $(seq 0 $((LAT_OBJECTS - 1))); do
    curl -s -o /dev/null "http://127.0.0.1:$P_PROXY/m/l/$i.bin"
done
sleep 0.5
origin_reset
owners=()
for i in $(seq 0 $((LAT_OBJECTS - 1))); do
    o=
    for n in 1 2 3; do
        [ -f "$WORK/owner-$n/replica/127.0.0.1:$P_ORIGIN/l/$i.bin" ] && o=$n
    done
    [ -n "$o" ] || die "object l/$i.bin is on no node"
    owners+=("$o")
done
python3 - "$P_PROXY" "$LAT_REQUESTS" "$SECRET" "${owners[@]}" >"$WORK/latency.txt" <<'EOF'
import http.client, sys, time
port, count, secret = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
owners = [int(o) for o in sys.argv[4:]]
def run(pick, prefix="", headers={}):
    conns, times = {}, []
    for r in range(count):
        obj = r % len(owners)
        node = pick(owners[obj])
        c = conns.get(node)
        if c is None:
            c = conns[node] = http.client.HTTPConnection(f"127.0.0.{node}", port, timeout=10)
        t = time.perf_counter()
        c.request("GET", f"{prefix}/m/l/{obj}.bin", headers=headers)
        resp = c.getresponse()
        body = resp.read()
        times.append(time.perf_counter() - t)
        assert resp.status == 200 and len(body) == 1024, (resp.status, len(body))
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99) - 1] * 1e3
local = run(lambda owner: owner)
peer = run(lambda owner: owner % 3 + 1)
# What the asking node sends the owner, sent by hand: the owner's side
# of a peer hit, without the asking node's fill.
far = run(lambda owner: owner, "/_cistern/peer/", {"cistern-peer-secret": secret})
print(f"local {local[0]:.3f} {local[1]:.3f}")
print(f"peer {peer[0]:.3f} {peer[1]:.3f}")
print(f"far {far[0]:.3f} {far[1]:.3f}")
EOF
read -r _ R[local_p50] R[local_p99] < <(grep '^local' "$WORK/latency.txt")
read -r _ R[peer_p50] R[peer_p99] < <(grep '^peer' "$WORK/latency.txt")
read -r _ R[far_p50] R[far_p99] < <(grep '^far' "$WORK/latency.txt")
read -r lat_origin _ < <(origin_stats /l/)
stop_nodes

# --------------------------------------------------------------------------
{
    echo "bench/fleet.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $("$CISTERN" --version 2>/dev/null || echo "cistern ?")"
    echo "$OBJECTS objects of $OBJECT_KIB KiB, each requested once on each of three nodes (mirror /m/ of one nginx origin)"
    echo
    printf '%-34s %14s %14s\n' "" "independent" "fleet"
    printf '%-34s %14s %14s\n' "origin requests" "${R[independent_requests]}" "${R[fleet_requests]}"
    printf '%-34s %14s %14s\n' "origin body bytes" "${R[independent_bytes]}" "${R[fleet_bytes]}"
    printf '%-34s %14s %14s\n' "nodes' upstream bytes" "${R[independent_upstream_bytes]}" "${R[fleet_upstream_bytes]}"
    printf '%-34s %14s %14s\n' "nodes' peer bytes" "${R[independent_peer_bytes]}" "${R[fleet_peer_bytes]}"
    printf '%-34s %14s %14s\n' "wall time of the 3 x $OBJECTS GETs, s" "${R[independent_secs]}" "${R[fleet_secs]}"
    echo
    echo "latency of a 1 KiB GET, keep-alive, $LAT_REQUESTS requests each (store-on \"owner\"), ms:"
    printf '%-34s %10s %10s\n' "" "median" "p99"
    printf '%-34s %10s %10s\n' "local hit (asked of the owner)" "${R[local_p50]}" "${R[local_p99]}"
    printf '%-34s %10s %10s\n' "peer hit (another node asks it)" "${R[peer_p50]}" "${R[peer_p99]}"
    printf '%-34s %10s %10s\n' "the owner's side of it, by hand" "${R[far_p50]}" "${R[far_p99]}"
    python3 -c "import sys; a,b,c,d=map(float,sys.argv[1:]); print(f'{\"added by the peer hop\":<34} {b-a:10.3f} {d-c:10.3f}')" \
        "${R[local_p50]}" "${R[peer_p50]}" "${R[local_p99]}" "${R[peer_p99]}"
    echo "origin requests during the latency runs: $lat_origin"
} | tee "$RESULTS_FILE"
log "results written to $RESULTS_FILE"
