#!/usr/bin/env bash
# The one command that runs Weir on this machine: installs what the build
# needs, builds, and starts `weir dev` (control plane + one media node, on
# embedded defaults). Extra arguments go to `weir dev` (see `weir dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
exec cargo run --release --locked --bin weir -- --log-format text dev "$@"
