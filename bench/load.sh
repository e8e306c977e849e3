#!/usr/bin/env bash
# Cistern under load, for what it must hold rather than how fast it is:
#  A. 10,000 concurrent idle connections held, then each served; open file
#     descriptors and RSS counted before, while held, and after they close;
#     then a second wave of as many, to see whether it reuses the memory.
#  B. 1,000 concurrent downloads of 100 distinct objects under an upstream
#     bandwidth limit: every body's SHA-256 checked, peak RSS.
#  C. 20 config reloads during a wrk run: failed requests counted.
# Loopback only. See bench/README.md.
#
# Usage: bench/load.sh     (IDLE_CONNS=10000 DOWNLOADS=1000 OBJECTS=100 …)
# Writes the table to $RESULTS_FILE (default bench/last-load.txt).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

IDLE_CONNS=${IDLE_CONNS:-10000}
HOLD_SECONDS=${HOLD_SECONDS:-5}
IDLE_WAVES=${IDLE_WAVES:-2}       # part A again once the first wave closed
DOWNLOADS=${DOWNLOADS:-1000}
OBJECTS=${OBJECTS:-100}
OBJECT_KIB=${OBJECT_KIB:-1024}
RATE=${RATE:-64MiB}
RELOADS=${RELOADS:-20}
RELOAD_SECONDS=${RELOAD_SECONDS:-20}
RESULTS_FILE=${RESULTS_FILE:-$HERE/last-load.txt}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}

LOG_TAG=load
. "$HERE/lib.sh"

need_apt=()
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v wrk >/dev/null || need_apt+=(wrk)
apt_install "${need_apt[@]}"
find_cistern
# The client side of A needs more descriptors than the usual 1024.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

make_workdir

read -r P_ORIGIN P_CISTERN < <(free_ports 2)

fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
rss_mib() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
hwm_mib() { awk '/^VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

# The origin: nginx, one worker, the objects and a 1 KiB hot file.
mkdir -p "$WORK/www/obj" "$WORK/origin.tmp"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
for i in $(seq "$OBJECTS"); do head -c $((OBJECT_KIB << 10)) /dev/urandom >"$WORK/www/obj/$i.bin"; done
(cd "$WORK/www/obj" && sha256sum ./*.bin) >"$WORK/sums.txt"
cat >"$WORK/origin.conf" <<EOF
$(nginx_main "$WORK/origin.pid" "$WORK/origin.error.log")
http {
    access_log off;
    client_body_temp_path $WORK/origin.tmp/b; proxy_temp_path $WORK/origin.tmp/p;
    fastcgi_temp_path $WORK/origin.tmp/f; uwsgi_temp_path $WORK/origin.tmp/u; scgi_temp_path $WORK/origin.tmp/s;
    sendfile on;
    server {
        listen 127.0.0.1:$P_ORIGIN;
        root $WORK/www;
        add_header Cache-Control "public, max-age=86400";
    }
}
EOF
/usr/sbin/nginx -c "$WORK/origin.conf" &
PIDS+=($!); wait_port "$P_ORIGIN" "${PIDS[-1]}"

write_config() { # extra comment, to make a reload
    cat >"$WORK/config.kdl" <<EOF
// $1
listen "127.0.0.1:$P_CISTERN"
store {
    root "$WORK/replica"
}
limit {
    download "$RATE"
    max-connections 20000
    max-connections-per-client 20000
    max-fills $OBJECTS
    max-fills-per-client $OBJECTS
}
timeouts {
    idle "60s"
}
mirror "m" {
    prefix "/m/"
    upstream "http://127.0.0.1:$P_ORIGIN/"
}
EOF
}
write_config "start"
"$CISTERN" check "$WORK/config.kdl" >/dev/null || die "config rejected"
CISTERN_LOG="warn,cistern::reload=info" "$CISTERN" --config "$WORK/config.kdl" 2>"$WORK/cistern.log" &
CPID=$!; PIDS+=("$CPID"); wait_port "$P_CISTERN" "$CPID"
curl -sf -o /dev/null "http://127.0.0.1:$P_CISTERN/m/1k.bin"
curl -sf -o /dev/null "http://127.0.0.1:$P_CISTERN/m/1k.bin"
declare -A R
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
R[base_fds]=$(fds "$CPID"); R[base_rss]=$(rss_mib "$CPID")

# A. idle connections: open them all, hold them, then one GET on each; then
# the same again once the first wave has closed, so the record shows whether
# the second wave reuses the memory the first left behind or grows.
log "A. $IDLE_CONNS idle connections for ${HOLD_SECONDS}s, then a request on each; $IDLE_WAVES waves"
python3 - "$P_CISTERN" "$IDLE_CONNS" "$HOLD_SECONDS" "$CPID" "$IDLE_WAVES" "${R[base_fds]}" >"$WORK/a.txt" <<'EOF'
import asyncio, os, sys
port, n, hold, pid = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
waves, base_fds = int(sys.argv[5]), int(sys.argv[6])
def fds(): return len(os.listdir(f"/proc/{pid}/fd"))
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
async def wave():
    sem = asyncio.Semaphore(500)
    async def open_one():
        async with sem:
            try:
                return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            except Exception:
                return None
    opened = await asyncio.gather(*[open_one() for _ in range(n)])
    conns = [c for c in opened if c]
    await asyncio.sleep(hold)
    held_fds, held_rss = fds(), rss()
    async def serve(c):
        r, w = c
        try:
            w.write(b"GET /m/1k.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await w.drain()
            data = await asyncio.wait_for(r.read(), 30)
            return data.startswith(b"HTTP/1.1 200") and len(data) > 1024
        except Exception:
            return False
        finally:
            w.close()
    served = await asyncio.gather(*[serve(c) for c in conns])
    # Until Cistern has let go of the connections (10 s at most), then a
    # second more for memory handed back to settle.
    for _ in range(50):
        if fds() <= base_fds + 5: break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)
    print(len(conns), held_fds, f"{held_rss:.1f}", sum(served), fds(), f"{rss():.1f}", flush=True)
async def main():
    for _ in range(waves):
        await wave()
asyncio.run(main())
EOF
A_WAVES=()
while read -r opened held_fds held_rss served after_fds after_rss; do
    A_WAVES+=("opened $opened/$IDLE_CONNS; while held: $held_fds fds, $held_rss MiB RSS; served $served; after close: $after_fds fds, $after_rss MiB RSS")
done <"$WORK/a.txt"
[ ${#A_WAVES[@]} = "$IDLE_WAVES" ] || die "part A reported ${#A_WAVES[@]} of $IDLE_WAVES waves (see $WORK/a.txt)"

# B. concurrent downloads of distinct objects through the bandwidth cap.
log "B. $DOWNLOADS downloads of $OBJECTS objects of $OBJECT_KIB KiB, upstream capped at $RATE/s"
echo 5 >"/proc/$CPID/clear_refs" 2>/dev/null || true
python3 - "$P_CISTERN" "$DOWNLOADS" "$OBJECTS" "$WORK/sums.txt" >"$WORK/b.txt" <<'EOF'
import asyncio, hashlib, sys, time
port, n, objects, sums = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
want = {}
for line in open(sums):
    digest, name = line.split()
    want[name.removeprefix("./")] = digest
async def one(i):
    name = f"{i % objects + 1}.bin"
    for attempt in range(20):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET /m/obj/{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            await w.drain()
            data = await asyncio.wait_for(r.read(), 600)
            w.close()
        except Exception:
            return "error"
        head, _, body = data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 503"):
            await asyncio.sleep(0.5)  # the fill cap: retry, as apt does
            continue
        if not head.startswith(b"HTTP/1.1 200"):
            return "status " + head.split(b"\r\n")[0].decode(errors="replace")
        return "ok" if hashlib.sha256(body).hexdigest() == want[name] else "wrong bytes"
    return "503 twenty times"
async def main():
    t0 = time.monotonic()
    results = await asyncio.gather(*[one(i) for i in range(n)])
    ok = results.count("ok")
    bad = [r for r in results if r != "ok"]
    print(ok, len(bad), f"{time.monotonic() - t0:.1f}", (bad[0] if bad else "-").replace(" ", "_"))
asyncio.run(main())
EOF
read -r R[b_ok] R[b_bad] R[b_secs] R[b_first_bad] <"$WORK/b.txt"
R[b_hwm]=$(hwm_mib "$CPID")

# C. reloads during load: wrk on the hot file while config.kdl changes.
log "C. $RELOADS reloads during ${RELOAD_SECONDS}s of wrk"
cat >"$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("BENCH %d %d %d\n", summary.requests,
        e.connect + e.read + e.write + e.timeout, e.status))
end
EOF
reloads_before=$(grep -c "reloaded " "$WORK/cistern.log" || true)
timeout $((RELOAD_SECONDS + 30)) wrk -t1 -c32 -d"${RELOAD_SECONDS}s" -s "$WORK/report.lua" \
    "http://127.0.0.1:$P_CISTERN/m/1k.bin" >"$WORK/c.txt" 2>&1 &
WRK=$!
step=$(python3 -c "print($RELOAD_SECONDS / ($RELOADS + 1))")
for i in $(seq "$RELOADS"); do sleep "$step"; write_config "reload $i"; done
wait "$WRK" || true
read -r _ R[c_requests] R[c_socket_errors] R[c_bad_status] < <(grep '^BENCH' "$WORK/c.txt" || echo "BENCH 0 0 0")
sleep 2
R[c_reloads]=$(( $(grep -c "reloaded " "$WORK/cistern.log" || true) - reloads_before ))

{
    echo "Cistern under load, $(date -u +%Y-%m-%dT%H:%MZ), $("$CISTERN" --version)"
    echo "machine: $(nproc) cores, $(free -h | awk '/^Mem/ {print $2}') RAM, $(uname -sr); load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "baseline: ${R[base_fds]} fds, ${R[base_rss]} MiB RSS"
    for i in "${!A_WAVES[@]}"; do echo "A. idle connections, wave $((i + 1)): ${A_WAVES[$i]}"; done
    echo "B. $DOWNLOADS downloads of $OBJECTS × $OBJECT_KIB KiB at $RATE/s upstream: ${R[b_ok]} with the right SHA-256, ${R[b_bad]} not (first: ${R[b_first_bad]}), ${R[b_secs]} s, peak RSS ${R[b_hwm]} MiB"
    echo "C. $RELOADS config edits (${R[c_reloads]} reloads went live) during ${RELOAD_SECONDS} s of wrk -c32: ${R[c_requests]} requests, ${R[c_socket_errors]} socket errors, ${R[c_bad_status]} non-2xx"
} | tee "$RESULTS_FILE"
