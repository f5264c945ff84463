#!/usr/bin/env bash
# Starts the machine's PostgreSQL 15 cluster when it is down and creates the project's role and
# databases. Idempotent. With an external server, skip this and point the *_DATABASE_URL settings at it.
set -euo pipefail
version=${PG_VERSION:-15}
cluster=${PG_CLUSTER:-main}
role=${LOYALTY_DB_USER:-loyalty}
password=${LOYALTY_DB_PASSWORD:-loyalty}
# Read-only login for Grafana's PostgreSQL data source; the metrics migrations grant it SELECT on the metrics
# schema (api_keys excepted) when it exists, so create it before migrating.
reader=loyalty_reader
reader_password=${LOYALTY_READER_PASSWORD:-loyalty_reader}
databases=${LOYALTY_DATABASES:-"loyalty_ledger loyalty_rules loyalty_metrics loyalty_ledger_test loyalty_rules_test loyalty_metrics_test"}

log() { printf 'postgres: %s\n' "$*" >&2; }

if command -v pg_lsclusters >/dev/null; then
  status=$(pg_lsclusters -h "$version" "$cluster" 2>/dev/null | awk '{print $4}')
  if [ -z "$status" ]; then
    log "no cluster $version/$cluster; creating it"
    pg_createcluster "$version" "$cluster"
    status=down
  fi
  if [ "$status" != "online" ]; then
    log "starting cluster $version/$cluster"
    pg_ctlcluster "$version" "$cluster" start
  fi
fi

psql_admin() {
  if [ "$(id -u)" = 0 ]; then su postgres -c "psql -v ON_ERROR_STOP=1 -qAtX $*"; else sudo -u postgres psql -v ON_ERROR_STOP=1 -qAtX "$@"; fi
}

for _ in $(seq 1 30); do psql_admin "-c 'select 1'" >/dev/null 2>&1 && break; sleep 1; done

# Server settings for this write-heavy workload (every consumer batch writes thousands of rows). The defaults
# (128 MB of buffers, a checkpoint per GB of WAL) made backends evict dirty pages themselves and logged a full
# page image for most pages touched after each checkpoint: 7.5 KB of WAL per purchase, 4 KB with these.
# LOYALTY_PG_TUNE=0 leaves the server's configuration alone (an external or shared server).
if [ "${LOYALTY_PG_TUNE:-1}" = 1 ]; then
  for setting in ${LOYALTY_PG_SETTINGS:-shared_buffers=4GB max_wal_size=8GB checkpoint_timeout=15min}; do
    name=${setting%%=*} value=${setting#*=}
    if [ "$(psql_admin "-c \"select current_setting('$name') = '$value'\"")" != t ]; then
      log "setting $name = $value"
      psql_admin "-c \"alter system set $name = '$value'\"" >/dev/null
    fi
  done
  psql_admin "-c 'select pg_reload_conf()'" >/dev/null
  sleep 0.2
  if [ "$(psql_admin "-c 'select count(*) from pg_settings where pending_restart'")" != 0 ] \
     && command -v pg_ctlcluster >/dev/null; then
    log "restarting cluster $version/$cluster to apply the settings"
    pg_ctlcluster "$version" "$cluster" restart
    for _ in $(seq 1 30); do psql_admin "-c 'select 1'" >/dev/null 2>&1 && break; sleep 1; done
  fi
fi

if [ "$(psql_admin "-c \"select 1 from pg_roles where rolname = '$role'\"")" != 1 ]; then
  log "creating role $role"
  psql_admin "-c \"create role $role login password '$password' createdb\""
fi
if [ "$(psql_admin "-c \"select 1 from pg_roles where rolname = '$reader'\"")" != 1 ]; then
  log "creating read-only role $reader"
  psql_admin "-c \"create role $reader login password '$reader_password' nosuperuser nocreatedb nocreaterole\""
fi
for db in $databases; do
  if [ "$(psql_admin "-c \"select 1 from pg_database where datname = '$db'\"")" != 1 ]; then
    log "creating database $db"
    psql_admin "-c \"create database $db owner $role\""
  fi
done
log "ready on 127.0.0.1:5432 (role $role, read-only role $reader; databases: $databases)"
