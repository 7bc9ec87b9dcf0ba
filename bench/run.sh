#!/usr/bin/env bash
# Tether benchmarks: builds the release binaries, then runs
#   - the fleet simulator on SQLite and PostgreSQL at 1,000 and 10,000 agents,
#     each with its HTTP+JSON baseline in the same run;
#   - the store alone (Store::ingest_metrics) on each database;
#   - the footprint bench: tether-agent as shipped (scripts/build-agent.sh:
#     profile agent-release, static glibc) and as a plain release build, next
#     to prometheus-node-exporter;
# and prints one summary table per run. Results land in $RESULTS (JSON) and
# the logs of every process under $WORK.
#
# Environment (all optional):
#   AGENTS="1000 10000"      fleet sizes
#   REPORTS=auto             reports per agent in the load phase (auto: 200,000 / agents, at least 20)
#   STREAM_BATCHES="1 16"    reports per stream in the load phase: 1 is the steady state (with
#                            its HTTP+JSON baseline), 16 a spool replay as the agent sends it
#   DATABASES="sqlite postgres"
#   LOAD_SECONDS=60 IDLE_SECONDS=30   bounds of the load and idle phases
#   FOOTPRINT=1              0 skips the footprint bench
#   FOOTPRINT_WINDOW=120     seconds of footprint measurement
#   STORE_REPORTS=5000       reports per transaction size in the store-alone bench
#   WORK=/var/tmp/tether-bench
#   CARGO_TARGET_DIR=/var/tmp/tether-target
#
# Needs: docker (footprint), PostgreSQL via scripts/postgres.sh (root installs
# it), prometheus-node-exporter (installed with apt when missing, as root).
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tether-target}"
AGENTS="${AGENTS:-1000 10000}"
REPORTS="${REPORTS:-auto}"
STREAM_BATCHES="${STREAM_BATCHES:-1 16}"
DATABASES="${DATABASES:-sqlite postgres}"
LOAD_SECONDS="${LOAD_SECONDS:-60}"
IDLE_SECONDS="${IDLE_SECONDS:-30}"
FOOTPRINT="${FOOTPRINT:-1}"
FOOTPRINT_WINDOW="${FOOTPRINT_WINDOW:-120}"
STORE_REPORTS="${STORE_REPORTS:-5000}"
WORK="${WORK:-/var/tmp/tether-bench}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS="$WORK/results-$STAMP"
mkdir -p "$RESULTS"

say() { echo "run.sh: $*" >&2; }

say "building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --release --bins -p tether-control-plane -p tether-agent -p tether-bench
# The agent as shipped to servers (size-optimised profile, static glibc; see
# scripts/build-agent.sh). Its path is the last line the script prints.
SHIPPED_AGENT="$(scripts/build-agent.sh | tail -n 1)"
BENCH="$CARGO_TARGET_DIR/release/tether-bench"
export TETHER_BENCH_BIN_DIR="$CARGO_TARGET_DIR/release"

# One QUIC connection needs no file descriptor, but the HTTP baseline holds
# one TCP connection per simulated agent on each side.
ulimit -n "$(ulimit -Hn)" || true
say "open files limit: $(ulimit -n)"

if [[ " $DATABASES " == *" postgres "* ]]; then
    say "starting PostgreSQL (scripts/postgres.sh)"
    TETHER_BENCH_POSTGRES_URL="$(scripts/postgres.sh | tail -n 1)"
    export TETHER_BENCH_POSTGRES_URL
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(nproc) cores, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr)"
    echo "cpu: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) (work tree may be dirty)"
    echo "command: AGENTS='$AGENTS' REPORTS=$REPORTS STREAM_BATCHES='$STREAM_BATCHES' DATABASES='$DATABASES' LOAD_SECONDS=$LOAD_SECONDS IDLE_SECONDS=$IDLE_SECONDS FOOTPRINT_WINDOW=$FOOTPRINT_WINDOW bench/run.sh"
} | tee "$RESULTS/machine.txt"

files=()
for n in $AGENTS; do
    for db in $DATABASES; do
        reports="$REPORTS"
        if [ "$reports" = "auto" ]; then
            reports=$((200000 / n))
            [ "$reports" -ge 20 ] || reports=20
        fi
        for per_stream in $STREAM_BATCHES; do
            name="fleet-$db-$n-x$per_stream"
            out="$RESULTS/$name.json"
            baseline=()
            # The HTTP+JSON baseline pushes one report per request: it is
            # compared with the one-report-per-stream run only.
            [ "$per_stream" = "1" ] || baseline=(--no-http-baseline)
            say "fleet: $n agents on $db, $per_stream report(s) per stream"
            if "$BENCH" fleet --agents "$n" --reports-per-agent "$reports" --database "$db" \
                --batches-per-stream "$per_stream" "${baseline[@]}" \
                --load-seconds "$LOAD_SECONDS" --idle-seconds "$IDLE_SECONDS" \
                --work-dir "$WORK" --json-out "$out" 2>&1 | tee "$RESULTS/$name.log"; then
                files+=("$out")
            else
                say "fleet $n on $db ($per_stream per stream) failed; see $RESULTS/$name.log"
            fi
        done
    done
done

# The store alone: where the per-report cost of the database ends.
for db in $DATABASES; do
    out="$RESULTS/store-$db.json"
    say "store alone: $db"
    if "$BENCH" store --database "$db" --servers 1000 --reports "$STORE_REPORTS" \
        --work-dir "$WORK" --json-out "$out" 2>&1 | tee "$RESULTS/store-$db.log"; then
        files+=("$out")
    fi
done

if [ "$FOOTPRINT" = "1" ]; then
    if ! command -v prometheus-node-exporter >/dev/null 2>&1; then
        say "installing prometheus-node-exporter (Debian package)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus-node-exporter >&2 \
            || say "could not install prometheus-node-exporter; the footprint bench measures the agent alone"
    fi
    out="$RESULTS/footprint.json"
    if "$BENCH" footprint --window "$FOOTPRINT_WINDOW" --work-dir "$WORK" --json-out "$out" \
        --agent-binary "agent-release=$SHIPPED_AGENT" \
        --agent-binary "release=$CARGO_TARGET_DIR/release/tether-agent" 2>&1 \
        | tee "$RESULTS/footprint.log"; then
        files+=("$out")
    else
        say "footprint bench failed; see $RESULTS/footprint.log"
    fi
fi

echo
echo "================ summary ($RESULTS) ================"
cat "$RESULTS/machine.txt"
if [ "${#files[@]}" -gt 0 ]; then
    "$BENCH" summary "${files[@]}" | tee "$RESULTS/summary.md"
fi
