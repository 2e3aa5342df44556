#!/bin/sh
# PostgreSQL for the smoke test on a machine without a registry: the official image's
# contract (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, PGDATA; `postgres ARGS` as the
# command) on Debian's postgresql-15.
set -eu
BIN=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec runuser -u postgres -- "$0" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    "$BIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$password_file" --encoding=UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "${POSTGRES_DB:-postgres}" != postgres ]; then
        echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\";" \
            | "$BIN/postgres" --single -D "$PGDATA" postgres >/dev/null
    fi
fi
[ "${1:-}" = postgres ] && shift
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
