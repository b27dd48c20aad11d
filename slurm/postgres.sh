#!/usr/bin/env bash
# Start (or check) a private PostgreSQL server for the tests' MLflow tracking server (docs/cluster.md: the server
# on PostgreSQL), as start.sh starts MariaDB for slurmdbd: data in $SLURM_LOCAL_DIR/postgres, listening on
# 127.0.0.1:$SLURM_LOCAL_PG_PORT (6820) and a unix socket in that folder only, trust authentication for those
# (no password anywhere). Idempotent: a running server is kept, a stale pid file (after a crash) is cleared.
# Prints the SQLAlchemy base URL, e.g. postgresql+psycopg2://postgres@127.0.0.1:6820 (append /<database>).
#     bash slurm/postgres.sh                 # start or check
#     bash slurm/postgres.sh createdb NAME   # start or check, then create database NAME (if missing)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
PORT="${SLURM_LOCAL_PG_PORT:-6820}"
PGDATA="$STATE/postgres"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -n "$PGBIN" ] && [ -x "$PGBIN/postgres" ] || die "PostgreSQL not found: run slurm/install.sh first"
need_root postgres.sh
as_pg() { runuser -u postgres -- "$@"; }
id postgres >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres

mkdir -p "$STATE" "$PGDATA"
chmod 755 "$STATE"
chown postgres: "$PGDATA"
chmod 700 "$PGDATA"
exec 8>"$STATE/.pg.lock"   # one start at a time (parallel test sessions)
flock -w 120 8 || die "another postgres.sh holds $STATE/.pg.lock"

if [ ! -f "$PGDATA/PG_VERSION" ]; then
    log "initialising PostgreSQL in $PGDATA"
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust --no-sync >/dev/null
fi
if ! as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    rm -f "$PGDATA/postmaster.pid"   # a crashed server's; pg_ctl status said nothing runs
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && die "port $PORT is in use: choose another with SLURM_LOCAL_PG_PORT"
    log "starting PostgreSQL on 127.0.0.1:$PORT"
    # 8>&- : the server must not inherit (and hold) the start lock.
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDATA -c max_connections=400" start >/dev/null 8>&- \
        || { tail -n 20 "$PGDATA/server.log" >&2; die "PostgreSQL did not start"; }
fi
if [ "${1:-}" = createdb ]; then
    [ -n "${2:-}" ] || die "createdb needs a database name"
    if ! as_pg "$PGBIN/psql" -h "$PGDATA" -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$2'" \
        | grep -q 1; then
        as_pg "$PGBIN/createdb" -h "$PGDATA" -p "$PORT" -U postgres "$2"
    fi
fi
echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT"
