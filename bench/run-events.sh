#!/usr/bin/env bash
# Room events fan-out (issue 8), all in one run on this machine, each case
# three times side by side with the same subscribers, rooms and danmaku rate:
#
#   weir-local  `weir dev` (release): the in-process room bus.
#   weir-js     `weir control --allow-token-minting` + `weir node --nats`:
#               the JetStream room bus on a local nats-server.
#   nats-ws     nats-server's own WebSocket listener (the same nats-server
#               process, plain NATS core pub/sub, one subject per room): the
#               peer a room events service is measured against.
#
# `weir loadtest events` opens the WebSocket subscribers (the first ones also
# send the danmaku, each carrying its send time, so delivery latency is
# receive time minus send time on one clock) and reports deliveries/s,
# delivery latency p50/p99/p99.9, gaps, skipped events and disconnects; with
# --reconnect the non-chatting subscribers all drop while danmaku flow, come
# back at once with since=&epoch= and it reports the time until all caught up.
# The script samples the CPU time of the server processes and of the load
# client over the sending phase, and the load average.
#
#   cargo build --release -p weir --bin weir
#   bench/run-events.sh [one-room|many-rooms|reconnect|all]
#
# Settings (environment): ONE_SUBS (10000), MANY_ROOMS (1000), MANY_SUBS
# (subscribers in all, 19000: see below), RC_SUBS (10000), RC_ROOMS (100),
# RATE (200 danmaku/s), DURATION (20 s of sending), DRAIN (5 s more to
# count deliveries), CONCURRENCY (1000 connects in flight),
# RC_CONCURRENCY (RC_SUBS: every reconnect at once), RC_AT (8 s),
# RC_AWAY_MS (2000), TARGETS ("weir-local weir-js nats-ws"), WEIR_NODE_BIN
# (another weir build for the servers than for the load client), OUT (JSON
# lines appended, bench/events-runs.jsonl), PROFILE_DIR (when set, a CPU flamegraph of the
# node over each weir case's sending phase, from /debug/pprof/profile).
#
# File descriptors: every WebSocket is one fd in the client and one in the
# server; the hard limit here is `ulimit -Hn` (20000, and raising it is not
# permitted in this container), so one server process cannot hold 20,000
# clients: 1,000 rooms of 20 run as 1,000 rooms of 19 (19,000 sockets).
#
# Needs nats-server 2.9+, curl, python3. Loopback ports 21000-21901 only:
# below the ephemeral range (32768-60999), where the load client's own
# sockets would sometimes hold a server's port when the next case starts.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
WEIR_SRC=${WEIR_BIN:-$TARGET_DIR/release/weir}
WHAT=${1:-all}
RATE=${RATE:-200}
DURATION=${DURATION:-20}
DRAIN=${DRAIN:-5}
ONE_SUBS=${ONE_SUBS:-10000}
MANY_ROOMS=${MANY_ROOMS:-1000}
MANY_SUBS=${MANY_SUBS:-19000}
RC_SUBS=${RC_SUBS:-10000}
RC_ROOMS=${RC_ROOMS:-100}
RC_AT=${RC_AT:-8}
RC_AWAY_MS=${RC_AWAY_MS:-2000}
CONCURRENCY=${CONCURRENCY:-1000}
RC_CONCURRENCY=${RC_CONCURRENCY:-$RC_SUBS}   # reconnects in flight at once: all
TARGETS=${TARGETS:-"weir-local weir-js nats-ws"}
OUT=${OUT:-bench/events-runs.jsonl}
PROFILE_DIR=${PROFILE_DIR:-}   # set: a flamegraph of the node per weir case
for t in nats-server curl python3; do
  command -v "$t" >/dev/null || { echo "missing $t (deploy/setup.sh --test)" >&2; exit 2; }
done
[ -x "$WEIR_SRC" ] || { echo "build first: cargo build --release -p weir --bin weir" >&2; exit 2; }
"$WEIR_SRC" loadtest events --help >/dev/null 2>&1 || { echo "$WEIR_SRC has no 'loadtest events'" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d /tmp/weir-bench-events.XXXXXX)
# A copy: the shared target dir's release/weir may be rebuilt meanwhile.
cp "$WEIR_SRC" "$work/weir"
WEIR=$work/weir
# The servers may run another build (WEIR_NODE_BIN) than the load client.
NODE=$WEIR
if [ -n "${WEIR_NODE_BIN:-}" ]; then cp "$WEIR_NODE_BIN" "$work/node-bin"; NODE=$work/node-bin; fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
tck=$(getconf CLK_TCK)
# ticks, wait_http, stop
. bench/lib.sh

echo "machine: nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r), ulimit -n $(ulimit -n)"
echo "nats-server: $(nats-server --version); weir: $(git rev-parse --short HEAD)"
echo "started $(date -u +%FT%TZ); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# One nats-server for the JetStream bus and the WebSocket peer (never both
# at once: the cases run one after the other).
start_nats() {
  mkdir -p "$work/js"
  cat >"$work/nats.conf" <<EOF
server_name: weirbench
host: 127.0.0.1
port: 21222
http_port: 21822
jetstream {
  store_dir: "$work/js"
}
websocket {
  listen: "127.0.0.1:21223"
  no_tls: true
}
EOF
  nats-server -c "$work/nats.conf" >"$work/nats.log" 2>&1 &
  nats_pid=$!
  pids+=("$nats_pid")
  wait_http "http://127.0.0.1:21822/healthz"
}

# Runs one case on one target; appends its JSON (with CPU and load) to $OUT
# and to $work/rows.
run_case() { # name target subs rooms [extra loadtest flags...]
  local name=$1 target=$2 subs=$3 rooms=$4; shift 4
  local server_pids=() url control="" load0
  case $target in
    weir-local)
      "$NODE" --log-format json dev --http 127.0.0.1:21080 --grpc 127.0.0.1:21000 --udp 127.0.0.1:21100 \
        --srt 127.0.0.1:21900 --shards 1 --hls-segment 0 --snapshot-interval 0 --ladder off \
        --data-dir "$work/dev-$name" >"$work/dev.out" 2>"$work/dev-$name.log" &
      server_pids=($!); pids+=("$!")
      wait_http http://127.0.0.1:21080/readyz "$work/dev-$name.log"
      url=http://127.0.0.1:21080 control=http://127.0.0.1:21000 ;;
    weir-js)
      "$NODE" --log-format json control --allow-token-minting --grpc 127.0.0.1:21001 \
        --data-dir "$work/control-$name" >"$work/control-$name.out" 2>"$work/control-$name.log" &
      local cpid=$!; pids+=("$cpid")
      # A file of its own per case: an older one could be read before
      # this process has truncated it.
      for _ in $(seq 300); do grep -q "token public key" "$work/control-$name.out" 2>/dev/null && break; sleep 0.1; done
      local key; key=$(awk '/token public key/ {print $NF}' "$work/control-$name.out")
      "$NODE" --log-format json node --nats nats://127.0.0.1:21222 --token-public-key "$key" \
        --http 127.0.0.1:21081 --udp 127.0.0.1:21200 --srt 127.0.0.1:21901 --shards 1 --hls-segment 0 \
        --snapshot-interval 0 --ladder off --data-dir "$work/node-$name" \
        >"$work/node.out" 2>"$work/node-$name.log" &
      local npid=$!; pids+=("$npid")
      wait_http http://127.0.0.1:21081/readyz "$work/node-$name.log"
      server_pids=("$npid" "$nats_pid")
      url=http://127.0.0.1:21081 control=http://127.0.0.1:21001 ;;
    nats-ws)
      server_pids=("$nats_pid")
      url=ws://127.0.0.1:21223 ;;
  esac
  local t=weir; [ "$target" = nats-ws ] && t=nats-ws
  load0=$(cut -d' ' -f1 /proc/loadavg)
  : >"$work/lt.err"
  timeout $((DURATION + DRAIN + 300)) "$WEIR" --log-format json loadtest events --target "$t" --url "$url" \
    ${control:+--control "$control"} --room "$name" --rooms "$rooms" --subscribers "$subs" --rate "$RATE" \
    --duration "$DURATION" --drain "$DRAIN" --json "$@" \
    >"$work/lt.json" 2>"$work/lt.err" &
  local lt=$! ltc=""
  # CPU over the sending phase: from 1 s after "sending" for DURATION-2 s.
  local s0=0 c0=0 s1=0 c1=0 window=$((DURATION - 2)) sampled=0
  for _ in $(seq 3000); do grep -q sending "$work/lt.err" && break; kill -0 "$lt" 2>/dev/null || break; sleep 0.1; done
  if grep -q sending "$work/lt.err"; then
    ltc=$(pgrep -P "$lt" | head -1)   # weir under `timeout`
    sleep 1
    s0=$(ticks "${server_pids[@]}"); c0=$(ticks "$ltc")
    if [ -n "$PROFILE_DIR" ] && [ "$target" != nats-ws ]; then
      mkdir -p "$PROFILE_DIR"
      curl -s "$url/debug/pprof/profile?seconds=$((window - 1))" -o "$PROFILE_DIR/$name-$target.svg" &
    fi
    sleep "$window"
    s1=$(ticks "${server_pids[@]}"); c1=$(ticks "$ltc")
    sampled=1
  fi
  local load1; load1=$(cut -d' ' -f1 /proc/loadavg)
  wait "$lt" || true
  local connected; connected=$(grep -m1 sending "$work/lt.err" || tail -1 "$work/lt.err")
  case $target in
    weir-local) stop "${server_pids[0]}" ;;
    weir-js) stop "${server_pids[0]}" "$cpid" ;;
  esac
  python3 - "$work/lt.json" "$name" "$target" "$s0" "$s1" "$c0" "$c1" "$tck" "$window" "$sampled" \
    "$load0" "$load1" "$connected" "$OUT" "$work/rows" <<'PY'
import json, sys, time
(path, name, target, s0, s1, c0, c1, tck, window, sampled, load0, load1, connected, out, rows) = sys.argv[1:16]
try:
    r = json.load(open(path))
except Exception as e:
    r = {"error": f"no report: {e}"}
w = float(window) * float(tck)
if sampled == "1" and w > 0:
    r["server_cpu_pct"] = round(100 * (int(s1) - int(s0)) / w)
    r["client_cpu_pct"] = round(100 * (int(c1) - int(c0)) / w)
r.update(case=name, side=target, load_before=float(load0), load_during=float(load1),
         connect_phase=connected, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
line = json.dumps(r)
open(out, "a").write(line + "\n")
open(rows, "a").write(line + "\n")
print(f"  {name} {target}: {connected}", file=sys.stderr)
PY
  sleep 2
}

table() {
  python3 - "$work/rows" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def p(d, k):
    d = d or {}
    return "-" if k not in d else f"{d[k]:.1f}"
print("| case | side | subs / rooms / chatters | danmaku/s sent | deliveries/s | delivered | latency p50 / p99 / p99.9 ms | gaps | skipped | disconnects | connect p99 ms | server CPU | client CPU | load |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "deliveries" not in r:
        print(f"| {r['case']} | {r['side']} | {r.get('error')} |"); continue
    exp = r["expected_deliveries"]
    pct = f"{100*r['deliveries']/exp:.2f} %" if exp else "-"
    lat = r.get("latency_ms")
    dis = ", ".join(f"{k} {v}" for k, v in r["disconnects"].items()) or "0"
    print(f"| {r['case']} | {r['side']} | {r['subscribers']} / {r['rooms']} / {r['chatters']} | {r['sent_per_s']:.0f} | "
          f"{r['deliveries_per_s']:.0f} | {pct} | {p(lat,'p50')} / {p(lat,'p99')} / {p(lat,'p999')} | {r['gaps']} | "
          f"{r['skipped_events']} | {dis} | {p(r.get('connect_ms'),'p99')} | {r.get('server_cpu_pct','-')} % | "
          f"{r.get('client_cpu_pct','-')} % | {r['load_before']:.1f} → {r['load_during']:.1f} |")
rc = [r for r in rows if r.get("reconnect")]
if rc:
    print()
    print("| case | side | clients away | back | recovered / not | missed (node's count) | reconnect p50 / p99 ms | caught up p50 / p99 ms | all caught up | replayed danmaku, latency p50 / p99 ms | gaps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rc:
        c = r["reconnect"]
        allc = f"{c['all_caught_up_ms']:.0f} ms" if c.get("all_caught_up_ms") is not None else f"no ({c['caught_up']} of {c['clients']})"
        print(f"| {r['case']} | {r['side']} | {c['clients']} | {c['reconnected']} | {c['recovered']} / {c['not_recovered']} | "
              f"{c['missed']} | {p(c.get('connect_ms'),'p50')} / {p(c.get('connect_ms'),'p99')} | "
              f"{p(c.get('caught_up_ms'),'p50')} / {p(c.get('caught_up_ms'),'p99')} | {allc} | "
              f"{c.get('replayed', 0)}, {p(c.get('replayed_latency_ms'),'p50')} / {p(c.get('replayed_latency_ms'),'p99')} | {r['gaps']} |")
PY
}

start_nats
for what in one-room many-rooms reconnect; do
  [ "$WHAT" = all ] || [ "$WHAT" = "$what" ] || continue
  for target in $TARGETS; do
    case $what in
      one-room) run_case one "$target" "$ONE_SUBS" 1 --connect-concurrency "$CONCURRENCY" ;;
      many-rooms) run_case many "$target" "$MANY_SUBS" "$MANY_ROOMS" --connect-concurrency "$CONCURRENCY" ;;
      reconnect)
        [ "$target" = nats-ws ] && continue   # core NATS has no recovery
        run_case rc "$target" "$RC_SUBS" "$RC_ROOMS" --reconnect --reconnect-at "$RC_AT" \
          --away-ms "$RC_AWAY_MS" --connect-concurrency "$RC_CONCURRENCY" ;;
    esac
  done
done
echo
table
echo
echo "finished $(date -u +%FT%TZ); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
