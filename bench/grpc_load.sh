#!/usr/bin/env bash
# End-to-end figures through gRPC on loopback, with the project's load
# tester: (1) the overhead of one Retrieve on a tiny bank, (2) Retrieve on a
# 10 000 x 784 Fashion-MNIST bank at 1, 8 and 32 concurrent clients with
# the dynamic batcher on and off.
#
#   bash bench/grpc_load.sh [seconds per run, default 15]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
ENGRAMD=build/server/engramd
E=build/client/engram
D=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
Q=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz  # queries: unseen images
PORT=${ENGRAM_BENCH_PORT:-50977}
T=127.0.0.1:$PORT
DATA=$(mktemp -d /tmp/engram_load.XXXXXX)
PID=""
stop() { if [[ -n "$PID" ]]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; fi; }
trap 'stop; rm -rf "$DATA"' EXIT

start() {  # start [extra engramd flags]
  "$ENGRAMD" --listen "$T" --data_dir "$DATA" --metrics_listen "" "$@" >"$DATA/engramd.log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do "$E" --target "$T" --timeout 1 health >/dev/null 2>&1 && return; sleep 0.2; done
  echo "engramd did not start" >&2; cat "$DATA/engramd.log" >&2; exit 1
}

start
"$E" --target "$T" bank create tiny --dim 16 --kind continuous --energy lse --beta 4 >/dev/null
/usr/bin/python3 -c "
import numpy as np; np.save('$DATA/tiny.npy', np.random.default_rng(1).standard_normal((16,16)).astype(np.float32))"
"$E" --target "$T" store tiny "$DATA/tiny.npy" >/dev/null
"$E" --target "$T" bank create fashion --dim 784 --kind continuous --energy lse --beta 20 >/dev/null
"$E" --target "$T" store fashion "$D" --limit 10000 --normalize --batch 2000 >/dev/null
echo "== tiny bank (16 x 16), Retrieve, 1 client"
"$E" --target "$T" load tiny --concurrency 1 --duration "$SECS" --warmup 2 --mix retrieve=1 \
    --data "$DATA/tiny.npy" --seed 1
for batching in true false; do
  stop
  start --batching="$batching"
  for c in 1 8 32; do
    echo "== fashion (10 000 x 784, lse beta 20), Retrieve, $c clients, batching $batching"
    "$E" --target "$T" load fashion --concurrency "$c" --connections "$(( c < 4 ? c : 4 ))" \
        --duration "$SECS" --warmup 2 --mix retrieve=1 --data "$Q" --limit 2000 --normalize --seed 2
  done
done
