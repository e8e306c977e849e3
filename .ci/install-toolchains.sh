#!/usr/bin/env bash
# Installs what the policy examples and the built-in policies need, on a
# fresh Debian machine or again on a provisioned one (idempotent):
#   - the wasm32-unknown-unknown target for the *current* Rust toolchain
#     (never another version),
#   - clang and lld (C examples, --target=wasm32),
#   - the Zig compiler from PyPI's ziglang package,
#   - AssemblyScript, pinned by examples/assemblyscript/package-lock.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi

if ! command -v clang >/dev/null || ! command -v wasm-ld >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq clang lld
fi

if ! command -v zig >/dev/null && ! python3 -c "import ziglang" >/dev/null 2>&1; then
    python3 -m pip install --quiet ziglang
fi

if [ ! -x "$root/examples/assemblyscript/node_modules/.bin/asc" ]; then
    (cd "$root/examples/assemblyscript" && npm ci --no-audit --no-fund)
fi

echo "install-toolchains: wasm32 target, clang/lld, zig and assemblyscript are ready"
