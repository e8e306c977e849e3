#!/usr/bin/env bash
# Runs every fuzz target in host/fuzz for FUZZ_SECONDS (60) each, starting
# from the corpus kept in the repository. A crash fails the run and leaves
# its input in host/fuzz/artifacts/TARGET/ (reproduce it with
# `cargo fuzz run -s none -O -a TARGET FILE` in host/). New inputs the fuzzer
# finds go to a temporary directory, so the checkout stays clean.
set -euo pipefail
cd "$(dirname "$0")/../host"
each=${FUZZ_SECONDS:-60}

# cargo-fuzz drives libFuzzer; with `--sanitizer none` it needs no nightly
# toolchain (no -Z flags), so it runs on the project's stable rustc.
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -s none -O -a
for target in $(cargo fuzz list); do
    found=$(mktemp -d)
    log=$(mktemp)
    echo "fuzzing $target for ${each}s"
    status=0
    cargo fuzz run -s none -O -a "$target" "$found" "fuzz/corpus/$target" -- \
        -max_total_time="$each" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^(Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    rm -rf "$found"
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log"
        echo "fuzz target $target failed (exit $status); the input is in host/fuzz/artifacts/$target/"
        exit 1
    fi
    rm -f "$log"
done
