#!/usr/bin/env bash
# Checks that vendor/quinn is upstream quinn 0.11.12 plus vendor/quinn.patch,
# nothing more: takes the published crate (cargo's cache, or fetched with
# `cargo fetch` in a scratch project), removes the files Tether leaves out
# (the list below), applies the patch and compares the result with
# vendor/quinn file by file. Also checks that every hunk of the patch carries a
# `Tether:` marker at its site (a `// Tether:` or `# Tether:` line it adds).
#
#   scripts/check-vendored-quinn.sh            check (exit 1 on any difference)
#   scripts/check-vendored-quinn.sh --update   rewrite vendor/quinn.patch from
#                                              the tree as it is now
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

VERSION=0.11.12
SHA256=4051e23e9185c255a7e33ef59cdbca87a22d359052eecd22fc6b901fb37d9d11
PATCH="$ROOT/vendor/quinn.patch"
VENDORED="$ROOT/vendor/quinn"
# What the vendored tree leaves out of the published crate, on purpose
# (vendor/quinn/TETHER.md): quinn's examples, tests and benches, and the
# packaging files cargo adds to a published crate. Removed before the patch
# is applied; the patch itself holds only the edits.
LEFT_OUT=(examples tests benches src/tests.rs Cargo.toml.orig Cargo.lock .cargo_vcs_info.json)

fail() { printf 'check-vendored-quinn: FAIL: %s\n' "$*" >&2; exit 1; }

update=0
case "${1:-}" in
    "") ;;
    --update) update=1 ;;
    *) fail "unknown argument $1 (use --update to rewrite the patch)" ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. The published crate: cargo's download cache first, else cargo fetches it.
crate=""
for c in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/quinn-$VERSION.crate; do
    [ -f "$c" ] && crate="$c" && break
done
if [ -z "$crate" ]; then
    echo "quinn $VERSION is not in cargo's cache: fetching it with cargo"
    mkdir -p "$work/fetch/src"
    printf '[package]\nname = "fetch-quinn"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nquinn = "=%s"\n' \
        "$VERSION" >"$work/fetch/Cargo.toml"
    : >"$work/fetch/src/lib.rs"
    (cd "$work/fetch" && cargo fetch --quiet) || fail "cargo fetch of quinn $VERSION failed"
    for c in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/quinn-$VERSION.crate; do
        [ -f "$c" ] && crate="$c" && break
    done
    [ -n "$crate" ] || fail "cargo fetched quinn $VERSION but its .crate is not in the cache"
fi
got="$(sha256sum "$crate" | cut -d' ' -f1)"
[ "$got" = "$SHA256" ] || fail "$crate has sha256 $got, expected $SHA256 (the published quinn $VERSION)"

mkdir -p "$work/up"
tar -xzf "$crate" -C "$work/up" || fail "cannot unpack $crate"
up="$work/up/quinn-$VERSION"
for p in "${LEFT_OUT[@]}"; do
    [ -e "$up/$p" ] || fail "upstream quinn $VERSION has no $p: the left-out list is out of date"
    rm -rf "${up:?}/$p"
done

if [ "$update" = 1 ]; then
    # Paths relative to the crate root (a/ b/), without timestamps.
    mkdir -p "$work/d"
    cp -a "$up" "$work/d/a"
    cp -a "$VENDORED" "$work/d/b"
    {
        printf '# Tether: upstream quinn %s (crates.io) -> vendor/quinn.\n' "$VERSION"
        printf '# Apply with `patch -p1` in the unpacked crate after removing: %s\n' "${LEFT_OUT[*]}"
        printf '# Checked by scripts/check-vendored-quinn.sh (--update rewrites this file).\n'
        (cd "$work/d" && diff -ruN a b || true) | sed -E 's/^(---|\+\+\+) ([^\t]*)\t.*$/\1 \2/'
    } >"$PATCH"
    echo "wrote $PATCH"
fi

[ -f "$PATCH" ] || fail "$PATCH is missing (scripts/check-vendored-quinn.sh --update writes it)"

# 2. Upstream + patch must be vendor/quinn exactly.
if command -v patch >/dev/null; then
    (cd "$up" && patch -p1 --forward --batch --silent --no-backup-if-mismatch -r - <"$PATCH")
else
    (cd "$up" && git apply -p1 --whitespace=nowarn "$PATCH")
fi || fail "vendor/quinn.patch does not apply to upstream quinn $VERSION"
if ! diff -r "$up" "$VENDORED" >"$work/diff" 2>&1; then
    sed -e "s#$up#upstream+patch#g" -e "s#$VENDORED#vendor/quinn#g" "$work/diff" | head -n 60 >&2
    fail "vendor/quinn differs from upstream quinn $VERSION + vendor/quinn.patch (above). Mark the change with a Tether: comment, describe it in vendor/quinn/TETHER.md, then run scripts/check-vendored-quinn.sh --update"
fi

# 3. Every hunk carries a Tether: marker at its site.
unmarked="$(awk '
    function flush() { if (h != "" && !m && hf != "TETHER.md") print h; h = "" }
    /^\+\+\+ / { flush(); file = $2; sub(/^b\//, "", file); next }
    /^--- / { flush(); next }
    /^@@/ { flush(); h = file " " $0; hf = file; m = 0; next }
    /^\+.*Tether:/ { m = 1 }
    END { flush() }
' "$PATCH")"
if [ -n "$unmarked" ]; then
    printf '%s\n' "$unmarked" >&2
    fail "the hunks above of vendor/quinn.patch change quinn without a 'Tether:' comment at the site"
fi

hunks="$(grep -c '^@@' "$PATCH")"
echo "vendor/quinn = upstream quinn $VERSION + vendor/quinn.patch ($hunks hunks, each marked Tether:)"
