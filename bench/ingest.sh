#!/usr/bin/env bash
# Ingest and transcoding benchmarks (issue 4), all in one run on this machine:
#
#  1. Transcode throughput of the default ladder (source,480p,360p: decode a
#     1080p30 source once, encode 852x480 and 640x360 with libx264) in frames/s,
#     the node's `LadderEncoder` (example `ladder_throughput`) next to the
#     ffmpeg CLI doing the same ladder on the same file with the same settings.
#  2. SRT-in to WebRTC-out latency: ffmpeg pushes 720p30 (x264 zerolatency,
#     AAC) over SRT into `weir dev`; one WHEP viewer (`weir loadtest`) gets
#     each video frame with abs-capture-time = when ffmpeg handed the frame's
#     first bytes to SRT (SRT's origin time; one clock: same machine), and
#     reports arrival minus that, p50/p99. With SRT latency 120 ms (default)
#     and 20 ms, and for a B-frame stream (re-encoded for WebRTC).
#  3. SRT ingest throughput: N ffmpeg processes each send the same 4 Mbit/s
#     720p30 stream (copied in a loop, paced) through ffmpeg's tee muxer to
#     BOTH `weir dev` and one `srt-live-transmit` per stream (libsrt's own
#     relay, to /dev/null). CPU time of weir and of all srt-live-transmit
#     processes over the same window -> Mbit/s and streams per core.
#
#   CARGO_TARGET_DIR=/var/tmp/weir-target-media cargo build --release -p weir -p weir-data-plane --bins --examples
#   CARGO_TARGET_DIR=/var/tmp/weir-target-media bench/ingest.sh [transcode|latency|ingest|all]
#
# Prints markdown tables. Needs ffmpeg, srt-live-transmit (srt-tools), curl,
# python3. Ports 38080/37000/37100/39000 and 39100+ on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
WEIR=${WEIR_BIN:-$TARGET/release/weir}
LADDER=${LADDER_BIN:-$TARGET/release/examples/ladder_throughput}
WHAT=${1:-all}
RUNS=${RUNS:-3}                 # transcode runs per side (median)
STREAMS=${STREAMS:-"4 8"}       # ingest: concurrent streams per run
WINDOW=${WINDOW:-20}            # ingest: seconds of steady state sampled
PLAY=${PLAY:-30}                # latency: seconds the viewer plays
for t in ffmpeg srt-live-transmit curl python3; do
  command -v "$t" >/dev/null || { echo "missing $t (deploy/setup.sh --test; srt-tools)" >&2; exit 2; }
done
[ -x "$WEIR" ] && [ -x "$LADDER" ] || {
  echo "build first: cargo build --release -p weir -p weir-data-plane --bins --examples" >&2; exit 2; }
work=$(mktemp -d /tmp/weir-bench-ingest.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
tck=$(getconf CLK_TCK)
HTTP=127.0.0.1:38080
CONTROL=127.0.0.1:37000
SRT=127.0.0.1:39000

echo "machine: nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "ffmpeg: $(ffmpeg -version | head -1 | cut -d' ' -f3); srt-live-transmit: $(dpkg-query -W -f='${Version}' srt-tools 2>/dev/null || echo '?')"
echo

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

start_weir() { # args: extra flags
  "$WEIR" --log-format json dev --http "$HTTP" --grpc "$CONTROL" --udp 127.0.0.1:37100 \
    --srt "$SRT" --data-dir "$work/data" "$@" >"$work/weir.out" 2>"$work/weir.log" &
  weir_pid=$!
  pids+=("$weir_pid")
  for _ in $(seq 100); do
    curl -sf "http://$HTTP/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "weir did not start: $(tail -5 "$work/weir.log")" >&2; exit 1
}
stop_weir() { kill "$weir_pid" 2>/dev/null || true; wait "$weir_pid" 2>/dev/null || true; }
token() { # room
  curl -sf -X POST "http://$CONTROL/v1/tokens" -H 'content-type: application/json' \
    -d "{\"room\":\"$1\",\"mode\":\"publish\",\"subject\":\"bench\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
metric() { curl -s "http://$HTTP/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s+=$NF} END {printf "%.0f\n", s}'; }

transcode() {
  echo "### Transcode throughput, default ladder (source,480p,360p), libx264"
  echo
  ffmpeg -hide_banner -loglevel error -f lavfi -i testsrc2=size=1920x1080:rate=30 \
    -f lavfi -i sine=frequency=440:sample_rate=48000 -t 20 -pix_fmt yuv420p \
    -c:v libx264 -preset veryfast -b:v 6M -g 60 -c:a aac -f mpegts -y "$work/in1080.ts"
  local frames=600 node cli node_cpu cli_cpu
  : >"$work/node.fps"; : >"$work/cli.fps"
  for _ in $(seq "$RUNS"); do
    "$LADDER" "$work/in1080.ts" source,480p,360p x264 >"$work/ladder.json" 2>/dev/null
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fps"])' "$work/ladder.json" >>"$work/node.fps"
    local t0 t1
    t0=$(date +%s.%N)
    ffmpeg -hide_banner -loglevel error -i "$work/in1080.ts" -an -filter_complex \
      "[0:v]split=2[a][b];[a]scale=852:480:flags=bilinear[o1];[b]scale=640:360:flags=bilinear[o2]" \
      -map '[o1]' -c:v libx264 -preset veryfast -tune zerolatency -profile:v main -b:v 1200k \
      -maxrate 1200k -bufsize 1200k -g 120 -bf 0 -x264-params scenecut=0 -forced-idr 1 -force_key_frames source -f null - \
      -map '[o2]' -c:v libx264 -preset veryfast -tune zerolatency -profile:v main -b:v 800k \
      -maxrate 800k -bufsize 800k -g 120 -bf 0 -x264-params scenecut=0 -forced-idr 1 -force_key_frames source -f null -
    t1=$(date +%s.%N)
    python3 -c "print($frames / ($t1 - $t0))" >>"$work/cli.fps"
  done
  node=$(median <"$work/node.fps"); cli=$(median <"$work/cli.fps")
  echo "Input: 20 s of testsrc2 1920x1080 30 fps, x264 veryfast 6 Mbit/s with B-frames (600 frames)."
  echo "Median of $RUNS runs each, frames of the source per second of wall time."
  echo
  echo "| | frames/s | ratio (node / CLI) |"
  echo "|---|---|---|"
  printf '| node `LadderEncoder` (`ladder_throughput`) | %.1f | %.2f |\n' "$node" "$(python3 -c "print($node / $cli)")"
  printf '| ffmpeg CLI, same ladder and settings | %.1f | 1.00 |\n' "$cli"
  echo
  echo "node runs: $(tr '\n' ' ' <"$work/node.fps"); CLI runs: $(tr '\n' ' ' <"$work/cli.fps")"
  echo
}

latency_run() { # label, weir flags, ffmpeg x264 flags, srt latency µs
  local label=$1 flags=$2 x264=$3 lat=$4 tok
  start_weir $flags --ladder off
  tok=$(token lat)
  ffmpeg -hide_banner -loglevel error -re -f lavfi -i testsrc2=size=1280x720:rate=30 \
    -f lavfi -i sine=frequency=440:sample_rate=48000 -t $((PLAY + 15)) -pix_fmt yuv420p \
    -c:v libx264 -preset veryfast $x264 -g 60 -b:v 3M -c:a aac -f mpegts \
    "srt://$SRT?streamid=#!::r=lat,m=publish,t=$tok&latency=$lat" >/dev/null 2>&1 &
  local ff=$!
  pids+=("$ff")
  sleep 4
  "$WEIR" --log-format json loadtest --control "http://$CONTROL" --room lat --viewers 1 \
    --duration "$PLAY" --json >"$work/lat.json" 2>/dev/null || true
  python3 - "$work/lat.json" "$label" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
dl, fps = d.get("delay_ms"), d.get("video_fps")
if not dl:
    print(f"| {sys.argv[2]} | no delay samples: {d.get('errors')} | | | |")
else:
    print(f"| {sys.argv[2]} | {dl['count']} | {dl['p50']:.1f} | {dl['p99']:.1f} | {fps['p50'] if fps else '-'} |")
EOF
  kill "$ff" 2>/dev/null || true; wait "$ff" 2>/dev/null || true
  stop_weir
}

latency() {
  echo "### SRT in to WebRTC out, per video frame (720p30, one WHEP viewer, $PLAY s)"
  echo
  echo "| case | frames | p50 ms | p99 ms | viewer fps |"
  echo "|---|---|---|---|---|"
  latency_run "SRT latency 120 ms, x264 zerolatency (passed through)" "" "-tune zerolatency" 120000
  latency_run "SRT latency 20 ms, x264 zerolatency (passed through)" "--srt-latency-ms 20" "-tune zerolatency" 20000
  latency_run "SRT latency 120 ms, x264 with B-frames (re-encoded)" "" "" 120000
  echo
}

ingest_run() { # streams, label, weir flags
  local n=$1 label=$2 flags=$3 i
  start_weir $flags
  local slt_pids=() ff_pids=()
  for i in $(seq "$n"); do
    local port=$((39100 + i)) tok
    srt-live-transmit -q -s:200 -pf:json -statsout:"$work/slt$i.json" -f \
      "srt://127.0.0.1:$port?mode=listener" file://con >/dev/null 2>&1 &
    slt_pids+=($!); pids+=($!)
    tok=$(token "in$i")
    sleep 0.2
    ffmpeg -hide_banner -loglevel error -re -stream_loop -1 -i "$work/stream.ts" -map 0 -c copy \
      -f tee "[f=mpegts]srt://$SRT?streamid=#!::r=in$i,m=publish,t=$tok|[f=mpegts]srt://127.0.0.1:$port" \
      >/dev/null 2>"$work/ff$i.err" &
    ff_pids+=($!); pids+=($!)
  done
  sleep 6
  local w0 s0=0 b0 t0 p
  w0=$(ticks "$weir_pid")
  for p in "${slt_pids[@]}"; do s0=$((s0 + $(ticks "$p"))); done
  b0=$(metric weir_srt_bytes_received_total)
  t0=$(date +%s.%N)
  python3 - "$work" "$n" >"$work/slt.b0" <<'EOF'
import json, sys
tot = 0
for i in range(1, int(sys.argv[2]) + 1):
    try:
        lines = [l for l in open(f"{sys.argv[1]}/slt{i}.json") if l.startswith("{")]
        tot += json.loads(lines[-1])["recv"]["bytes"]
    except Exception:
        pass
print(tot)
EOF
  sleep "$WINDOW"
  local w1 s1=0 b1 t1
  w1=$(ticks "$weir_pid")
  for p in "${slt_pids[@]}"; do s1=$((s1 + $(ticks "$p"))); done
  b1=$(metric weir_srt_bytes_received_total)
  t1=$(date +%s.%N)
  python3 - "$work" "$n" >"$work/slt.b1" <<'EOF'
import json, sys
tot = 0
for i in range(1, int(sys.argv[2]) + 1):
    try:
        lines = [l for l in open(f"{sys.argv[1]}/slt{i}.json") if l.startswith("{")]
        tot += json.loads(lines[-1])["recv"]["bytes"]
    except Exception:
        pass
print(tot)
EOF
  python3 - "$n" "$label" "$tck" "$w0" "$w1" "$s0" "$s1" "$b0" "$b1" "$(cat "$work/slt.b0")" "$(cat "$work/slt.b1")" "$t0" "$t1" <<'EOF'
import sys
n, label, tck = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
w0, w1, s0, s1, b0, b1, sb0, sb1 = map(float, sys.argv[4:12])
secs = float(sys.argv[13]) - float(sys.argv[12])
wc = (w1 - w0) / tck / secs
sc = (s1 - s0) / tck / secs
wm = (b1 - b0) * 8 / secs / 1e6
sm = (sb1 - sb0) * 8 / secs / 1e6
print(f"| {n} | {label} | {wm:.1f} | {wc*100:.1f} % | {n/wc if wc else 0:.0f} | {sm:.1f} | {sc*100:.1f} % | {n/sc if sc else 0:.0f} | {(n/wc)/(n/sc) if wc and sc else 0:.2f} |")
EOF
  for p in "${ff_pids[@]}" "${slt_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${ff_pids[@]}" "${slt_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  stop_weir
}

ingest() {
  echo "### SRT ingest throughput against srt-live-transmit, same streams, same run"
  echo
  ffmpeg -hide_banner -loglevel error -f lavfi -i testsrc2=size=1280x720:rate=30 \
    -f lavfi -i sine=frequency=440:sample_rate=48000 -t 20 -pix_fmt yuv420p -c:v libx264 \
    -preset veryfast -tune zerolatency -b:v 4M -maxrate 4M -bufsize 4M -g 60 -c:a aac -b:a 128k \
    -f mpegts -y "$work/stream.ts"
  echo "Each stream: 720p30 x264 zerolatency 4 Mbit/s + AAC 128 kbit/s, looped with \`ffmpeg -re -c copy -f tee\` to both receivers; $WINDOW s window after 6 s."
  echo
  echo "| streams | weir does | weir Mbit/s in | weir CPU | weir streams/core | srt-live-transmit Mbit/s in | srt-live-transmit CPU (all) | srt-live-transmit streams/core | ratio |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for n in $STREAMS; do
    ingest_run "$n" "demux + WebRTC + AAC→Opus" "--ladder off --hls-segment 0 --snapshot-interval 0"
    ingest_run "$n" "… + HLS + snapshots" "--ladder off"
  done
  echo
}

case "$WHAT" in
  transcode) transcode ;;
  latency) latency ;;
  ingest) ingest ;;
  all) transcode; latency; ingest ;;
  *) echo "usage: $0 [transcode|latency|ingest|all]" >&2; exit 2 ;;
esac
