#!/bin/sh
# One PostgreSQL role and one database per skein service, each role owning
# only its own database: a worker connects as skein_<service> and can reach
# no other service's data (the NATS users of nats/skein-users.conf do the
# same on the bus).
#
# compose.yaml mounts this directory as /docker-entrypoint-initdb.d, so the
# postgres image runs it once, when its volume is first initialised, as
# POSTGRES_USER. The passwords come from POSTGRES_PASSWORD_<SERVICE>.
# SKEIN_DATABASE_PREFIX (default skein_) names the roles and databases.
#
# It may run again: it creates what is missing, sets each role's password
# (a change of password is a run with the new ones), and hands each
# database and what is in it to its role. So it also converts an install
# from before roles per service, whose databases and tables the superuser
# owns: run it once, with the workers stopped,
#   docker compose exec -T postgres sh /docker-entrypoint-initdb.d/init-databases.sh
# Run it by hand to set up a server of your own the same way, with
# SKEIN_ADMIN_URL (postgres://user@host:port/postgres, a user that may create
# roles and databases) or psql's PGHOST, PGPORT and PGUSER.
set -eu

prefix="${SKEIN_DATABASE_PREFIX:-skein_}"
if [ -n "${SKEIN_ADMIN_URL:-}" ]; then
  set -- --dbname "$SKEIN_ADMIN_URL"
else
  set -- --username "${POSTGRES_USER:-${PGUSER:-postgres}}" --dbname postgres
fi

for service in identity catalog orders payments orchestrator projector; do
  upper="$(echo "$service" | tr '[:lower:]' '[:upper:]')"
  eval "password=\${POSTGRES_PASSWORD_${upper}:-}"
  if [ -z "$password" ]; then
    echo "init-databases: set POSTGRES_PASSWORD_${upper} (the password of ${prefix}${service})" >&2
    exit 1
  fi
  psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet "$@" \
    -v name="${prefix}${service}" -v password="$password" <<'SQL'
SELECT format('CREATE ROLE %I', :'name')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'name') \gexec
ALTER ROLE :"name" WITH LOGIN PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'name')
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'name') \gexec
ALTER DATABASE :"name" OWNER TO :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
\connect :"name"
-- What another user made in it (the superuser, before roles per service):
-- the role's. A table's own sequences and indexes follow the table.
SELECT format('ALTER TABLE %I.%I OWNER TO %I', schemaname, tablename, :'name')
  FROM pg_tables WHERE schemaname = 'public' AND tableowner <> :'name' \gexec
SELECT format('ALTER SEQUENCE %I.%I OWNER TO %I', schemaname, sequencename, :'name')
  FROM pg_sequences WHERE schemaname = 'public' AND sequenceowner <> :'name' \gexec
SELECT format('ALTER FUNCTION %s OWNER TO %I', p.oid::regprocedure, :'name')
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> :'name' \gexec
SQL
  echo "init-databases: role and database ${prefix}${service}"
done
