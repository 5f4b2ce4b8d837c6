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
# - PostgreSQL: uses $SKEIN_TEST_POSTGRES_URL, else a server on 127.0.0.1:5432 that psql
#   reaches as user postgres without a password (TLS on as Debian sets it up), else starts a
#   throw-away cluster with initdb in a temporary directory (installing Debian's postgresql
#   package if there are no server binaries), stopped and removed on exit, also when the run
#   is interrupted (one left by a run that was killed is removed by the next).
#   SKEIN_TEST_POSTGRES_TEMP=1 forces the throw-away cluster.
#
# The tests get no NATS_* or SKEIN_* setting of the caller's environment
# (credentials, replicas, retentions would change what they test), nor
# DATABASE_URL; SKEIN_BLESS_SCHEMAS is honoured with `--` only.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

only_tests=0
if [ "${1:-}" = "--" ]; then
  only_tests=1
  shift
fi

log() { printf '==> %s\n' "$*" >&2; }

# --- The caller's environment ----------------------------------------------
# Kept: what this script and the test harness read themselves.
for var in ${!NATS_@} ${!SKEIN_@} DATABASE_URL; do
  case "$var" in
    SKEIN_TEST_POSTGRES_URL|SKEIN_TEST_POSTGRES_TEMP|SKEIN_TEST_KEEP_DB|SKEIN_TEST_SEED) ;;
    SKEIN_NATS_SERVER|SKEIN_NATS_VERSION|SKEIN_TOOLS_DIR) ;;
    SKEIN_BLESS_SCHEMAS) [ "$only_tests" -eq 1 ] || unset "$var" ;;
    *) unset "$var" ;;
  esac
done

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
pg_as=""
child=""
cleanup() {
  if [ -n "$pg_tmp" ]; then
    log "stopping the temporary PostgreSQL"
    $pg_as "$pg_bin/pg_ctl" -D "$pg_tmp/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$pg_tmp"
  fi
}
trap cleanup EXIT
# Interrupted (Ctrl-C, CI cancelling): the step running stops first, all of
# it (cargo, nextest, the tests: this script's process group; a background
# step ignores Ctrl-C itself), then the cluster (bash would run the EXIT
# trap at once, under a step still running).
interrupted() {
  trap '' INT TERM HUP
  if [ -n "$child" ]; then
    kill -TERM 0 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM
trap 'interrupted 129' HUP
# Runs a step in the background and waits for it, so that a signal reaches
# `interrupted` while it runs.
step() {
  "$@" &
  child=$!
  local status=0
  wait "$child" || status=$?
  child=""
  return "$status"
}

pg_answers() {
  # $1: URL. Only psql can tell a server this user reaches without a
  # password from any other that listens.
  command -v psql >/dev/null 2>&1 && psql "$1" -Atqc 'SELECT 1' >/dev/null 2>&1
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

# A run as "pid start-time" (the start time tells a reused pid apart).
run_id() { # pid
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  echo "$1 $(echo "${stat##*)}" | awk '{print $20}')"
}
# Throw-away clusters of runs that were killed (their run is gone): stopped
# as the user that owns them, removed once stopped.
for dir in /tmp/skein-pg.*; do
  [ -f "$dir/owner" ] || continue
  owner="$(cat "$dir/owner" 2>/dev/null || true)"
  [ -n "$owner" ] || continue
  [ "$(run_id "${owner%% *}" || true)" = "$owner" ] && continue
  bin="$(find_pg_bin 2>/dev/null)" || continue
  as=""
  user="$(stat -c %U "$dir/data" 2>/dev/null || echo root)"
  [ "$(id -u)" -eq 0 ] && [ "$user" != root ] && as="runuser -u $user --"
  log "removing the temporary PostgreSQL of a run that was killed ($dir)"
  $as "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  # pg_ctl status: 3 when no server runs there.
  status=0
  $as "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1 || status=$?
  if [ "$status" -eq 3 ] || [ ! -d "$dir/data" ]; then
    rm -rf "$dir"
  else
    log "cannot stop the server of $dir; left in place"
  fi
done

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
    run_id "$$" > "$pg_tmp/owner"
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
  step cargo nextest run "$@"
  exit 0
fi

log "cargo fmt --check"
step cargo fmt --all -- --check
log "cargo clippy (warnings denied)"
step cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo doc (warnings denied)"
step env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
log "doc tests"
step cargo test --workspace --doc --locked --quiet
log "tests (nextest), SQLite and PostgreSQL"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
step cargo nextest run --workspace --locked --profile "$profile"
