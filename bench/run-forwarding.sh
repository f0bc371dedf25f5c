#!/usr/bin/env bash
# Forwarding benchmark, in one run: `weir dev` (release, ONE shard) carries one
# publisher sending a 1.5 Mbit/s VP8 clip to M synthetic WebRTC viewers
# (`weir loadtest`), while this script samples the shard thread's CPU time
# and the node's forwarded datagrams; then the raw limit (`udp_fanout`: the
# same fan-out, datagram size and rate through the same batched I/O, no
# WebRTC) runs on the same machine. Prints one markdown row per M.
#
#   cargo build --release -p weir -p weir-bench --bins
#   VIEWERS="100 250 500" IO=auto bench/run-forwarding.sh
#
# LIGHT=1 runs `weir loadtest --light` viewers (clear RTP headers only, no
# SRTP decryption): the load generator then costs a fraction of a core, so
# the node, not the viewers, is what runs out. SHARDS=N gives the node N
# shards (the CPU column then sums every shard thread). GSO=false turns
# GSO sends off in both the node (--udp-gso) and the raw forwarder, which
# sends each destination bursts of as many datagrams as a video frame has
# (what GSO groups) and 50 audio datagrams a second one at a time, each
# AUDIO_SIZE bytes (default: what the node sends for the load test's Opus
# frames), so both sides always use the same system calls.
# Delay is given twice, from the frame's capture time: to when a viewer read
# the frame's first packet, and to when that packet reached the viewer's
# socket (kernel receive timestamp, light viewers). The difference is time
# spent waiting for the load generator, which shares the node's cores here.
# CLIENT_NICE=19 runs the viewers in a process of their own at that nice
# level (the publisher apart, at normal priority), so the node is served
# first, as on a machine of its own; the arrival delay is unaffected by how
# late the viewers then read.
# The raw forwarder's arrival delay (same fan-out, a keyframe's burst every
# 60 frames) is the floor of that delay on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${WEIR_BIN:-target/release/weir}
FANOUT=${FANOUT_BIN:-target/release/udp_fanout}
VIEWERS=${VIEWERS:-"100 250 500"}
IO=${IO:-auto}
DURATION=${DURATION:-20}      # seconds each viewer plays
WINDOW=${WINDOW:-8}           # seconds of steady state sampled
SHARDS=${SHARDS:-1}
GSO=${GSO:-true}
AUDIO_SIZE=${AUDIO_SIZE:-47} # bytes of the node's audio datagrams here (the load test sends 3-byte Opus frames)
# Forwarding only: the WHIP room's HLS, ladder and snapshots (x264 on the
# same cores) are measured in the ingest section. TRANSCODE=1 keeps them.
MEDIA_FLAGS="--hls-segment 0 --ladder off --snapshot-interval 0"
[ "${TRANSCODE:-0}" = 1 ] && MEDIA_FLAGS=""
LIGHT_FLAG=""
[ "${LIGHT:-0}" = 1 ] && LIGHT_FLAG="--light"
[ -x "$BIN" ] && [ -x "$FANOUT" ] || { echo "build first: cargo build --release -p weir -p weir-bench --bins" >&2; exit 2; }
work=$(mktemp -d)
trap 'kill $(cat "$work"/pid 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
tck=$(getconf CLK_TCK)

metric() { # sum of a metric's series
  curl -s "http://127.0.0.1:28080/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s+=$NF} END {printf "%.0f\n", s}'
}
rcvbuf_errors() { # datagrams the kernel dropped for a full receive buffer (all sockets)
  awk '/^Udp:/ && $2 ~ /^[0-9]+$/ {print $6}' /proc/net/snmp
}
shard_ticks() { # utime+stime of the shard threads
  local pid=$1 t sum=0
  for t in /proc/"$pid"/task/*; do
    case "$(cat "$t/comm")" in
      weir-shard-*) sum=$((sum + $(awk '{print $14+$15}' "$t/stat"))) ;;
    esac
  done
  echo "$sum"
}

echo "| viewers | io | gso | forwarded pps | shard CPU | pps per core | raw pps per core | ratio | viewer loss p50/p99 % | node send drops / receive-buffer drops % | delay p50/p99 ms (read) | arrival delay p50/p99 ms | raw arrival delay p50/p99 ms | fps p50 | failed+no video |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for m in $VIEWERS; do
  "$BIN" --log-format json dev --shards "$SHARDS" --io "$IO" --udp-gso "$GSO" $MEDIA_FLAGS --http 127.0.0.1:28080 --grpc 127.0.0.1:27000 \
    --udp 127.0.0.1:27100 --srt 127.0.0.1:29000 --data-dir "$work/data" >"$work/out" 2>"$work/log" &
  echo $! >"$work/pid"
  pid=$(cat "$work/pid")
  for _ in $(seq 50); do curl -sf http://127.0.0.1:28080/readyz >/dev/null && break; sleep 0.2; done
  backend=$(awk '/^media shards/ {print $5}' "$work/out")
  r0=$(rcvbuf_errors)
  publisher=""
  if [ -n "${CLIENT_NICE:-}" ]; then
    # The publisher at normal priority (its capture times must not wait),
    # the viewers niced: the node gets the cores first, as on its own box.
    "$BIN" loadtest --control http://127.0.0.1:27000 --room bench --publishers 1 --viewers 1 \
      --duration $((DURATION + 6)) --light --json >"$work/pub.json" 2>"$work/pub.err" &
    publisher=$!
    sleep 1
    nice -n "$CLIENT_NICE" "$BIN" loadtest --control http://127.0.0.1:27000 --room bench --publishers 0 --viewers "$m" \
      --duration "$DURATION" --ramp-ms 5 $LIGHT_FLAG --json >"$work/lt.json" 2>"$work/lt.err" &
  else
    "$BIN" loadtest --control http://127.0.0.1:27000 --room bench --publishers 1 --viewers "$m" \
      --duration "$DURATION" --ramp-ms 5 $LIGHT_FLAG --json >"$work/lt.json" 2>"$work/lt.err" &
  fi
  lt=$!
  # Wait for every viewer to have joined, then sample a steady window.
  sleep $(( 3 + m * 5 / 1000 + 3 ))
  d0=$(metric weir_udp_datagrams_sent_total); b0=$(metric weir_udp_bytes_sent_total); c0=$(shard_ticks "$pid")
  sleep "$WINDOW"
  d1=$(metric weir_udp_datagrams_sent_total); b1=$(metric weir_udp_bytes_sent_total); c1=$(shard_ticks "$pid")
  wait "$lt" || true
  [ -n "${publisher:-}" ] && { wait "$publisher" || true; }
  r1=$(rcvbuf_errors)
  sent_all=$(metric weir_udp_datagrams_sent_total); send_drops=$(metric weir_udp_send_dropped_total)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  drops=$(awk -v s="$send_drops" -v r=$((r1-r0)) -v n="$sent_all" \
    'BEGIN { printf "%.2f/%.2f", (n>0?100*s/n:0), (n>0?100*r/n:0) }')
  read -r pps cpu per_core size <<<"$(awk -v d=$((d1-d0)) -v b=$((b1-b0)) -v c=$((c1-c0)) -v w="$WINDOW" -v t="$tck" \
    'BEGIN { pps=d/w; cpu=c/t/w; printf "%.0f %.2f %.0f %.0f\n", pps, cpu, (cpu>0?pps/cpu:0), (d>0?b/d:0) }')"
  per_viewer=$(( pps / m > 0 ? pps / m : 1 ))
  # 50 audio datagrams/s (20 ms Opus frames), each sent on its own; the
  # rest in bursts of a 30 fps video frame's packets, as long as the bytes
  # the node sent say.
  audio_pps=$(( per_viewer > 80 ? 50 : 0 ))
  burst=$(( per_viewer > 80 ? (per_viewer - audio_pps + 15) / 30 : 1 ))
  vsize=$(( (size * per_viewer - audio_pps * AUDIO_SIZE) / (per_viewer - audio_pps) ))
  # The clip's keyframe (every 60 frames) is about four delta frames.
  raw=$("$FANOUT" --fanout "$m" --pps "$per_viewer" --burst "$burst" --size "$vsize" --seconds "$WINDOW" \
    --audio-pps "$audio_pps" --audio-size "$AUDIO_SIZE" \
    --keyframe-every 60 --keyframe-burst $(( burst * 4 > 64 ? 64 : burst * 4 )) --io "$IO" --gso "$GSO" --json)
  echo "$raw" >"$work/raw.json"
  python3 - "$work/lt.json" "$m" "$backend" "$pps" "$cpu" "$per_core" "$work/raw.json" "$GSO" "$drops" <<'PY'
import json, sys
lt = json.load(open(sys.argv[1]))
m, io, pps, cpu, pc, raw_json, gso, drops = sys.argv[2:10]
rj = json.load(open(raw_json))
raw = rj["max_pps_per_core"]
rd = rj.get("delay_ms") or {}
loss = lt.get("loss_pct") or {}
delay = lt.get("delay_ms") or {}
arrival = lt.get("arrival_delay_ms") or {}
fps = lt.get("video_fps") or {}
ratio = float(pc) / float(raw) if float(raw) > 0 else 0
print(f"| {m} | {io} | {'on' if gso == 'true' else 'off'} | {pps} | {float(cpu)*100:.0f} % | {pc} | {float(raw):.0f} | {ratio:.2f} | "
      f"{loss.get('p50','-')}/{loss.get('p99','-')} | {drops} | {delay.get('p50','-')}/{delay.get('p99','-')} | "
      f"{arrival.get('p50','-')}/{arrival.get('p99','-')} | {rd.get('p50','-')}/{rd.get('p99','-')} | "
      f"{fps.get('p50','-')} | {lt['failed']}+{lt['viewers_without_video']} |")
PY
done
