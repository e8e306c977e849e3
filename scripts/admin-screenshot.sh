#!/usr/bin/env bash
# Screenshots of the admin UI, to look at by hand.
#
#   scripts/admin-screenshot.sh [OUT_DIR]
#       Starts Cistern with an in-process origin, fills its replica with a
#       few files, starts a slow 16 MiB download, and saves PNGs of the
#       overview and a replica directory in OUT_DIR (default: ./screenshots).
#       This is tests/admin_browser.rs with CISTERN_SCREENSHOTS set, so the
#       pictures show exactly what that test checks.
#
#   scripts/admin-screenshot.sh --url URL [OUT_FILE]
#       Screenshots one page of an admin listener that is already running,
#       e.g. --url http://127.0.0.1:9090/ (default OUT_FILE: admin.png).
#
# Needs /usr/bin/chromium (bash .ci/install-browser.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    echo "chromium is missing: run bash .ci/install-browser.sh" >&2
    exit 1
fi

if [ "${1:-}" = "--url" ]; then
    url="${2:?--url needs a URL}"
    out="$(realpath -m "${3:-admin.png}")"
    profile="$(mktemp -d)"
    trap 'rm -rf "$profile"' EXIT
    /usr/bin/chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
        --disable-background-networking --disable-component-update --disable-sync \
        --no-first-run --hide-scrollbars --user-data-dir="$profile" \
        --window-size=1280,900 --screenshot="$out" "$url" 2>/dev/null
    echo "saved $out"
    exit 0
fi

out="$(realpath -m "${1:-screenshots}")"
mkdir -p "$out"
CISTERN_SCREENSHOTS="$out" cargo test -p cistern --test admin_browser \
    a_person_sees_the_tree_a_digest_and_a_download_in_progress -- --nocapture 2>&1 \
    | grep -E '^screenshot:|SKIPPED|test result|panicked' || true
ls -1 "$out"/*.png
