#!/usr/bin/env bash
# The one command that runs Weir's tests: installs what they need (Debian
# packages, Rust tools, Chromium, npm packages), then checks formatting and
# lints, and runs every test with nextest. Fails loudly when anything is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh --test
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== the SFU core carries no I/O runtime"
if cargo tree -p weir-sfu -e normal --prefix none | grep -Eq '^(tokio|mio|io-uring|tokio-uring) '; then
  echo "weir-sfu depends on an I/O runtime" >&2
  exit 1
fi
echo "== cargo nextest"
cargo nextest run --workspace --locked --no-fail-fast
