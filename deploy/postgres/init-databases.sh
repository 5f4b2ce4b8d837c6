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
CREATE ROLE :"name" LOGIN PASSWORD :'password';
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
  echo "init-databases: role and database ${prefix}${service}"
done
