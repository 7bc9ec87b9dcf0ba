#!/usr/bin/env bash
# Checks that the workspace builds quinn from vendor/quinn (the [patch.crates-io]
# entry of the root Cargo.toml), not crates.io's quinn: cargo only warns when a
# patch stops applying and then silently builds the unpatched crate, losing
# the per-connection memory savings (vendor/quinn/TETHER.md). Fails when:
# cargo says the patch was not used, the crate graph holds anything but exactly
# one quinn, or that quinn is not the path package vendor/quinn.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'check-quinn-in-use: FAIL: %s\n' "$*" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! cargo metadata --format-version 1 --locked >"$work/metadata.json" 2>"$work/stderr"; then
    cat "$work/stderr" >&2
    fail "cargo metadata --locked failed (above): did the quinn patch stop applying, so that Cargo.lock no longer matches?"
fi
if grep -i 'was not used' "$work/stderr" >&2; then
    fail "cargo does not use a [patch] entry (above): quinn must come from vendor/quinn"
fi

python3 - "$work/metadata.json" "$PWD/vendor/quinn/Cargo.toml" <<'EOF'
import json, os, sys

meta = json.load(open(sys.argv[1]))
want = os.path.realpath(sys.argv[2])
quinns = [p for p in meta["packages"] if p["name"] == "quinn"]
problems = []
if len(quinns) != 1:
    problems.append(
        "expected exactly one quinn in the crate graph, found %d: %s"
        % (len(quinns), ", ".join("%s %s" % (p["version"], p["source"] or p["manifest_path"]) for p in quinns))
    )
for p in quinns:
    if p["source"] is not None or os.path.realpath(p["manifest_path"]) != want:
        problems.append(
            "quinn %s comes from %s, not the path package %s"
            % (p["version"], p["source"] or p["manifest_path"], want)
        )
# It must also be in the resolved graph, i.e. something depends on it.
ids = {p["id"] for p in quinns}
resolved = {n["id"] for n in (meta.get("resolve") or {}).get("nodes", [])}
users = sorted(
    {n["id"].split("#")[-1] for n in (meta.get("resolve") or {}).get("nodes", []) for d in n.get("deps", []) if d["pkg"] in ids}
)
if quinns and not (ids & resolved and users):
    problems.append("no package of the workspace depends on vendor/quinn")
if problems:
    for m in problems:
        print("check-quinn-in-use: FAIL: " + m, file=sys.stderr)
    sys.exit(1)
print("quinn in use: %s from vendor/quinn (used by %s)" % (quinns[0]["version"], ", ".join(users)))
EOF
