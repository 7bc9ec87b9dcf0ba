#!/usr/bin/env bash
# The one test command (README.md): formatting, lints, every test of the
# workspace (end-to-end tests run the real binaries), the fuzz target build and
# the guard rails (vendored quinn, quinn in use, layering).
# Installs what it needs; fails loudly, never skips, when something is missing.
#
#   scripts/test.sh           everything (CI runs this; needs root, Docker,
#                             terraform, PostgreSQL and iptables)
#   scripts/test.sh --quick   for local use: formatting, then the unit tests of
#                             every library and the in-memory integration
#                             tests (no root, Docker, terraform, PostgreSQL or
#                             iptables); about 1.5 minutes on a warm target dir
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
case "${1:-}" in
    "") ;;
    --quick) quick=1 ;;
    *) printf 'usage: scripts/test.sh [--quick]\n' >&2; exit 2 ;;
esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tether-target}"
export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FATAL: %s\n' "$*" >&2; exit 1; }

step "toolchain"
command -v cargo >/dev/null || fail "cargo is not installed"
cargo --version
cargo fmt --version >/dev/null 2>&1 || fail "rustfmt is not installed (rustup component add rustfmt)"

if [ "$quick" = 1 ]; then
    step "cargo fmt --check"
    cargo fmt --all -- --check

    step "unit tests of every library"
    cargo test --workspace --lib --locked -- --test-threads "${TETHER_TEST_THREADS:-4}"

    # Integration tests that run in memory (or on SQLite in a temporary
    # directory): none starts a binary, a container or a database server.
    # Left out: agent/tests (root, Docker), tests/tests (end-to-end: real
    # binaries, terraform, Docker, PostgreSQL, iptables).
    step "in-memory integration tests"
    cargo test --locked -p tether-protocol -p tether-certs -p tether-control-plane \
        --test frames --test handshake --test alert_engine --test openapi --test security_doc \
        -- --test-threads "${TETHER_TEST_THREADS:-4}"

    # The store suites run each case on SQLite and on PostgreSQL
    # (`<case>::sqlite`, `<case>::postgres`): the quick tier runs the SQLite half.
    step "store suites on SQLite"
    cargo test --locked -p tether-control-plane \
        --test store_edge --test store_commands --test store_federation --test store_health \
        --test store_provisioning --test store_core --test store_organizations \
        --test store_telemetry --test store_tenant --test store_webhooks \
        -- --skip ::postgres --test-threads "${TETHER_TEST_THREADS:-4}"

    printf '\nquick checks passed (CI runs everything: scripts/test.sh)\n'
    exit 0
fi

cargo clippy --version >/dev/null 2>&1 || fail "clippy is not installed (rustup component add clippy)"

step "system packages and services"
missing=()
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v iptables >/dev/null || missing+=(iptables)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v cloud-init >/dev/null || missing+=(cloud-init)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
command -v useradd >/dev/null || missing+=(passwd)
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

# The layering rules (docs/architecture.md): no agent import cycle, control
# plane cycles of at most 8 files, nothing outside api/ importing api/,
# anyhow only in main.rs, crate boundaries. Cheap, so it runs before the
# builds. `--report` prints the figures without failing.
step "architecture (scripts/check-architecture.py)"
python3 scripts/check-architecture.py

step "vendored quinn is upstream 0.11.12 + vendor/quinn.patch"
scripts/check-vendored-quinn.sh

step "cargo builds quinn from vendor/quinn"
scripts/check-quinn-in-use.sh

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build binaries"
cargo build --workspace --bins --locked

step "cloud templates against their providers' schemas (scripts/check-templates.sh)"
scripts/check-templates.sh
scripts/check-templates.sh --selftest

step "tests"
cargo test --workspace --locked -- --test-threads "${TETHER_TEST_THREADS:-4}"

step "fuzz target builds"
scripts/fuzz.sh build

step "schemathesis against the OpenAPI document (no 5xx)"
scripts/schemathesis.sh

printf '\nall checks passed\n'
