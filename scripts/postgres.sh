#!/usr/bin/env bash
# Starts a local PostgreSQL 15 for the store test suite and prints its admin URL.
#
# Idempotent: installs PostgreSQL 15 with apt when it is missing, starts the
# `15 main` cluster (fine if it already runs), waits until it accepts
# connections, and creates the login role `tether` (password `tether`,
# CREATEDB) unless it exists. Prints the URL to use as
# TETHER_TEST_DATABASE_URL:
#
#   export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh)
#   cargo test -p tether-control-plane --test store_core   # or any store_* suite
#
# Everything but the URL goes to stderr. When PostgreSQL is not ready yet it
# needs root (apt, pg_ctlcluster, psql as the `postgres` system user). Fails
# with a message on the first problem.
set -euo pipefail

VERSION=15
CLUSTER=main
HOST=127.0.0.1
PORT=5432
ROLE=tether
PASSWORD=tether

say() { echo "postgres.sh: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

URL="postgres://$ROLE:$PASSWORD@$HOST:$PORT/postgres"

# The role can log in with its password and create databases.
role_ready() {
    command -v psql >/dev/null 2>&1 || return 1
    [ "$(PGPASSWORD="$PASSWORD" PGCONNECT_TIMEOUT=5 psql "host=$HOST port=$PORT user=$ROLE dbname=postgres" \
        -XtAc "SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user" 2>/dev/null)" = "t" ]
}

# Already set up (e.g. a second run, or a CI service container): nothing to do.
if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$HOST" -p "$PORT" && role_ready; then
    say "PostgreSQL is ready"
    echo "$URL"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "PostgreSQL is not ready on $HOST:$PORT with role $ROLE; run this script as root to install/start it and create the role"

# Runs a command as the `postgres` system user (from /, which it can read).
as_postgres() {
    if command -v runuser >/dev/null 2>&1; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && su postgres -s /bin/sh -c "$(printf '%q ' "$@")")
    fi
}

# 1. Install PostgreSQL 15 when missing.
if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ ! -x "/usr/lib/postgresql/$VERSION/bin/postgres" ]; then
    say "installing postgresql-$VERSION with apt"
    command -v apt-get >/dev/null 2>&1 || die "pg_ctlcluster is missing and apt-get is not available; install PostgreSQL $VERSION yourself"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2 || die "apt-get update failed"
    apt-get install -y --no-install-recommends "postgresql-$VERSION" postgresql-client-common >&2 \
        || die "apt-get install postgresql-$VERSION failed"
fi
for tool in pg_ctlcluster pg_lsclusters pg_isready psql; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing after installation"
done

# 2. The cluster must exist (the Debian package creates `15 main`).
if ! pg_lsclusters --no-header 2>/dev/null | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c { found = 1 } END { exit !found }'; then
    say "creating cluster $VERSION/$CLUSTER"
    pg_createcluster "$VERSION" "$CLUSTER" --port "$PORT" >&2 || die "pg_createcluster $VERSION $CLUSTER failed"
fi
cluster_port=$(pg_lsclusters --no-header | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c { print $3 }')
[ "$cluster_port" = "$PORT" ] || die "cluster $VERSION/$CLUSTER is configured for port $cluster_port, expected $PORT"

# 3. Start it (already running is fine).
status=$(pg_lsclusters --no-header | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c { print $4 }')
if [ "$status" != "online" ]; then
    say "starting cluster $VERSION/$CLUSTER"
    if ! pg_ctlcluster "$VERSION" "$CLUSTER" start >&2; then
        status=$(pg_lsclusters --no-header | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c { print $4 }')
        [ "$status" = "online" ] || die "pg_ctlcluster $VERSION $CLUSTER start failed; see /var/log/postgresql/postgresql-$VERSION-$CLUSTER.log"
    fi
fi

# 4. Wait until it accepts TCP connections on 127.0.0.1:5432.
ready=0
for _ in $(seq 1 60); do
    if pg_isready -q -h "$HOST" -p "$PORT"; then
        ready=1
        break
    fi
    sleep 0.5
done
[ "$ready" -eq 1 ] || die "PostgreSQL does not accept connections on $HOST:$PORT after 30 s (check listen_addresses and the log)"

# 5. The login role, created once; the password is (re)set so the URL works.
exists=$(as_postgres psql -p "$PORT" -v ON_ERROR_STOP=1 -XtAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'") \
    || die "cannot query roles as the postgres user"
if [ "$exists" != "1" ]; then
    say "creating role $ROLE"
    as_postgres psql -p "$PORT" -v ON_ERROR_STOP=1 -Xqc \
        "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2 \
        || die "CREATE ROLE $ROLE failed"
else
    as_postgres psql -p "$PORT" -v ON_ERROR_STOP=1 -Xqc \
        "ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2 \
        || die "ALTER ROLE $ROLE failed"
fi

# 6. Password authentication over TCP must work (pg_hba host ... scram/md5).
role_ready \
    || die "cannot log in as $ROLE with a password on $HOST:$PORT (check pg_hba.conf allows md5/scram-sha-256 for 127.0.0.1)"

say "PostgreSQL $VERSION is ready"
echo "$URL"
