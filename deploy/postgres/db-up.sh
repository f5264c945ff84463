#!/usr/bin/env bash
# Starts the machine's PostgreSQL 15 cluster when it is down and creates the project's role and
# databases. Idempotent. With an external server, skip this and point the *_DATABASE_URL settings at it.
set -euo pipefail
version=${PG_VERSION:-15}
cluster=${PG_CLUSTER:-main}
port=${PG_PORT:-5432}   # the cluster's port (a second cluster, like make chaos's, needs its own)
role=${LOYALTY_DB_USER:-loyalty}
password=${LOYALTY_DB_PASSWORD:-loyalty}
# The owner of the databases and schemas, which runs the migrations; the services connect as $role, which
# may read and write rows but change no schema object (so it cannot drop the ledger's append-only trigger).
owner=${LOYALTY_DB_OWNER:-loyalty_owner}
owner_password=${LOYALTY_DB_OWNER_PASSWORD:-loyalty_owner}
# Read-only login for Grafana's PostgreSQL data source; the metrics migrations grant it SELECT on the metrics
# schema (api_keys excepted) when it exists, so create it before migrating.
reader=loyalty_reader
reader_password=${LOYALTY_READER_PASSWORD:-loyalty_reader}
databases=${LOYALTY_DATABASES:-"loyalty_ledger loyalty_rules loyalty_metrics loyalty_ledger_test loyalty_rules_test loyalty_metrics_test"}

log() { printf 'postgres: %s\n' "$*" >&2; }

if command -v pg_lsclusters >/dev/null; then
  status=$({ pg_lsclusters -h "$version" "$cluster" 2>/dev/null || true; } | awk '{print $4}')
  if [ -z "$status" ]; then
    log "no cluster $version/$cluster; creating it"
    pg_createcluster --port "$port" "$version" "$cluster"
    status=down
  fi
  if [ "$status" != "online" ]; then
    log "starting cluster $version/$cluster"
    pg_ctlcluster "$version" "$cluster" start
  fi
fi

psql_admin() {
  if [ "$(id -u)" = 0 ]; then su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -qAtX $*"; else sudo -u postgres psql -p "$port" -v ON_ERROR_STOP=1 -qAtX "$@"; fi
}

# A script on stdin, run in database $1.
psql_script() {
  if [ "$(id -u)" = 0 ]; then su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -qAtX -d $1"; else sudo -u postgres psql -p "$port" -v ON_ERROR_STOP=1 -qAtX -d "$1"; fi
}

for name in "$role" "$owner"; do
  case "$name" in *[!a-z0-9_]*|'') log "role names must be lower-case identifiers: '$name'"; exit 1;; esac
done
[ "$role" != "$owner" ] || { log "the owner role must not be the service role ($role)"; exit 1; }

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
if [ "$(psql_admin "-c \"select 1 from pg_roles where rolname = '$owner'\"")" != 1 ]; then
  log "creating role $owner (owns the schemas, runs the migrations)"
  psql_admin "-c \"create role $owner login password '$owner_password'\""
fi
if [ "$(psql_admin "-c \"select 1 from pg_roles where rolname = '$reader'\"")" != 1 ]; then
  log "creating read-only role $reader"
  psql_admin "-c \"create role $reader login password '$reader_password' nosuperuser nocreatedb nocreaterole\""
fi
for db in $databases; do
  # LOYALTY_DB_FRESH=1 drops each listed database first, so it is created empty: benchmarks measure on
  # databases of their own, not on what earlier runs left. Only names ending in _bench are ever dropped.
  if [ "${LOYALTY_DB_FRESH:-0}" = 1 ]; then
    case "$db" in
      *_bench) log "dropping database $db (fresh)"; psql_admin "-c \"drop database if exists $db with (force)\"" ;;
      *) log "LOYALTY_DB_FRESH drops only *_bench databases, not $db"; exit 1 ;;
    esac
  fi
  if [ "$(psql_admin "-c \"select 1 from pg_database where datname = '$db'\"")" != 1 ]; then
    log "creating database $db"
    psql_admin "-c \"create database $db owner $owner\""
  fi
done

# Databases made before the owner role existed (every loyalty_* database the service role owns, or those
# named in LOYALTY_DB_ADOPT) are handed to the owner with everything in them the service role owns; the
# next migration grants the service role its rows again.
adopt=${LOYALTY_DB_ADOPT:-$(psql_admin "-c \"select string_agg(datname, ' ') from pg_database where datname like 'loyalty%' and datdba = '$role'::regrole\"")}
for db in $adopt; do
  log "handing database $db and its schemas from $role to $owner"
  psql_script "$db" <<SQL
ALTER DATABASE "$db" OWNER TO $owner;
DO \$\$
DECLARE r record;
BEGIN
  FOR r IN SELECT nspname FROM pg_namespace WHERE nspowner = '$role'::regrole LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO $owner', r.nspname);
  END LOOP;
  -- Tables take their indexes and serial sequences along; free-standing sequences go by themselves.
  FOR r IN SELECT c.oid::regclass AS rel, c.relkind FROM pg_class c
           WHERE c.relowner = '$role'::regrole AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                             AND d.objid = c.oid AND d.deptype IN ('a', 'i') AND c.relkind = 'S') LOOP
    EXECUTE format('ALTER %s %s OWNER TO $owner',
      CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                     WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, r.rel);
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_proc p WHERE p.proowner = '$role'::regrole LOOP
    EXECUTE format('ALTER ROUTINE %s OWNER TO $owner', r.fn);
  END LOOP;
  FOR r IN SELECT t.oid::regtype AS typ FROM pg_type t
           WHERE t.typowner = '$role'::regrole AND t.typtype IN ('e', 'd', 'r', 'm') LOOP
    EXECUTE format('ALTER TYPE %s OWNER TO $owner', r.typ);
  END LOOP;
END
\$\$;
SQL
done
log "ready on 127.0.0.1:$port (service role $role, owner $owner, read-only role $reader; databases: $databases)"
