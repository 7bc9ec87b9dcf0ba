#!/bin/sh
# Destroy-time provisioner of the `docker` target (see ../main.tf): removes
# the container (its processes are killed with it) and the network once no
# container uses it (only a network the target made).
set -u
container=${TETHER_CONTAINER:?}
network=${TETHER_NETWORK:?}
if docker container inspect "$container" >/dev/null 2>&1; then
    docker rm -f "$container" >/dev/null || exit 1
fi
if [ "$(docker network inspect -f '{{index .Labels "tether.managed"}}' "$network" 2>/dev/null)" = true ]; then
    docker network rm "$network" >/dev/null 2>&1 || true # still in use
fi
exit 0
