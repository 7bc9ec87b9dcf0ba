#!/bin/sh
# Create-time provisioner of the `docker` target (see ../main.tf).
#
# Environment: TETHER_CONTAINER, TETHER_HOSTNAME, TETHER_NETWORK,
# TETHER_SUBNET, TETHER_IP, TETHER_IMAGE, TETHER_BUSYBOX, TETHER_LABELS (one
# key=value a line), TETHER_FILE_COUNT and, for each write_files entry i of
# the user-data, TETHER_FILE_<i>_PATH, TETHER_FILE_<i>_MODE and
# TETHER_FILE_<i>_CONTENT. File contents (one holds the bootstrap token) are
# written with the shell's built-in printf into a 0700 staging directory,
# copied into the container and removed; they leave the environment before
# any other program runs.
set -eu
umask 077

container=$TETHER_CONTAINER
network=$TETHER_NETWORK
count=${TETHER_FILE_COUNT:-0}
case $count in '' | *[!0-9]*) echo "tether-docker: bad TETHER_FILE_COUNT" >&2; exit 1 ;; esac
command -v docker >/dev/null 2>&1 || { echo "tether-docker: the docker CLI is not installed" >&2; exit 1; }

stage=$(mktemp -d "${TMPDIR:-/tmp}/tether-docker.XXXXXX")
trap 'rm -rf "$stage"' EXIT

i=0
path='' mode=''
while [ "$i" -lt "$count" ]; do
    eval "path=\${TETHER_FILE_${i}_PATH-} mode=\${TETHER_FILE_${i}_MODE-0644}"
    case $path in
        /*) ;;
        *) echo "tether-docker: write_files path must be absolute, got '$path'" >&2; exit 1 ;;
    esac
    case /$path/ in
        */../* | */./*) echo "tether-docker: write_files path must be plain, got '$path'" >&2; exit 1 ;;
    esac
    case $mode in
        [0-7][0-7][0-7] | [0-7][0-7][0-7][0-7]) ;;
        *) echo "tether-docker: bad permissions '$mode' for $path" >&2; exit 1 ;;
    esac
    target=$stage/rootfs$path
    # Directories as a fresh system has them; the files keep their modes.
    (umask 022 && mkdir -p "${target%/*}")
    eval "printf '%s' \"\${TETHER_FILE_${i}_CONTENT-}\"" >"$target"
    chmod "$mode" "$target"
    unset "TETHER_FILE_${i}_PATH" "TETHER_FILE_${i}_MODE" "TETHER_FILE_${i}_CONTENT"
    i=$((i + 1))
done
unset TETHER_FILE_COUNT
[ -f "$stage/rootfs/var/lib/tether/bootstrap.sh" ] ||
    { echo "tether-docker: the user-data wrote no /var/lib/tether/bootstrap.sh" >&2; exit 1; }

# The image: busybox and the host's C library (for a dynamically linked
# agent), built from scratch, so nothing is pulled.
if ! docker image inspect "$TETHER_IMAGE" >/dev/null 2>&1; then
    context=$stage/image
    (umask 022 && mkdir -p "$context/rootfs/bin" "$context/rootfs/tmp" "$context/rootfs/run")
    cp -L "$TETHER_BUSYBOX" "$context/rootfs/bin/busybox"
    chmod 0755 "$context/rootfs/bin/busybox"
    for lib in /lib64/ld-linux-x86-64.so.2 /lib/ld-linux-aarch64.so.1 /lib/*-linux-gnu/libc.so.6 \
        /lib/*-linux-gnu/libm.so.6 /lib/*-linux-gnu/libgcc_s.so.1 /lib/*-linux-gnu/libpthread.so.0 \
        /lib/*-linux-gnu/libdl.so.2 /lib/*-linux-gnu/librt.so.1 /lib/*-linux-gnu/ld-linux-*.so.*; do
        [ -e "$lib" ] || continue
        (umask 022 && mkdir -p "$context/rootfs${lib%/*}")
        cp -L "$lib" "$context/rootfs$lib"
        chmod 0755 "$context/rootfs$lib"
    done
    chmod 0755 "$context" "$context/rootfs"
    cat >"$context/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN chmod 1777 /tmp && mkdir -p /etc /root /var/log /usr/local/bin && echo 'root:x:0:0:root:/root:/bin/sh' >/etc/passwd
CMD ["/bin/sh"]
DOCKERFILE
    DOCKER_BUILDKIT=0 docker build -q -t "$TETHER_IMAGE" "$context" >/dev/null ||
        { echo "tether-docker: cannot build $TETHER_IMAGE" >&2; exit 1; }
fi

if ! docker network inspect "$network" >/dev/null 2>&1; then
    docker network create --driver bridge --subnet "$TETHER_SUBNET" --label tether.managed=true "$network" >/dev/null
fi
subnet=$(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' "$network")
case " $subnet " in
    *" $TETHER_SUBNET "*) ;;
    *) echo "tether-docker: network $network has subnet $subnet, not $TETHER_SUBNET" >&2; exit 1 ;;
esac

set -- --name "$container" --hostname "$TETHER_HOSTNAME" --network "$network" --ip "$TETHER_IP" \
    --init --label tether.managed=true
while IFS= read -r label; do
    [ -n "$label" ] && set -- "$@" --label "$label"
done <<LABELS
${TETHER_LABELS:-}
LABELS
docker create "$@" "$TETHER_IMAGE" /bin/sh -c 'while :; do sleep 3600; done' >/dev/null

fail() {
    if [ "${TETHER_LOCAL_KEEP_FAILED:-false}" = true ]; then
        echo "tether-docker: boot failed; container $container kept for inspection" >&2
    else
        TETHER_CONTAINER=$container TETHER_NETWORK=$network /bin/sh "$(dirname "$0")/down.sh" || true
    fi
    exit "$1"
}

docker cp "$stage/rootfs/." "$container:/" || fail 1
rm -rf "$stage/rootfs"
docker start "$container" >/dev/null || fail 1
docker exec "$container" /bin/sh /var/lib/tether/bootstrap.sh --mode process || fail $?
