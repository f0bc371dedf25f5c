# Shell helpers the benchmark scripts share (sourced, not run).

# utime+stime (clock ticks) of the given processes, summed.
ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$s"; }
wait_http() { # url [log]
  for _ in $(seq 300); do curl -sf "$1" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "no answer from $1" >&2; [ -n "${2:-}" ] && tail -20 "$2" >&2; exit 1
}
stop() { for p in "$@"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
