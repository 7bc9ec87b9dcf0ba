#!/usr/bin/env bash
# The fuzz targets of protocol/fuzz: the frame decoder, the enrollment
# exchange and the branch-to-branch exchange. `scripts/fuzz.sh build` builds
# them all (CI); `scripts/fuzz.sh run [SECONDS] [TARGET...]` fuzzes each for
# SECONDS (default 60; default targets: all).
# Works on the stable toolchain (no sanitizer); see protocol/fuzz/README.md
# for an AddressSanitizer run.
set -euo pipefail
cd "$(dirname "$0")/../protocol/fuzz"
export CARGO_TARGET_DIR="${TETHER_FUZZ_TARGET_DIR:-/var/tmp/tether-fuzz-target}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing it from crates.io"
    cargo install cargo-fuzz --locked
fi
TARGETS=(frame_decoder enrollment federation)
case "${1:-build}" in
    build) for target in "${TARGETS[@]}"; do cargo fuzz build -s none "$target"; done ;;
    run)
        seconds="${2:-60}"
        shift $(( $# > 1 ? 2 : 1 ))
        [ $# -gt 0 ] || set -- "${TARGETS[@]}"
        for target in "$@"; do
            cargo fuzz run -s none "$target" -- -max_total_time="$seconds"
        done
        ;;
    *) echo "usage: scripts/fuzz.sh build | run [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac
