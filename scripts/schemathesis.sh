#!/usr/bin/env bash
# Fuzzes the HTTP API from its own OpenAPI document with schemathesis.
#
# Starts `tether serve` on a fresh data dir (loopback, ports chosen by the OS,
# rate limits out of the way), points schemathesis at
# $API/api/v1/openapi.json with the admin token, and checks that no response
# is a 5xx (`not_a_server_error`). Stops the server, prints how many requests
# were made, and exits non-zero on any finding.
#
#   scripts/schemathesis.sh                      # builds the binary first
#   TETHER_BIN=path/to/tether scripts/schemathesis.sh
#
# Knobs: SCHEMATHESIS_MAX_EXAMPLES (test cases per operation and phase,
# default 200), SCHEMATHESIS_SEED (reproduce a run), CARGO_TARGET_DIR,
# SCHEMATHESIS_DATABASE_URL (an empty PostgreSQL database to run on instead of
# the embedded SQLite, e.g. one made with scripts/postgres.sh).
# Installs schemathesis with pip when it is missing (schemathesis 3.x and 4.x
# are both understood).
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-200}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tether-target}"

say() { printf 'schemathesis.sh: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# --- schemathesis -----------------------------------------------------------
command -v python3 >/dev/null || die "python3 is not installed"
if ! python3 -c 'import schemathesis' >/dev/null 2>&1; then
    say "installing schemathesis with pip"
    python3 -m pip install --quiet schemathesis || die "pip could not install schemathesis"
fi
ST_VERSION="$(python3 -c 'import schemathesis; print(schemathesis.__version__)')"
ST_MAJOR="${ST_VERSION%%.*}"
# The CLI of the very installation whose version was read (3.x and 4.x).
ST=(python3 -m schemathesis.cli)
say "schemathesis ${ST_VERSION}"

# --- the control plane ------------------------------------------------------
if [[ -z "${TETHER_BIN:-}" ]]; then
    say "building tether"
    cargo build --quiet -p tether-control-plane --bin tether || die "tether does not build"
    TETHER_BIN="${CARGO_TARGET_DIR}/debug/tether"
    # The agent only enrolls a few servers as test data.
    cargo build --quiet -p tether-agent --bin tether-agent ||
        say "warning: tether-agent does not build; the run gets no enrolled servers"
fi
[[ -x "$TETHER_BIN" ]] || die "$TETHER_BIN is not an executable"
TETHER_AGENT_BIN="${TETHER_AGENT_BIN:-$(dirname "$TETHER_BIN")/tether-agent}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/tether-schemathesis.XXXXXX")"
DATA="$WORK/data"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$DATA"
if [[ -n "${SCHEMATHESIS_DATABASE_URL:-}" ]]; then
    # Through the environment: the URL carries a password.
    export TETHER_DATABASE_URL="$SCHEMATHESIS_DATABASE_URL"
    say "database: ${SCHEMATHESIS_DATABASE_URL%%:*}://...@${SCHEMATHESIS_DATABASE_URL##*@}"
fi
"$TETHER_BIN" serve \
    --data-dir "$DATA" \
    --api-listen 127.0.0.1:0 \
    --quic-listen 127.0.0.1:0 \
    --api-rate-limit 1000000 \
    --api-rate-limit-admin 1000000 \
    >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!

API=""
for _ in $(seq 1 200); do
    kill -0 "$SERVER_PID" 2>/dev/null || {
        cat "$WORK/serve.log" >&2
        die "tether serve exited early"
    }
    API="$(python3 - "$DATA/endpoints.json" "$SERVER_PID" <<'EOF' 2>/dev/null || true
import json, sys
info = json.load(open(sys.argv[1]))
if str(info.get("pid")) == sys.argv[2]:
    print(info["api_url"])
EOF
)"
    [[ -n "$API" ]] && break
    sleep 0.1
done
[[ -n "$API" ]] || die "tether serve did not write $DATA/endpoints.json in 20 s"
TOKEN="$(tr -d '[:space:]' <"$DATA/admin.token")"
say "control plane at $API"

# --- test data --------------------------------------------------------------
# api METHOD PATH [JSON]: one call with the admin token (read from the
# environment, not argv); prints the answer's body.
api() {
    TETHER_FUZZ_TOKEN="$TOKEN" python3 -c '
import os, sys, urllib.request
api, method, path = sys.argv[1:4]
body = sys.argv[4].encode() if len(sys.argv) > 4 else None
request = urllib.request.Request(api + path, data=body, method=method)
request.add_header("Authorization", "Bearer " + os.environ["TETHER_FUZZ_TOKEN"])
if body is not None:
    request.add_header("Content-Type", "application/json")
print(urllib.request.urlopen(request, timeout=10).read().decode())
' "$API" "$@"
}
json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

ROOT_ORG="$(api GET /api/v1/organizations |
    python3 -c 'import json, sys; print(next(o["id"] for o in json.load(sys.stdin)["data"] if o["parent_id"] is None))')"
# A few enrolled servers, so the operations on servers/{id} meet real ones
# (reached through the document's links from GET /api/v1/servers).
SERVERS=0
if [[ -x "$TETHER_AGENT_BIN" ]]; then
    QUIC="$(json_field quic_listen <"$DATA/endpoints.json")"
    FINGERPRINT="$(json_field ca_fingerprint <"$DATA/endpoints.json")"
    for i in 1 2 3; do
        ENROLL="$(api POST /api/v1/enrollment-tokens "{\"server_name\": \"fuzz-$i\"}" | json_field token)"
        if TETHER_AGENT_TOKEN="$ENROLL" "$TETHER_AGENT_BIN" enroll --server "$QUIC" \
            --ca-fingerprint "$FINGERPRINT" --state-dir "$WORK/agent-$i" >>"$WORK/agents.log" 2>&1; then
            SERVERS=$((SERVERS + 1))
        else
            say "enrolling fuzz-$i failed: $(tail -n 1 "$WORK/agents.log")"
        fi
    done
else
    say "no tether-agent at $TETHER_AGENT_BIN: no servers enrolled"
fi
say "root organization $ROOT_ORG, $SERVERS servers enrolled"

# --- the run ----------------------------------------------------------------
ARGS=(run "$API/api/v1/openapi.json" --checks not_a_server_error
    -H "Authorization: Bearer $TOKEN")
GLOBAL=()
case "$ST_MAJOR" in
    3) ARGS+=(--hypothesis-max-examples "$MAX_EXAMPLES" --stateful=links
           --cassette-path "$WORK/cassette.yaml")
       [[ -n "${SCHEMATHESIS_SEED:-}" ]] && ARGS+=(--hypothesis-seed "$SCHEMATHESIS_SEED") ;;
    *) ARGS+=(--max-examples "$MAX_EXAMPLES"
           --report vcr --report-vcr-path "$WORK/cassette.yaml")
       [[ -n "${SCHEMATHESIS_SEED:-}" ]] && ARGS+=(--seed "$SCHEMATHESIS_SEED")
       # Body fields naming an organization get a real one, so creating
       # tokens, enrollment tokens and child organizations gets past the 404.
       printf '[parameters]\n"body.organization_id" = "%s"\n"body.parent_id" = "%s"\n' \
           "$ROOT_ORG" "$ROOT_ORG" >"$WORK/schemathesis.toml"
       GLOBAL=(--config-file "$WORK/schemathesis.toml" --no-color) ;;
esac

set +e
(cd "$WORK" && "${ST[@]}" "${GLOBAL[@]}" "${ARGS[@]}") 2>&1 | tee "$WORK/schemathesis.log"
STATUS=${PIPESTATUS[0]}
set -e

# 5xx answers leave a trace in the server log too.
if grep -q "internal error serving an API request" "$WORK/serve.log"; then
    say "the control plane logged internal errors:"
    grep "internal error serving an API request" "$WORK/serve.log" | head -20 >&2
    [[ $STATUS -eq 0 ]] && STATUS=1
fi

# How many requests were made: the summary's count of test cases, and the
# HTTP interactions recorded in the cassette, by status.
python3 - "$WORK/schemathesis.log" "$WORK/cassette.yaml" "$ST_VERSION" "$MAX_EXAMPLES" <<'EOF' >&2
import collections, re, sys
log, cassette, version, examples = sys.argv[1:5]
text = re.sub(r"\x1b\[[0-9;]*m", "", open(log, errors="replace").read())
# 4.x: "Test cases: / 1234 generated, 1234 passed"; 3.x: "not_a_server_error  1234 / 1234 passed".
summary = "?"
for pattern in (r"Test cases:\s*(\d+) generated", r"not_a_server_error\s+(\d+)\s*/\s*(\d+)"):
    m = re.search(pattern, text)
    if m:
        summary = m.group(m.lastindex)
        break
try:
    recorded = open(cassette, errors="replace").read()
except OSError:
    recorded = ""
codes = re.findall(r"^\s+response:\s*\n\s+status:\s*\n\s+code: '(\d+)'", recorded, re.M)
by_status = ", ".join(f"{c}: {n}" for c, n in sorted(collections.Counter(codes).items()))
print(f"schemathesis.sh: schemathesis {version}, max examples {examples}: "
      f"{summary} test cases in the summary; {len(codes)} HTTP requests recorded ({by_status or 'none'})")
server_errors = [c for c in codes if c.startswith("5")]
if server_errors:
    print(f"schemathesis.sh: {len(server_errors)} responses were 5xx")
EOF
if grep -qE "^\s+code: '5[0-9][0-9]'" "$WORK/cassette.yaml" 2>/dev/null && [[ $STATUS -eq 0 ]]; then
    STATUS=1
fi
if [[ $STATUS -ne 0 ]]; then
    say "FAILED: schemathesis reported findings (exit $STATUS)"
    exit "$STATUS"
fi
say "OK: no 5xx"
