#!/usr/bin/env bash
# The one test command (README.md): formatting, lints, every test of the
# workspace (end-to-end tests run the real binaries), and the fuzz target build.
# Installs what it needs; fails loudly, never skips, when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tether-target}"
export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FATAL: %s\n' "$*" >&2; exit 1; }

step "toolchain"
command -v cargo >/dev/null || fail "cargo is not installed"
cargo --version
cargo fmt --version >/dev/null 2>&1 || fail "rustfmt is not installed (rustup component add rustfmt)"
cargo clippy --version >/dev/null 2>&1 || fail "clippy is not installed (rustup component add clippy)"

step "system packages and services"
missing=()
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v iptables >/dev/null || missing+=(iptables)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v cloud-init >/dev/null || missing+=(cloud-init)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    [ "$(id -u)" = 0 ] || fail "need root to install ${missing[*]}"
    apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]} failed"
fi
command -v terraform >/dev/null || fail "terraform is not installed (provisioning tests run the real binary; /usr/local/bin/terraform)"
command -v cloud-init >/dev/null || fail "cloud-init is not installed (user-data is checked with cloud-init schema)"
command -v docker >/dev/null || fail "docker is not installed"
docker info >/dev/null 2>&1 || fail "the Docker daemon does not answer (telemetry tests need a real one)"
iptables -L INPUT -n >/dev/null 2>&1 || fail "iptables does not work here (the network-cut test needs it, as root)"

step "PostgreSQL (store suite and replica tests run against it)"
TETHER_TEST_DATABASE_URL="$(scripts/postgres.sh | tail -n 1)" || fail "PostgreSQL could not be started"
export TETHER_TEST_DATABASE_URL
echo "PostgreSQL: ${TETHER_TEST_DATABASE_URL%%:*}://...@${TETHER_TEST_DATABASE_URL##*@}"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build binaries"
cargo build --workspace --bins --locked

step "tests"
cargo test --workspace --locked -- --test-threads "${TETHER_TEST_THREADS:-4}"

step "fuzz target builds"
scripts/fuzz.sh build

step "schemathesis against the OpenAPI document (no 5xx)"
scripts/schemathesis.sh

printf '\nall checks passed\n'
