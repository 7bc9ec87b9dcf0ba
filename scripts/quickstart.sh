#!/usr/bin/env bash
# Builds tether and tether-agent, then runs `tether quickstart` with any flags
# given (e.g. --servers 5). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --bins
exec "$CARGO_TARGET_DIR/release/tether" quickstart "$@"
