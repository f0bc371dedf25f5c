#!/usr/bin/env bash
# Runs one etcd member in the foreground, for trying a Weir cluster by hand:
#
#   deploy/etcd.sh &
#   weir control --etcd http://127.0.0.1:2379 ...
#   weir node --etcd http://127.0.0.1:2379 --node-id n1 ...
#
# Client URL http://$WEIR_ETCD_CLIENT (default 127.0.0.1:2379), peer URL
# http://$WEIR_ETCD_PEER (default 127.0.0.1:2380), data under $WEIR_ETCD_DATA
# (default weir-data/etcd). The tests do not use this script: they start
# their own etcd processes on free ports.
#
# Auto-compaction is on: every node rewrites its key every second (its load
# report), and without compaction etcd keeps every revision until its space
# quota (2 GiB by default) is full and it refuses writes. Run production etcd
# with a compaction setting too.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v etcd >/dev/null 2>&1; then
  echo "etcd.sh: etcd is not installed; run deploy/setup.sh --test (Debian's etcd-server)" >&2
  exit 1
fi
client="${WEIR_ETCD_CLIENT:-127.0.0.1:2379}"
peer="${WEIR_ETCD_PEER:-127.0.0.1:2380}"
data="${WEIR_ETCD_DATA:-weir-data/etcd}"
mkdir -p "$(dirname "$data")"
echo "etcd.sh: client URL http://$client, data in $data" >&2
exec etcd --name weir-dev --data-dir "$data" \
  --listen-client-urls "http://$client" --advertise-client-urls "http://$client" \
  --listen-peer-urls "http://$peer" --initial-advertise-peer-urls "http://$peer" \
  --initial-cluster "weir-dev=http://$peer" \
  --auto-compaction-mode periodic --auto-compaction-retention 10m \
  --logger zap --log-outputs stderr
