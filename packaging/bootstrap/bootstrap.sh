#!/bin/sh
# Tether bootstrap: download the agent from the control plane, check its
# SHA-256, install it, start it, and report each stage to the control plane.
# POSIX sh (dash, busybox ash). Written by cloud-init to
# /var/lib/tether/bootstrap.sh and run once by its runcmd.
#
#   bootstrap.sh [--root DIR] [--mode systemd|process]
#
# --root (env TETHER_ROOT, default "") prefixes every path: "" on a real
# server, a directory for the `local` Terraform target.
# --mode (env TETHER_BOOTSTRAP_MODE, default systemd): `systemd` enables the
# tether-agent unit; `process` starts the agent as a detached process and
# writes its pid to $ROOT/run/tether-agent.pid.
#
# Its settings come from $ROOT/var/lib/tether/bootstrap.env (0600, written by
# cloud-init): TETHER_API_URL, TETHER_AGENT_SHA256 ("os/arch=hex ..."),
# TETHER_REPORT_FIELDS (the JSON members naming the deployment and carrying
# the bootstrap token), optionally TETHER_INSTALL_DOCKER=1: in systemd mode,
# Docker Engine is installed from the distribution's packages (apt-get:
# docker.io; dnf/yum: docker, else moby-engine) and started before the agent
# is, reported as the stage `docker_installed` (an engine already there is
# kept), and optionally TETHER_AGENT_USER: in systemd mode the
# agent then runs as that system user (created if missing, added to the
# `docker` group, which is created if missing) through the unit drop-in
# tether-agent.service.d/10-user.conf, and owns its state dir and
# agent.toml. Secrets never reach a command line: report bodies are
# written to 0600 files (here-documents) and posted from the file. The file
# is removed once the agent runs.
set -u
umask 077

ROOT=${TETHER_ROOT:-}
MODE=${TETHER_BOOTSTRAP_MODE:-systemd}
while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=${2-}; shift 2 || exit 2 ;;
        --mode) MODE=${2-}; shift 2 || exit 2 ;;
        *) echo "bootstrap: unknown argument: $1" >&2; exit 2 ;;
    esac
done
ROOT=${ROOT%/}
case $MODE in systemd|process) ;; *) echo "bootstrap: unknown mode: $MODE" >&2; exit 2 ;; esac

STATE="$ROOT/var/lib/tether"
ENV_FILE="$STATE/bootstrap.env"
CONFIG="$ROOT/etc/tether/agent.toml"
BIN="$ROOT/usr/local/bin/tether-agent"
PID_FILE="$ROOT/run/tether-agent.pid"
LOG="$ROOT/var/log/tether-agent.log"

log() { echo "tether-bootstrap: $*" >&2; }

if [ ! -r "$ENV_FILE" ]; then
    log "missing $ENV_FILE"
    exit 1
fi
TETHER_API_URL='' TETHER_AGENT_SHA256='' TETHER_REPORT_FIELDS='' TETHER_AGENT_USER='' TETHER_INSTALL_DOCKER=''
# shellcheck source=/dev/null
. "$ENV_FILE"
API=${TETHER_API_URL%/}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tether-bootstrap.XXXXXX") || { log "cannot create a work dir"; exit 1; }
trap 'rm -rf "$WORK"' EXIT
trap 'exit 1' HUP INT TERM

have() { command -v "$1" >/dev/null 2>&1; }

# alive PID: the process exists and is not a zombie.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [ -r "/proc/$1/stat" ] || return 0
    case $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) in Z|X|x) return 1 ;; esac
}

# Runs "$@" for at most $1 seconds when `timeout` exists.
bounded() {
    limit=$1; shift
    if have timeout; then timeout "$limit" "$@"; else "$@"; fi
}

# One printable line without quotes or backslashes, at most 200 characters.
one_line() {
    printf '%s' "$1" | tr '\n\r\t' '   ' | tr -d '\000-\037"\\' | cut -c1-200
}

# report STAGE STEP DETAIL: best effort, a few seconds at most, never fatal.
report() {
    stage=$1 step=$2 detail=$(one_line "$3")
    body="$WORK/report.json"
    members="\"stage\":\"$stage\""
    [ -n "$step" ] && members="$members,\"step\":\"$step\""
    [ -n "$detail" ] && members="$members,\"detail\":\"$detail\""
    cat >"$body" <<EOF
{$TETHER_REPORT_FIELDS,$members}
EOF
    url="$API/api/v1/infrastructure/boot-stages"
    if have curl; then
        curl -fsS -o /dev/null --connect-timeout 5 -m 5 -H 'Content-Type: application/json' \
            --data-binary "@$body" "$url" 2>"$WORK/report.err"
    elif have wget; then
        bounded 5 wget -q -O /dev/null --header 'Content-Type: application/json' \
            --post-file "$body" "$url" 2>"$WORK/report.err"
    else
        echo "neither curl nor wget" >"$WORK/report.err"
        false
    fi || log "could not report stage $stage: $(one_line "$(tail -n 1 "$WORK/report.err" 2>/dev/null)")"
    rm -f "$body"
    log "stage $stage${step:+ (step $step)}${detail:+: $detail}"
}

# fail STEP REASON: report `failed` and stop.
fail() {
    report failed "$1" "$2"
    exit 1
}

# fetch URL FILE: curl, else wget; stderr's last line in $WORK/fetch.err.
fetch() {
    if have curl; then
        curl -fsSL --connect-timeout 10 -m 300 -o "$2" "$1" 2>"$WORK/fetch.err"
    elif have wget; then
        bounded 300 wget -q -O "$2" "$1" 2>"$WORK/fetch.err"
    else
        echo "neither curl nor wget is installed" >"$WORK/fetch.err"
        return 1
    fi
}

# 1. Download and verify.
case $(uname -m) in
    x86_64|amd64) ARCH=amd64 ;;
    aarch64|arm64) ARCH=arm64 ;;
    *) fail download "unsupported architecture $(uname -m)" ;;
esac
OS=linux
EXPECTED=''
for pair in $TETHER_AGENT_SHA256; do
    case $pair in "$OS/$ARCH="*) EXPECTED=${pair#*=} ;; esac
done
[ -n "$EXPECTED" ] || fail download "no agent checksum for $OS/$ARCH"
have sha256sum || fail download "sha256sum is not installed"

DOWNLOAD="$WORK/tether-agent"
attempt=1
until fetch "$API/agent/download/$OS/$ARCH" "$DOWNLOAD"; do
    if [ "$attempt" -ge 5 ]; then
        fail download "HTTP error: $(tail -n 1 "$WORK/fetch.err" 2>/dev/null)"
    fi
    log "download attempt $attempt failed: $(one_line "$(tail -n 1 "$WORK/fetch.err" 2>/dev/null)")"
    attempt=$((attempt + 1))
    sleep 3
done
ACTUAL=$(sha256sum "$DOWNLOAD" | cut -d' ' -f1)
[ "$ACTUAL" = "$EXPECTED" ] || fail download "checksum mismatch for $OS/$ARCH: expected $EXPECTED, got $ACTUAL"
report downloaded "" "$OS/$ARCH sha256 $ACTUAL"

# 2. Install (atomically, so a running agent's binary is never half-written).
mkdir -p "${BIN%/*}" 2>"$WORK/install.err" &&
    cp "$DOWNLOAD" "$BIN.new" 2>"$WORK/install.err" &&
    chmod 0755 "$BIN.new" 2>"$WORK/install.err" &&
    mv -f "$BIN.new" "$BIN" 2>"$WORK/install.err" ||
    fail install "cannot install $BIN: $(tail -n 1 "$WORK/install.err" 2>/dev/null)"
chmod 0700 "$STATE" 2>/dev/null
report installed "" "$BIN"

# 3. Docker Engine from the distribution's packages, when asked (systemd
# mode only: a `process` server shares its host). Before the agent user, so
# the package's docker group exists when the user joins it.
if [ "$TETHER_INSTALL_DOCKER" = 1 ]; then
    [ "$MODE" = systemd ] || fail docker "installing Docker needs systemd mode"
    if have docker; then
        log "Docker is already installed"
    elif have apt-get; then
        { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q docker.io; } \
            >"$WORK/docker.err" 2>&1 || fail docker "apt-get error: $(tail -n 1 "$WORK/docker.err" 2>/dev/null)"
    elif have dnf || have yum; then
        if have dnf; then PKG=dnf; else PKG=yum; fi
        { "$PKG" install -y -q docker || "$PKG" install -y -q moby-engine; } \
            >"$WORK/docker.err" 2>&1 || fail docker "$PKG error: $(tail -n 1 "$WORK/docker.err" 2>/dev/null)"
    else
        fail docker "no apt-get, dnf or yum to install Docker with"
    fi
    have docker || fail docker "docker is not installed after the package install"
    if have systemctl; then
        systemctl enable --now docker.service >"$WORK/docker.err" 2>&1 ||
            fail docker "systemctl error: $(tail -n 1 "$WORK/docker.err" 2>/dev/null)"
    fi
    report docker_installed "" "$(docker --version 2>/dev/null)"
fi

# 4. A dedicated user (systemd mode): in the docker group, owns the state
# dir and agent.toml; the unit runs as it through a drop-in.
AGENT_USER=$TETHER_AGENT_USER
if [ -n "$AGENT_USER" ] && [ "$MODE" = systemd ]; then
    case $AGENT_USER in *[!a-z0-9_-]*|[!a-z_]*) fail install "invalid agent user name" ;; esac
    DROPIN="$ROOT/etc/systemd/system/tether-agent.service.d"
    {
        { getent group docker >/dev/null || groupadd --system docker; } &&
            { id -u "$AGENT_USER" >/dev/null 2>&1 ||
                useradd --system --user-group --home-dir "$STATE" --no-create-home \
                    --shell /usr/sbin/nologin "$AGENT_USER"; } &&
            usermod -a -G docker "$AGENT_USER" &&
            chown "$AGENT_USER:" "$CONFIG" &&
            chown -R "$AGENT_USER:" "$STATE" &&
            mkdir -p "$DROPIN" &&
            printf '[Service]\nUser=%s\nGroup=%s\nSupplementaryGroups=docker\n' \
                "$AGENT_USER" "$AGENT_USER" >"$DROPIN/10-user.conf" &&
            chmod 0644 "$DROPIN/10-user.conf"
    } >"$WORK/user.err" 2>&1 ||
        fail install "cannot set up the agent user $AGENT_USER: $(tail -n 1 "$WORK/user.err" 2>/dev/null)"
    log "the agent runs as $AGENT_USER (group docker)"
fi

# 5. Start.
if [ "$MODE" = systemd ]; then
    have systemctl || fail start "systemctl is not installed"
    { systemctl daemon-reload && systemctl enable --now tether-agent.service; } >"$WORK/start.err" 2>&1 ||
        fail start "systemctl error: $(tail -n 1 "$WORK/start.err" 2>/dev/null)"
    report started "" "systemd unit tether-agent.service"
else
    mkdir -p "${PID_FILE%/*}" "${LOG%/*}" || fail start "cannot create ${PID_FILE%/*} or ${LOG%/*}"
    if [ -f "$PID_FILE" ] && alive "$(cat "$PID_FILE")"; then
        fail start "an agent already runs with pid $(cat "$PID_FILE")"
    fi
    # A clean environment: nothing of the caller's (e.g. terraform's) reaches
    # the agent. All descriptors point away from the caller, so it returns.
    if have setsid; then DETACH=setsid; else DETACH='nohup'; fi
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin ${RUST_LOG:+RUST_LOG=$RUST_LOG} \
        "$DETACH" "$BIN" run --state-dir "$STATE" --config "$CONFIG" </dev/null >>"$LOG" 2>&1 &
    PID=$!
    echo "$PID" >"$PID_FILE"
    sleep 1
    alive "$PID" || fail start "the agent exited at once: $(tail -n 1 "$LOG" 2>/dev/null)"
    report started "" "pid $PID"
fi

# The one-time token stays in agent.toml (0600) for the agent only.
rm -f "$ENV_FILE"
exit 0
