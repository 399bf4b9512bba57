#!/usr/bin/env bash
# Tiny-bank Retrieve latency through gRPC on loopback, answered on the
# handler's thread (inline, the default below --inline_work) against the
# hop to an executor (--inline_work 0), in one run: two engramd processes,
# one client at a time, the two measured in turn ROUNDS times. Each round
# also times GetBank (`--mix info`) on the inline server: no computation,
# the floor this host's gRPC round trip sets for any call.
#
#   bash bench/inline_ab.sh [seconds per run, default 10] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=${2:-3}
ENGRAMD=build/server/engramd
E=build/client/engram
DATA=$(mktemp -d /tmp/engram_inline.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$DATA"' EXIT

/usr/bin/python3 -c "
import numpy as np; np.save('$DATA/tiny.npy', np.random.default_rng(1).standard_normal((16,16)).astype(np.float32))"
declare -A TARGET
port=${ENGRAM_BENCH_PORT:-50981}
for mode in inline pool; do
  T=127.0.0.1:$port
  port=$((port + 1))
  flags=()
  [[ $mode == pool ]] && flags=(--inline_work 0)
  mkdir -p "$DATA/$mode"
  "$ENGRAMD" --listen "$T" --data_dir "$DATA/$mode" --metrics_listen "" "${flags[@]}" \
      >"$DATA/$mode.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do "$E" --target "$T" --timeout 1 health >/dev/null 2>&1 && break; sleep 0.2; done
  "$E" --target "$T" bank create tiny --dim 16 --kind continuous --energy lse --beta 4 >/dev/null
  "$E" --target "$T" store tiny "$DATA/tiny.npy" >/dev/null
  TARGET[$mode]=$T
done

echo "round mode   calls/s   p50_us   p99_us"
for r in $(seq "$ROUNDS"); do
  for mode in floor inline pool; do
    target=${TARGET[$mode]:-${TARGET[inline]}}
    rpc=retrieve
    [[ $mode == floor ]] && rpc=info
    "$E" --target "$target" load tiny --concurrency 1 --duration "$SECS" --warmup 1 \
        --mix "$rpc=1" --data "$DATA/tiny.npy" --seed 1 --format csv | tail -1 |
      awk -F, -v r="$r" -v m="$mode" '{printf "%5d %-6s %9.0f %8.1f %8.1f\n", r, m, $5, $7 * 1e6, $9 * 1e6}'
  done
done
