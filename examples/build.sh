#!/usr/bin/env bash
# Builds the example policy in every language whose toolchain is present:
#   examples/build.sh [OUT_DIR]      (default: examples/build)
# Produces OUT_DIR/{c,zig,assemblyscript}.wasm and OUT_DIR/wat.wat. A missing
# toolchain skips only that language, with a message saying how to get it
# (.ci/install-toolchains.sh installs them all).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/build}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
built=()
skipped=()

skip() {
    echo "examples/build.sh: skipping $1: $2" >&2
    skipped+=("$1")
}

# C: Debian's clang and lld (wasm-ld), no libc.
if command -v clang >/dev/null && command -v wasm-ld >/dev/null; then
    clang --target=wasm32 -nostdlib -O2 -I "$here/../guest-sdk/include" \
        -Wl,--no-entry -Wl,--export-dynamic \
        -o "$out/c.wasm" "$here/c/policy.c"
    built+=(c)
else
    skip c "clang and wasm-ld not found (apt-get install clang lld)"
fi

# Zig: the compiler from PyPI's ziglang package, or a zig on PATH.
zig=()
if command -v zig >/dev/null; then
    zig=(zig)
elif python3 -c "import ziglang" >/dev/null 2>&1; then
    zig=(python3 -m ziglang)
fi
if [ ${#zig[@]} -gt 0 ]; then
    (cd "$out" && "${zig[@]}" build-exe "$here/zig/policy.zig" -target wasm32-freestanding \
        -fno-entry -rdynamic -O ReleaseSmall -femit-bin="$out/zig.wasm")
    rm -f "$out/zig.wasm.o"
    built+=(zig)
else
    skip zig "no zig compiler (pip install ziglang)"
fi

# AssemblyScript: the compiler pinned in assemblyscript/package-lock.json.
asc="$here/assemblyscript/node_modules/.bin/asc"
if [ -x "$asc" ]; then
    (cd "$here/assemblyscript" && "$asc" policy.ts --runtime stub --optimize --noAssert \
        --use abort= --outFile "$out/assemblyscript.wasm")
    built+=(assemblyscript)
else
    skip assemblyscript "asc not installed (cd examples/assemblyscript && npm ci)"
fi

# WAT: the host reads the text format itself.
cp "$here/wat/policy.wat" "$out/wat.wat"
built+=(wat)

echo "examples/build.sh: built ${built[*]} into $out${skipped:+; skipped ${skipped[*]}}"
