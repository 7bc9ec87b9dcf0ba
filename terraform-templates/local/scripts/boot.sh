#!/bin/sh
# Create-time provisioner of the `local` target (see ../main.tf).
#
# Environment: TETHER_LOCAL_ROOT (absolute directory), TETHER_FILE_COUNT and,
# for each write_files entry i of the user-data, TETHER_FILE_<i>_PATH,
# TETHER_FILE_<i>_MODE and TETHER_FILE_<i>_CONTENT. File contents (one of
# them holds the bootstrap token) are written with the shell's built-in
# printf and leave the environment before anything else runs. Then the
# bootstrap script runs in `process` mode; if it fails, the root is removed
# (TETHER_LOCAL_KEEP_FAILED=true keeps it) and the exit status is its own.
set -eu
umask 077

root=${TETHER_LOCAL_ROOT:-}
case $root in
    /) echo "tether-local: refusing / as the server root" >&2; exit 1 ;;
    /*) ;;
    *) echo "tether-local: the server root must be an absolute path, got '$root'" >&2; exit 1 ;;
esac
count=${TETHER_FILE_COUNT:-0}
case $count in '' | *[!0-9]*) echo "tether-local: bad TETHER_FILE_COUNT" >&2; exit 1 ;; esac

mkdir -p "$root"
: >"$root/.tether-local-server"

i=0
path='' mode=''
while [ "$i" -lt "$count" ]; do
    eval "path=\${TETHER_FILE_${i}_PATH-} mode=\${TETHER_FILE_${i}_MODE-0644}"
    case $path in
        /*) ;;
        *) echo "tether-local: write_files path must be absolute, got '$path'" >&2; exit 1 ;;
    esac
    case /$path/ in
        */../* | */./*) echo "tether-local: write_files path must be plain, got '$path'" >&2; exit 1 ;;
    esac
    case $mode in
        [0-7][0-7][0-7] | [0-7][0-7][0-7][0-7]) ;;
        *) echo "tether-local: bad permissions '$mode' for $path" >&2; exit 1 ;;
    esac
    target=$root$path
    mkdir -p "${target%/*}"
    eval "printf '%s' \"\${TETHER_FILE_${i}_CONTENT-}\"" >"$target.tmp"
    chmod "$mode" "$target.tmp"
    mv -f "$target.tmp" "$target"
    unset "TETHER_FILE_${i}_PATH" "TETHER_FILE_${i}_MODE" "TETHER_FILE_${i}_CONTENT"
    i=$((i + 1))
done
unset TETHER_FILE_COUNT

script=$root/var/lib/tether/bootstrap.sh
[ -f "$script" ] || { echo "tether-local: the user-data wrote no /var/lib/tether/bootstrap.sh" >&2; exit 1; }
/bin/sh "$script" --root "$root" --mode process && exit 0
status=$?

# A failed boot leaves nothing behind (destroy-time provisioners do not run
# for the tainted resource a failed create leaves): stop whatever started,
# remove the root, unless asked to keep it for inspection.
if [ "${TETHER_LOCAL_KEEP_FAILED:-false}" = true ]; then
    echo "tether-local: boot failed; $root kept for inspection" >&2
else
    TETHER_LOCAL_ROOT=$root /bin/sh "$(dirname "$0")/stop.sh" || true
fi
exit "$status"
