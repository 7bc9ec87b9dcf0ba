#!/usr/bin/env bash
# The frame decoder's fuzz target (protocol/fuzz). `scripts/fuzz.sh build`
# builds it (CI); `scripts/fuzz.sh run [SECONDS]` fuzzes for a while.
# Works on the stable toolchain (no sanitizer); see protocol/fuzz/README.md
# for an AddressSanitizer run.
set -euo pipefail
cd "$(dirname "$0")/../protocol/fuzz"
export CARGO_TARGET_DIR="${TETHER_FUZZ_TARGET_DIR:-/var/tmp/tether-fuzz-target}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing it from crates.io"
    cargo install cargo-fuzz --locked
fi
case "${1:-build}" in
    build) cargo fuzz build -s none frame_decoder ;;
    run) cargo fuzz run -s none frame_decoder -- -max_total_time="${2:-60}" ;;
    *) echo "usage: scripts/fuzz.sh build|run [SECONDS]" >&2; exit 2 ;;
esac
