#!/usr/bin/env bash
# Instructions per request of Cistern's hot paths, counted by callgrind: a
# 1 KiB hit on a mirror, a redirect-mode 302, and the same 1 KiB hit on a
# mirror with the three built-in policies chained (store-id, metalink,
# distro). Instruction counts do not move with the load of a shared
# machine, so they compare two builds where req/s cannot. Kernel work
# (system calls, wake-ups, context switches) is not in them: a change that
# saves system calls shows in req/s or CPU time, not here.
#
# Usage: bench/instructions.sh [BINARY]   (N=2000 C=8 to change the knobs)
# Needs valgrind, nginx (the origin), curl, python3.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CISTERN=${1:-${CARGO_TARGET_DIR:-$REPO/target}/release/cistern}
N=${N:-2000}   # requests measured per case
C=${C:-8}      # keep-alive connections, each with one request in flight
[ -x "$CISTERN" ] || { echo "no cistern binary at $CISTERN (cargo build --release -p cistern)" >&2; exit 1; }
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null && [ -x /usr/sbin/nginx ] \
    || { echo "needs valgrind and nginx (apt-get install valgrind nginx-light)" >&2; exit 1; }
. "$HERE/lib.sh"
hit_bench_setup instructions
wait_port() { for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing on $1" >&2; exit 1; }
# Exactly N GETs over C connections, in rounds: one request on each, then
# each answer read whole; every status checked.
cat >"$WORK/client.py" <<'EOF'
import socket, sys
port, path, n, c, want = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n".encode()
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(c)]
bufs = [b""] * c
def answer(i):
    while True:
        b = bufs[i]
        end = b.find(b"\r\n\r\n")
        if end >= 0:
            head = b[:end].decode("latin-1").split("\r\n")
            length = 0
            for h in head[1:]:
                k, _, v = h.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if len(b) >= end + 4 + length:
                bufs[i] = b[end + 4 + length:]
                if head[0].split()[1] != want:
                    sys.exit(f"status {head[0]}")
                return
        got = socks[i].recv(65536)
        if not got:
            sys.exit("closed")
        bufs[i] += got
done = 0
while done < n:
    k = min(c, n - done)
    for i in range(k):
        socks[i].sendall(req)
    for i in range(k):
        answer(i)
    done += k
EOF
taskset -c 1 /usr/sbin/nginx -c "$WORK/origin.conf" </dev/null >"$WORK/origin.log" 2>&1 & PIDS+=($!)
wait_port "$PO"
# glibc's `rep movsb` copies count one instruction per byte under valgrind;
# the vector loop it uses below the threshold counts about as it costs.
GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4294967295:glibc.cpu.x86_rep_stosb_threshold=4294967295 \
    taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" \
    "$CISTERN" --config "$WORK/config.kdl" </dev/null >"$WORK/cistern.log" 2>&1 & VPID=$!; PIDS+=($VPID)
wait_port "$PC"
for p in /m/1k.bin /p/1k.bin; do curl -s -o /dev/null "http://127.0.0.1:$PC$p"; curl -s -o /dev/null "http://127.0.0.1:$PC$p"; done
echo "Instructions per request, $("$CISTERN" --version), $(date -u +%Y-%m-%dT%H:%MZ); $N requests over $C connections per case"
for case in "hit /m/1k.bin 200" "redirect /vlc/3.0/vlc.dmg 302" "policies /p/1k.bin 200"; do
    set -- $case
    python3 "$WORK/client.py" "$PC" "$2" 400 "$C" "$3"
    callgrind_control -z "$VPID" >/dev/null 2>&1
    python3 "$WORK/client.py" "$PC" "$2" "$N" "$C" "$3"
    callgrind_control -d "$1" "$VPID" >/dev/null 2>&1
    out=$(ls -t "$WORK"/cg.* | head -1)
    ir=$(sed -n 's/^summary: //p' "$out")
    printf '%-9s %8.0f instructions per request\n' "$1" "$(python3 -c "print($ir/$N)")"
    [ -z "${KEEP_PROFILES:-}" ] || cp "$out" "$KEEP_PROFILES.$1"
    rm -f "$out"
done
