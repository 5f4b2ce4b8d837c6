#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs or starts what is
# missing, then runs formatting, lints, docs and every test on SQLite and
# PostgreSQL.
#
#   scripts/test.sh            everything (what CI runs)
#   scripts/test.sh -- ARGS    only `cargo nextest run ARGS` (services still set up;
#                              no ARGS: --workspace)
#
# What it provides when missing:
# - nats-server >= 2.10: nats/find-nats-server.sh (PATH, .tools/bin, or installs it)
# - cargo-nextest: cargo install
# - PostgreSQL: uses $SKEIN_TEST_POSTGRES_URL (or a postgres $DATABASE_URL), else a server on 127.0.0.1:5432
#   (user postgres, trust auth, TLS on as Debian sets it up), else starts a throw-away cluster with initdb
#   in a temporary directory (installing Debian's postgresql package if there
#   are no server binaries), stopped and removed on exit. SKEIN_TEST_POSTGRES_TEMP=1
#   forces the throw-away cluster.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

only_tests=0
if [ "${1:-}" = "--" ]; then
  only_tests=1
  shift
fi

log() { printf '==> %s\n' "$*" >&2; }

# --- Rust tools -------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# --- NATS -------------------------------------------------------------------
SKEIN_NATS_SERVER="$("$root/nats/find-nats-server.sh")"
export SKEIN_NATS_SERVER
log "nats-server: $SKEIN_NATS_SERVER ($("$SKEIN_NATS_SERVER" --version))"

# --- PostgreSQL -------------------------------------------------------------
pg_tmp=""
cleanup() {
  if [ -n "$pg_tmp" ]; then
    log "stopping the temporary PostgreSQL"
    $pg_as "$pg_bin/pg_ctl" -D "$pg_tmp/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$pg_tmp"
  fi
}
trap cleanup EXIT

pg_answers() {
  # $1: URL. Uses psql when present, else a bash TCP probe.
  if command -v psql >/dev/null 2>&1; then
    psql "$1" -Atqc 'SELECT 1' >/dev/null 2>&1
  else
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

find_pg_bin() {
  local d
  for d in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")" /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}

case "${DATABASE_URL:-}" in
  postgres://*|postgresql://*) : "${SKEIN_TEST_POSTGRES_URL:=$DATABASE_URL}" ;;
esac
if [ -z "${SKEIN_TEST_POSTGRES_URL:-}" ]; then
  local_url="postgres://postgres@127.0.0.1:5432/postgres"
  if [ "${SKEIN_TEST_POSTGRES_TEMP:-}" != "1" ] && pg_answers "$local_url"; then
    export SKEIN_TEST_POSTGRES_URL="$local_url"
  else
    if ! pg_bin="$(find_pg_bin)"; then
      log "installing PostgreSQL server binaries (Debian package postgresql)"
      if [ "$(id -u)" -ne 0 ]; then
        echo "error: no PostgreSQL server binaries and not root to install them;" >&2
        echo "       install postgresql, or set SKEIN_TEST_POSTGRES_URL to a server where the user may create databases" >&2
        exit 1
      fi
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
      pg_bin="$(find_pg_bin)" || { echo "error: postgresql installed but initdb not found" >&2; exit 1; }
    fi
    pg_tmp="$(mktemp -d /tmp/skein-pg.XXXXXX)"
    pg_as=""
    if [ "$(id -u)" -eq 0 ]; then
      # initdb refuses to run as root.
      id skein-pg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin skein-pg
      chown skein-pg "$pg_tmp"
      pg_as="runuser -u skein-pg --"
    fi
    pg_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    log "starting a temporary PostgreSQL on 127.0.0.1:$pg_port ($pg_bin)"
    $pg_as "$pg_bin/initdb" -D "$pg_tmp/data" -U postgres --auth=trust -E UTF8 >/dev/null
    # TLS as Debian's own server has it (a test connects with
    # sslmode=require): a throw-away self-signed certificate.
    command -v openssl >/dev/null || { echo "error: openssl is needed for the temporary PostgreSQL's TLS certificate; install it (Debian: openssl)" >&2; exit 1; }
    $pg_as openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
      -keyout "$pg_tmp/data/server.key" -out "$pg_tmp/data/server.crt" >/dev/null 2>&1
    $pg_as chmod 600 "$pg_tmp/data/server.key"
    $pg_as "$pg_bin/pg_ctl" -D "$pg_tmp/data" -l "$pg_tmp/log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_tmp -c fsync=off -c max_connections=300 -c ssl=on" start >/dev/null
    export SKEIN_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
  fi
fi
log "PostgreSQL: $SKEIN_TEST_POSTGRES_URL"

# --- Checks and tests -------------------------------------------------------
if [ "$only_tests" -eq 1 ]; then
  # With no arguments, every package; with some (-p NAME, a filter ...),
  # exactly what they select.
  [ "$#" -eq 0 ] && set -- --workspace
  cargo nextest run "$@"
  exit 0
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
log "doc tests"
cargo test --workspace --doc --locked --quiet
log "tests (nextest), SQLite and PostgreSQL"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --locked --profile "$profile"
