#!/usr/bin/env bash
# Installs what building and running Weir needs on Debian 12 (and, with
# --test, what its tests need: Chromium, etcd, PostgreSQL, Node.js and the e2e npm packages).
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

packages=(ca-certificates curl gcc g++ make pkg-config protobuf-compiler libprotobuf-dev)
# The media stack, needed to build (ffmpeg-next links the libav* libraries and
# runs bindgen, hence clang) and to run (the ffmpeg CLI publishes over SRT in
# the tests; srt-tools holds libsrt's srt-live-transmit for benchmarks).
packages+=(clang libclang-dev ffmpeg libavcodec-dev libavformat-dev libavutil-dev
  libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev srt-tools)
if [ "$with_tests" -eq 1 ]; then
  # etcd-server: the cluster tests start their own etcd (3.4) processes.
  # postgresql: the store's business tests start their own PostgreSQL
  # server (initdb + postgres from /usr/lib/postgresql/15/bin) per test.
  # nats-server: the room bus tests start their own JetStream servers
  # (one, or a 3-server cluster) per test.
  # nginx: the CDN failover test puts two caching proxies in front of a node.
  packages+=(chromium etcd-server postgresql nats-server nginx-light)
  command -v node >/dev/null 2>&1 || packages+=(nodejs npm)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Rust: the toolchain from rustup (Debian's cargo is too old for edition 2024).
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: installing Rust with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  export PATH="$HOME/.cargo/bin:$PATH"
fi

if [ "$with_tests" -eq 1 ]; then
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest"
    cargo install cargo-nextest --locked
  fi
  # The browser tests drive Debian's Chromium through playwright-core; no
  # browser is downloaded.
  if [ ! -d tests/e2e/node_modules/playwright-core ] || [ tests/e2e/package-lock.json -nt tests/e2e/node_modules ]; then
    echo "setup: installing the e2e npm packages"
    (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error && touch node_modules)
  fi
fi
echo "setup: ready"
