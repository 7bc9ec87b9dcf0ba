#!/usr/bin/env bash
# Checks the Terraform modules against their providers' own schemas, offline
# (docs/provisioning-templates.md): resource/data types, arguments and nested
# blocks (also in `dynamic` blocks), required arguments, `type.name.attr`
# references, and each provider's version against versions.tf.
#
#   scripts/check-templates.sh [DIR]      # default terraform-templates/
#   scripts/check-templates.sh --selftest # breaks copies of modules, expects failures
#
# Installs the pinned packages (scripts/check_templates/requirements.txt) into
# a cached venv, ${XDG_CACHE_HOME:-~/.cache}/tether-templates (override with
# TETHER_TEMPLATES_CACHE), reinstalled only when the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'check-templates.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

REQ=scripts/check_templates/requirements.txt
CACHE="${TETHER_TEMPLATES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tether-templates}"
VENV="$CACHE/venv"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"

command -v python3 >/dev/null || die "python3 is not installed"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    say "installing $REQ into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile --no-deps -r "$REQ" \
        || die "pip could not install $REQ"
    echo "$want" >"$STAMP"
fi
export TETHER_TEMPLATE_SCHEMA_CACHE="$CACHE/schemas"

if [ "${1:-}" = "--selftest" ]; then
    exec "$VENV/bin/python" scripts/check_templates/test_check_templates.py
fi
exec "$VENV/bin/python" scripts/check_templates/check_templates.py "${1:-terraform-templates}"
