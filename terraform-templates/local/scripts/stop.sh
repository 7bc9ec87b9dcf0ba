#!/bin/sh
# Destroy-time provisioner of the `local` target (see ../main.tf): stops the
# agent whose pid is in <root>/run/tether-agent.pid (its whole process group:
# TERM, then KILL after TETHER_STOP_TIMEOUT seconds), waits until it is gone,
# then removes the root. Only a directory the local target made (it holds
# .tether-local-server) is removed; a missing root is already destroyed.
set -u

root=${TETHER_LOCAL_ROOT:-}
limit=${TETHER_STOP_TIMEOUT:-10}
case $limit in '' | *[!0-9]*) limit=10 ;; esac
case $root in
    /) echo "tether-local: refusing to remove /" >&2; exit 1 ;;
    /*) ;;
    *) echo "tether-local: the server root must be an absolute path, got '$root'" >&2; exit 1 ;;
esac
[ -d "$root" ] || exit 0
if [ ! -f "$root/.tether-local-server" ]; then
    echo "tether-local: $root was not made by the local target; not removing it" >&2
    exit 1
fi

# alive PID: the process exists and is not a zombie.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [ -r "/proc/$1/stat" ] || return 0
    case $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) in Z | X | x) return 1 ;; esac
}

# ours PID: the process runs with this root's agent.toml (not a reused pid).
ours() {
    config="$root/etc/tether/agent.toml"
    if [ -r "/proc/$1/cmdline" ]; then
        tr '\000' '\n' <"/proc/$1/cmdline" | grep -qxF -- "$config"
    else
        ps -p "$1" -o args= 2>/dev/null | grep -qF -- "$config"
    fi
}

# wait_gone PID SECONDS
wait_gone() {
    ticks=$(($2 * 5))
    while alive "$1"; do
        [ "$ticks" -gt 0 ] || return 1
        sleep 0.2 2>/dev/null || sleep 1
        ticks=$((ticks - 1))
    done
}

pid_file=$root/run/tether-agent.pid
pid=$(cat "$pid_file" 2>/dev/null || true)
case $pid in '' | *[!0-9]*) pid= ;; esac
if [ -n "$pid" ] && alive "$pid" && ours "$pid"; then
    echo "tether-local: stopping the agent (pid $pid)" >&2
    kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    if ! wait_gone "$pid" "$limit"; then
        echo "tether-local: the agent ignored SIGTERM for ${limit}s; killing it" >&2
        kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        wait_gone "$pid" 10 || { echo "tether-local: pid $pid survived SIGKILL" >&2; exit 1; }
    fi
    # Whatever else the agent started in its process group.
    kill -KILL "-$pid" 2>/dev/null
fi
rm -f "$pid_file"
rm -rf "$root"
