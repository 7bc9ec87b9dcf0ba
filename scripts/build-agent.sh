#!/usr/bin/env bash
# Builds tether-agent as shipped to servers: profile `agent-release`
# (opt-level "z", fat LTO, one codegen unit, panic = "abort", stripped) and,
# through RUSTFLAGS that a Cargo profile cannot carry:
#   -C target-feature=+crt-static     glibc linked statically (static-pie): no
#                                     libc.so, ld.so or libgcc_s mapped
#   -C link-arg=-Wl,-z,pack-relative-relocs
#                                     DT_RELR relocations (glibc >= 2.36):
#                                     ~3 KB instead of ~240 KB of .rela.dyn
#   -C force-unwind-tables=no         no unwind tables for our code (panic=abort)
# The build names --target explicitly so these flags reach the agent and its
# dependencies but not build scripts or proc-macros.
#
# Usage: scripts/build-agent.sh [DIR]
#   Prints the path of the binary. With DIR, also copies it to
#   DIR/tether-agent-linux-<arch>, the name a control plane started with
#   `--agent-dir DIR` (or TETHER_AGENT_DIR=DIR) serves at
#   GET /agent/download/linux/<arch> to the servers it provisions.
#
# Environment: CARGO_TARGET_DIR (default /var/tmp/tether-target),
#   AGENT_TARGET (default: the host's *-linux-gnu triple).
#
# Name resolution in the static binary: glibc >= 2.34 has the `files` and
# `dns` NSS modules inside libc, so /etc/hosts and DNS work as before. Any
# other module on the `hosts:` line of /etc/nsswitch.conf (myhostname,
# resolve, mdns4_minimal, sss, ...) is dlopen'ed with the host's libc.so.6,
# which glibc supports only when the host runs the glibc the agent was linked
# with: on such hosts give the control plane as an IP literal or ship the
# dynamic release build. See docs/performance.md, *The agent's footprint*.
set -euo pipefail

install_dir=""
if [ $# -ge 1 ]; then
    mkdir -p "$1"
    install_dir="$(cd "$1" && pwd)"
fi
if [ -n "${CARGO_TARGET_DIR:-}" ]; then CARGO_TARGET_DIR="$(realpath -m "$CARGO_TARGET_DIR")"; fi
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tether-target}"
host="$(rustc -vV | sed -n 's/^host: //p')"
target="${AGENT_TARGET:-$host}"
case "$target" in
    *-linux-gnu) ;;
    *) echo "build-agent.sh: $target is not a *-linux-gnu target; the static glibc build needs one" >&2; exit 1 ;;
esac

RUSTFLAGS="-C target-feature=+crt-static -C force-unwind-tables=no -C link-arg=-Wl,-z,pack-relative-relocs" \
    cargo build --profile agent-release -p tether-agent --target "$target" >&2

bin="$CARGO_TARGET_DIR/$target/agent-release/tether-agent"
if readelf -lW "$bin" | grep -q 'INTERP'; then
    echo "build-agent.sh: $bin is not statically linked" >&2
    exit 1
fi

if [ -n "$install_dir" ]; then
    case "${target%%-*}" in
        x86_64) arch=amd64 ;;
        aarch64) arch=arm64 ;;
        *) arch="${target%%-*}" ;;
    esac
    install -m 0755 "$bin" "$install_dir/tether-agent-linux-$arch"
    echo "build-agent.sh: installed as $install_dir/tether-agent-linux-$arch" >&2
fi
echo "$bin"
