#!/usr/bin/env bash
# Gifts per second committed (issue 8): `weir loadtest gifts` against one
# `weir control` (release) on each business store, at several concurrencies,
# with the outbox relay running as in production (`--nats` to a local
# nats-server with JetStream; one replica, so it elects itself and relays):
#
#   postgres  `weir control --database postgres://…` on a PostgreSQL 15 the
#             script starts on loopback (initdb in a temp dir; durable
#             commits unless PG_SYNC=off: fsync and synchronous_commit on)
#   sqlite    `weir control` on its SQLite file (the single-machine default)
#
# Each case gets a fresh control plane and a fresh database. The load client
# opens N senders (each a user of its own, granted funds, holding a play
# token of its room) that send gifts with fresh idempotency keys for
# DURATION seconds; it reports committed gifts/s, send latency p50/p90/p99/
# p99.9, errors by gRPC code, how long the relay took to publish the
# backlog, and checks balances, ledgers and leaderboards against what it
# paid. The script samples the CPU time of the control plane, of PostgreSQL
# (the postmaster and its backends), of nats-server and of the load client
# over the sending phase, and the load average.
#
#   cargo build --release -p weir --bin weir
#   bench/run-gifts.sh [postgres|sqlite|all]
#
# Settings (environment): CONCURRENCY ("1 16 64": senders per case),
# DURATION (20 s of sending), ROOMS (1), CONNECTIONS (4 HTTP/2 connections),
# RETRY_RATIO (0: share of gifts re-sent with their key), PG_SYNC (on),
# CONTROL_BIN (another weir build for the control plane than for the load
# client, to compare a change of the server),
# OUT (JSON lines appended, bench/gifts-runs.jsonl), PERF_DIR (when set and
# `perf` is installed: `perf record -g` of the control plane over each
# case's sending phase, a text report per case there).
#
# Needs nats-server, PostgreSQL's server binaries (/usr/lib/postgresql/*/bin,
# or WEIR_PG_BIN), python3. Loopback ports 21400-21799 only.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
WEIR_SRC=${WEIR_BIN:-$TARGET_DIR/release/weir}
WHAT=${1:-all}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
DURATION=${DURATION:-20}
ROOMS=${ROOMS:-1}
CONNECTIONS=${CONNECTIONS:-4}
RETRY_RATIO=${RETRY_RATIO:-0}
PG_SYNC=${PG_SYNC:-on}
OUT=${OUT:-bench/gifts-runs.jsonl}
PERF_DIR=${PERF_DIR:-}
case $WHAT in postgres|sqlite|all) ;; *) echo "usage: $0 [postgres|sqlite|all]" >&2; exit 64 ;; esac
case $PG_SYNC in on|off) ;; *) echo "PG_SYNC must be on or off" >&2; exit 64 ;; esac
for t in nats-server python3; do
  command -v "$t" >/dev/null || { echo "missing $t (deploy/setup.sh --test)" >&2; exit 2; }
done
PG_BIN=${WEIR_PG_BIN:-}
if [ -z "$PG_BIN" ]; then
  for v in 15 16 17 14 13; do
    [ -x "/usr/lib/postgresql/$v/bin/postgres" ] && { PG_BIN=/usr/lib/postgresql/$v/bin; break; }
  done
fi
[ -n "$PG_BIN" ] || { echo "no PostgreSQL server binaries (deploy/setup.sh --test, or WEIR_PG_BIN)" >&2; exit 2; }
[ -x "$WEIR_SRC" ] || { echo "build first: cargo build --release -p weir --bin weir" >&2; exit 2; }
"$WEIR_SRC" loadtest gifts --help >/dev/null 2>&1 || { echo "$WEIR_SRC has no 'loadtest gifts'" >&2; exit 2; }
work=$(mktemp -d /tmp/weir-bench-gifts.XXXXXX)
chmod 755 "$work"
# A copy: the shared target dir's release/weir may be rebuilt meanwhile.
cp "$WEIR_SRC" "$work/weir"
WEIR=$work/weir
CONTROL=$WEIR
if [ -n "${CONTROL_BIN:-}" ]; then cp "$CONTROL_BIN" "$work/control-bin"; CONTROL=$work/control-bin; fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  stop_postgres
  rm -rf "$work"
}
trap cleanup EXIT
tck=$(getconf CLK_TCK)
# ticks, wait_http, stop
. bench/lib.sh

echo "machine: nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "postgres: $("$PG_BIN/postgres" --version) (fsync/synchronous_commit $PG_SYNC); nats-server: $(nats-server --version)"
echo "weir: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')${CONTROL_BIN:+; control plane: $CONTROL_BIN}"
echo "started $(date -u +%FT%TZ); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# nats-server with JetStream: the room bus the outbox relay publishes to.
mkdir -p "$work/js"
nats-server -a 127.0.0.1 -p 21422 -m 21522 -js -sd "$work/js" >"$work/nats.log" 2>&1 &
nats_pid=$!; pids+=("$nats_pid")
wait_http http://127.0.0.1:21522/healthz "$work/nats.log"

# PostgreSQL, started and stopped with pg_ctl (it refuses to run as root:
# then as the `postgres` user Debian's package creates), fast shutdown
# before its folder goes.
pg_up=""
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
stop_postgres() {
  [ -n "$pg_up" ] || return 0
  as_pg "$PG_BIN/pg_ctl" -D "$work/pg/data" -m fast -w stop >/dev/null 2>&1 || true
  pg_up=""
}
start_postgres() {
  if (exec 3<>/dev/tcp/127.0.0.1/21432) 2>/dev/null; then
    echo "something already listens on 127.0.0.1:21432" >&2; exit 1
  fi
  mkdir -p "$work/pg"
  [ "$(id -u)" = 0 ] && chown postgres: "$work/pg"
  as_pg "$PG_BIN/initdb" -D "$work/pg/data" -U weir --auth=trust -E UTF8 >"$work/initdb.log" 2>&1 \
    || { cat "$work/initdb.log" >&2; exit 1; }
  as_pg "$PG_BIN/pg_ctl" -D "$work/pg/data" -l "$work/pg/pg.log" -w -t 60 \
    -o "-p 21432 -k $work/pg -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=$PG_SYNC -c synchronous_commit=$PG_SYNC" \
    start >/dev/null || { tail -20 "$work/pg/pg.log" >&2; exit 1; }
  pg_up=1
}
# The postmaster and its children (backends, WAL writer, checkpointer, ...).
pg_pids() {
  local pm; pm=$(head -1 "$work/pg/data/postmaster.pid")
  echo "$pm" $(pgrep -P "$pm")
}

run_case() { # store senders
  local store=$1 senders=$2 name="$1-$2" database=() server_pids=()
  if [ "$store" = postgres ]; then
    "$PG_BIN/createdb" -h 127.0.0.1 -p 21432 -U weir "gifts_$senders"
    database=(--database "postgres://weir@127.0.0.1:21432/gifts_$senders")
  fi
  "$CONTROL" --log-format json control --grpc 127.0.0.1:21700 --data-dir "$work/control-$name" \
    "${database[@]}" --nats nats://127.0.0.1:21422 --allow-grants --allow-token-minting \
    >"$work/control-$name.out" 2>"$work/control-$name.log" &
  local cpid=$!; pids+=("$cpid")
  wait_http http://127.0.0.1:21700/readyz "$work/control-$name.log"
  server_pids=("$cpid" "$nats_pid")
  local load0; load0=$(cut -d' ' -f1 /proc/loadavg)
  : >"$work/lt.err"
  timeout $((DURATION + 300)) "$WEIR" --log-format json loadtest gifts --control http://127.0.0.1:21700 \
    --senders "$senders" --rooms "$ROOMS" --connections "$CONNECTIONS" --duration "$DURATION" \
    --retry-ratio "$RETRY_RATIO" --json >"$work/lt.json" 2>"$work/lt.err" &
  local lt=$! ltc=""
  # CPU over the sending phase: from 1 s after "sending" for DURATION-2 s.
  local s0=0 p0=0 c0=0 s1=0 p1=0 c1=0 window=$((DURATION - 2)) sampled=0
  for _ in $(seq 3000); do grep -q sending "$work/lt.err" && break; kill -0 "$lt" 2>/dev/null || break; sleep 0.1; done
  if grep -q sending "$work/lt.err"; then
    ltc=$(pgrep -P "$lt" | head -1)   # weir under `timeout`
    sleep 1
    local pgs=""; [ "$store" = postgres ] && pgs=$(pg_pids)
    s0=$(ticks "${server_pids[@]}"); c0=$(ticks "$ltc"); p0=$(ticks $pgs)
    if [ -n "$PERF_DIR" ] && command -v perf >/dev/null; then
      mkdir -p "$PERF_DIR"
      perf record -F 249 -g -p "$cpid" -o "$work/perf-$name.data" -- sleep $((window - 1)) >/dev/null 2>&1 &
    fi
    sleep "$window"
    s1=$(ticks "${server_pids[@]}"); c1=$(ticks "$ltc"); p1=$(ticks $pgs)
    sampled=1
  fi
  local load1; load1=$(cut -d' ' -f1 /proc/loadavg)
  wait "$lt" || true
  if [ -n "$PERF_DIR" ] && [ -f "$work/perf-$name.data" ]; then
    sleep 1
    perf report -i "$work/perf-$name.data" --stdio --no-children --percent-limit 0.5 \
      >"$PERF_DIR/$name.txt" 2>/dev/null || true
  fi
  stop "$cpid"
  python3 - "$work/lt.json" "$name" "$store" "$s0" "$s1" "$p0" "$p1" "$c0" "$c1" "$tck" "$window" \
    "$sampled" "$load0" "$load1" "$PG_SYNC" "$OUT" "$work/rows" "$work/lt.err" <<'PY'
import json, sys, time
(path, name, store, s0, s1, p0, p1, c0, c1, tck, window, sampled, load0, load1, pg_sync, out, rows,
 err) = sys.argv[1:19]
try:
    r = json.load(open(path))
except Exception as e:
    r = {"error": f"no report: {e}: {open(err).read()[-500:]}"}
w = float(window) * float(tck)
if sampled == "1" and w > 0:
    r["server_cpu_pct"] = round(100 * (int(s1) - int(s0)) / w)
    r["postgres_cpu_pct"] = round(100 * (int(p1) - int(p0)) / w) if store == "postgres" else None
    r["client_cpu_pct"] = round(100 * (int(c1) - int(c0)) / w)
r.update(case=name, store=store, pg_sync=pg_sync if store == "postgres" else None,
         load_before=float(load0), load_during=float(load1),
         at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
line = json.dumps(r)
open(out, "a").write(line + "\n")
open(rows, "a").write(line + "\n")
print(f"  {name}: {r.get('committed_per_s', 0):.0f} gifts/s", file=sys.stderr)
PY
  sleep 2
}

table() {
  python3 - "$work/rows" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def p(d, k):
    return "-" if not d or k not in d else f"{d[k]:.2f}"
print("| store | senders | gifts/s committed | committed | latency p50 / p90 / p99 / p99.9 ms | max ms | errors | outbox drained after | verify | control CPU (+ nats) | postgres CPU | client CPU | load |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "committed" not in r:
        print(f"| {r['store']} | {r['case']} | {r.get('error')} |"); continue
    lat = r.get("latency_ms")
    errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
    o = r["outbox"]
    drained = f"{o['drained_ms']} ms" if o.get("drained_ms") is not None else f"no ({o.get('pending_after_wait')} left)"
    v = r.get("verify") or {}
    ver = "ok" if v.get("consistent") else ("-" if not v else "MISMATCH")
    pg = r.get("postgres_cpu_pct")
    print(f"| {r['store']} | {r['senders']} | {r['committed_per_s']:.0f} | {r['committed']} | "
          f"{p(lat,'p50')} / {p(lat,'p90')} / {p(lat,'p99')} / {p(lat,'p999')} | {p(lat,'max')} | {errs} | "
          f"{drained} | {ver} | {r.get('server_cpu_pct','-')} % | {'-' if pg is None else f'{pg} %'} | "
          f"{r.get('client_cpu_pct','-')} % | {r['load_before']:.1f} → {r['load_during']:.1f} |")
PY
}

for store in postgres sqlite; do
  [ "$WHAT" = all ] || [ "$WHAT" = "$store" ] || continue
  if [ "$store" = postgres ]; then start_postgres; fi
  for n in $CONCURRENCY; do run_case "$store" "$n"; done
  if [ "$store" = postgres ]; then stop_postgres; fi
done
echo
table
echo
echo "finished $(date -u +%FT%TZ); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
