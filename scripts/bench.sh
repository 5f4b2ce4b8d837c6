#!/usr/bin/env bash
# End-to-end benchmarks of skein, one command:
#
#   scripts/bench.sh                     SQLite and PostgreSQL, 1, 2 and 4 copies
#   scripts/bench.sh sqlite              one backend
#   ORDERS=3000 COPIES="1 2" scripts/bench.sh postgres
#
# For each backend and number of copies it starts a fresh nats-server (its
# own store, a free port), every worker as its own `skein worker` process
# (COPIES copies of each, sharing their consumer groups) and one `skein
# ingress`, then runs `skein load`: once as fast as CONCURRENCY orders in
# flight allow (the maximum rate), once open-loop at half that rate, and
# once at a low rate (LOW_RATE orders/s, LOW_ORDERS orders: the latency of
# a system with time to spare, where a wake-up that comes late shows). Then the
# floor under it on the same machine: raw JetStream publishing and
# saga-shaped message chains with no service work (the skein-bus `floor`
# example), database commits, the relay and one consumer through the inbox
# (the skein-outbox `throughput` example), and the resident memory of `skein
# up` idle and under load. Everything is built with --release first. Prints one Markdown table;
# the raw `skein load --json` reports are kept in $OUT (default
# target/bench).
#
# PostgreSQL: $SKEIN_TEST_POSTGRES_URL, else postgres://postgres@127.0.0.1:5432/postgres
# (each run creates databases skein_bench_<run>_<service> on that server,
# keeping its query string such as ?sslmode=require, and drops them
# afterwards, also when the run fails). When a step fails, the components'
# logs are kept and their directory named.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

backends="${*:-sqlite postgres}"
ORDERS="${ORDERS:-2000}"
CONCURRENCY="${CONCURRENCY:-64}"
CUSTOMERS="${CUSTOMERS:-64}"
COPIES="${COPIES:-1 2 4}"
LOW_RATE="${LOW_RATE:-20}"
LOW_ORDERS="${LOW_ORDERS:-400}"
OUT="${OUT:-$root/target/bench}"
PG_ADMIN="${SKEIN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# The server part and the query string of PG_ADMIN, to name other databases
# on the same server the same way.
pg_base="${PG_ADMIN%%\?*}"
pg_query=""
[ "$pg_base" != "$PG_ADMIN" ] && pg_query="?${PG_ADMIN#*\?}"
# Loopback, as the figures in docs/benchmarks.md were taken: no TLS (the
# default, prefer, encrypts when the server offers it, as Debian's does),
# unless PG_ADMIN names an sslmode.
case "$pg_query" in
  *sslmode=*) ;;
  "") pg_query="?sslmode=disable" ;;
  *) pg_query="$pg_query&sslmode=disable" ;;
esac
case "${pg_base#*://}" in
  */*) pg_server="${pg_base%/*}" ;;
  *) pg_server="$pg_base" ;;
esac
WORKERS="identity catalog payments orders orchestrator projector"
ADMIN_EMAIL="admin@bench.skein.test"
ADMIN_PASSWORD="the benchmark admin's password"
export SKEIN_ADMIN_EMAIL="$ADMIN_EMAIL" SKEIN_ADMIN_PASSWORD="$ADMIN_PASSWORD" SKEIN_LOG=warn

log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# One field of a report (a.b for nested ones); fails when it is missing.
field() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); v=r
for k in sys.argv[2].split("."): v=v[k]
print(v if not isinstance(v,float) else f"{v:.1f}")' "$1" "$2"; }
# The fields of a report joined as table cells, in one command (so that
# `set -e` sees it fail on a missing field); machine_cpu.* is "-" where the
# report has none (not Linux).
cells() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); out=[]
for path in sys.argv[2:]:
    v=r
    for k in path.split("."):
        if k not in v and path.startswith("machine_cpu."): v="-"; break
        v=v[k]
    out.append(v if not isinstance(v,float) else f"{v:.1f}")
print(" | ".join(str(x) for x in out))' "$@"; }

mkdir -p "$OUT"
# This run's reports only: none of an earlier run's backends or copies
# (the names it writes, nothing else of $OUT).
rm -f "$OUT"/sqlite-*.json "$OUT"/postgres-*.json "$OUT"/up-memory.json
: > "$OUT/cpu.txt"
log "building (release)"
cargo build --release --locked -q -p skein-cli
cargo build --release --locked -q -p skein-bus --example floor
cargo build --release --locked -q -p skein-outbox --example throughput
skein="$root/target/release/skein"
nats_bin="$("$root/nats/find-nats-server.sh")"

pids=()
work=""
pg_prefix=""

# Drops the databases of the PostgreSQL run in progress, if any.
drop_databases() {
  [ -n "$pg_prefix" ] || return 0
  python3 - "$PG_ADMIN" "$pg_prefix" <<'EOF' || log "could not drop the benchmark databases ${pg_prefix}*"
import subprocess, sys
admin, prefix = sys.argv[1], sys.argv[2]
names = subprocess.run(["psql", admin, "-Atc", f"SELECT datname FROM pg_database WHERE datname LIKE '{prefix}%'"],
                       capture_output=True, text=True, check=True).stdout.split()
for n in names:
    subprocess.run(["psql", admin, "-qc", f'DROP DATABASE "{n}" WITH (FORCE)'], check=True)
EOF
  pg_prefix=""
}

cleanup() {
  local status=$?
  stop_all
  drop_databases
  if [ -n "$work" ]; then
    if [ "$status" -eq 0 ]; then
      rm -rf "$work"
    else
      log "failed; the components' logs are kept in $work"
    fi
  fi
}
trap cleanup EXIT

# Stops every component: SIGTERM, 30 s to finish, then SIGKILL (a
# component stuck in its shutdown must not hang the benchmark).
stop_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 300); do
    local alive=0
    for pid in ${pids[@]+"${pids[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    kill -0 "$pid" 2>/dev/null && { log "process $pid did not stop in 30 s; killing it"; kill -9 "$pid" 2>/dev/null || true; }
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}

start_nats() {
  nats_port="$(free_port)"
  "$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$work/nats" -l "$work/nats.log" &
  pids+=($!)
  export NATS_URL="nats://127.0.0.1:$nats_port"
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && return 0; sleep 0.1; done
  echo "error: nats-server did not start" >&2; exit 1
}

wait_http() {
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "error: nothing listens on $1 (logs in $work)" >&2; exit 1
}

# Waits until every worker answers its NATS ping: the ingress's /health
# checks exactly that (and lag, backlog, breakers).
wait_healthy() {
  for _ in $(seq 300); do
    code="$(python3 - "$1" <<'EOF'
import sys, urllib.request
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2).status)
except Exception as e:
    print(getattr(e, "code", 0))
EOF
)"
    [ "$code" = 200 ] && return 0
    sleep 0.2
  done
  echo "error: the system did not become healthy (logs in $work)" >&2; exit 1
}

load() { # name, extra args...
  local name="$1"; shift
  "$skein" load --url "http://127.0.0.1:$http_port" --orders "$ORDERS" --concurrency "$CONCURRENCY" \
    --customers "$CUSTOMERS" --settle-timeout 300 --json "$@" > "$OUT/$name.json" || {
      echo "error: skein load failed (its messages above; its report, if it got that far, in $OUT/$name.json; the components' logs in $work)" >&2; exit 1; }
}

rows=()
for backend in $backends; do
  for copies in $COPIES; do
    run="$(date +%s)_$$"
    work="$(mktemp -d /tmp/skein-bench.XXXXXX)"
    case "$backend" in
      sqlite) db="sqlite:$work/{service}.db" ;;
      postgres)
        pg_prefix="skein_bench_${run}_"
        db="$pg_server/${pg_prefix}{service}$pg_query"
        ;;
      *) echo "error: unknown backend $backend (sqlite or postgres)" >&2; exit 1 ;;
    esac
    log "$backend, $copies cop(y/ies) of each worker"
    start_nats
    export DATABASE_URL="$db" SKEIN_KEY_DIR="$work"
    unset SKEIN_DATABASE_POOL
    if [ "$backend" = postgres ]; then
      # Every copy has its own pool, and each worker database takes up to 3
      # connections outside the pools: the active relay's advisory-lock
      # connection and its LISTEN connection, and a standby copy's relay
      # trying the lock. 6 workers x (copies x pool + 3) must stay under
      # PostgreSQL's default max_connections (100): 90 while copies <= 12.
      pool=$(( 12 / copies )); [ "$pool" -ge 1 ] || pool=1
      export SKEIN_DATABASE_POOL="$pool"
      budget=$(( 6 * (copies * pool + 3) ))
      [ "$budget" -le 95 ] || log "warning: up to $budget connections to PostgreSQL; its max_connections must allow them"
    fi
    for worker in $WORKERS; do
      for c in $(seq "$copies"); do
        "$skein" worker "$worker" 2>>"$work/$worker-$c.log" &
        pids+=($!)
      done
    done
    http_port="$(free_port)"
    "$skein" ingress --http "127.0.0.1:$http_port" --rate-limit 1000000 --rate-burst 1000000 \
      --login-rate-limit 10000 --login-rate-burst 10000 2>>"$work/ingress.log" &
    pids+=($!)
    wait_http "$http_port"
    wait_healthy "$http_port"
    name="$backend-$copies"
    load "$name-max"
    # Where the cycles went during the maximum-rate run (CPU seconds per
    # process since it started; the set-up counts too, above all the identity
    # worker hashing the customers' passwords).
    {
      echo "CPU seconds per process, $backend, $copies cop(y/ies), after the maximum-rate run:"
      for pid in ${pids[@]+"${pids[@]}"}; do
        [ -r "/proc/$pid/stat" ] || continue
        # utime + stime, in clock ticks (1/100 s), from /proc/<pid>/stat.
        ticks="$(cut -d')' -f2- "/proc/$pid/stat" | awk '{print $12 + $13}')"
        printf '  %7.2fs %s\n' "$(awk -v t="$ticks" 'BEGIN {print t / 100}')" "$(tr '\0' ' ' < "/proc/$pid/cmdline")"
      done
    } | tee -a "$OUT/cpu.txt" >&2
    max="$(field "$OUT/$name-max.json" throughput)"
    half="$(python3 -c "print(round($max / 2, 1))")"
    load "$name-half" --rate "$half"
    ORDERS="$LOW_ORDERS" load "$name-low" --rate "$LOW_RATE"
    for r in max half low; do
      f="$OUT/$name-$r.json"
      offered=""
      [ "$r" = half ] && offered=", $half/s offered"
      [ "$r" = low ] && offered=", $LOW_RATE/s offered"
      inflight="$(field "$f" concurrency)"
      measured="$(cells "$f" throughput latency_ms.p50 latency_ms.p99 machine_cpu.busy_percent machine_cpu.cpu_ms_per_order ok)"
      rows+=("| $backend | $copies | $r ($inflight in flight$offered) | $measured |")
    done
    stop_all
    drop_databases
    rm -rf "$work"; work=""
  done
done

echo
# machine busy, CPU ms/order: the whole machine (every process) while the
# orders were placed, as skein load reads it from /proc/stat.
echo "| backend | copies | rate | sagas/s | p50 ms | p99 ms | machine busy % | CPU ms/order | invariants |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"

# --- The floor, same machine --------------------------------------------------
work="$(mktemp -d /tmp/skein-bench.XXXXXX)"
start_nats
echo
log "floor: raw JetStream publishing, saga-shaped chains"
"$root/target/release/examples/floor" --nats-url "$NATS_URL" --messages 100000
stop_all
for backend in $backends; do
  log "floor: $backend commits and one consumer through the inbox"
  SKEIN_NATS_SERVER="$nats_bin" SKEIN_TEST_POSTGRES_URL="$pg_base$pg_query" \
    "$root/target/release/examples/throughput" "$backend" 50000
done

# --- Memory of skein up -----------------------------------------------------------
log "memory: skein up idle and under load"
http_port="$(free_port)"
env -u NATS_URL -u DATABASE_URL -u SKEIN_KEY_DIR -u SKEIN_DATABASE_POOL "$skein" up --data-dir "$work/up" --http "127.0.0.1:$http_port" --nats-port "$(free_port)" --no-demo \
  --rate-limit 1000000 --rate-burst 1000000 --login-rate-limit 10000 --login-rate-burst 10000 \
  > "$work/up.log" 2>&1 &
up_pid=$!
pids+=($up_pid)
wait_http "$http_port"
wait_healthy "$http_port"
sleep 5
idle="$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$up_pid/status")"
NATS_URL="$(sed -n 's/.*NATS at \(nats:[^ ]*\).*/\1/p' "$work/up.log")" load up-memory
peak="$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$up_pid/status")"
echo
echo "skein up resident memory (nats-server not included): idle ${idle} MB, peak under load ${peak} MB ($(field "$OUT/up-memory.json" throughput) sagas/s)"
