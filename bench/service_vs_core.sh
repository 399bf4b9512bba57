#!/usr/bin/env bash
# The service end to end against the core, in one run: `engram load` with 32
# clients sending single-query Retrieve calls to a real engramd on TCP
# loopback (Fashion-MNIST bank: 10 000 training images, 784 dims, normalised,
# lse beta 20; queries: 2 000 unseen test images, to convergence), and the
# core's own batched retrieval of the same queries on the same bank (32 at a
# time, as the server's dynamic batcher groups them), plus the p50 of a
# Retrieve on a tiny bank (16 x 16) for one client. Client and server share
# the host's cores; the core figure runs alone.
#
#   bash bench/service_vs_core.sh [seconds per load run, default 20]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-20}
ENGRAMD=build/server/engramd
E=build/client/engram
COMPARE=build/bench/engram_compare
PY=/usr/bin/python3
D=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
Q=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
PORT=${ENGRAM_BENCH_PORT:-50979}
T=127.0.0.1:$PORT
DATA=$(mktemp -d /tmp/engram_service_core.XXXXXX)
PID=""
stop() { if [[ -n "$PID" ]]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; fi; }
trap 'stop; rm -rf "$DATA"' EXIT

"$ENGRAMD" --listen "$T" --data_dir "$DATA/db" --metrics_listen "" >"$DATA/engramd.log" 2>&1 &
PID=$!
for _ in $(seq 100); do "$E" --target "$T" --timeout 1 health >/dev/null 2>&1 && break; sleep 0.2; done
"$E" --target "$T" --timeout 1 health >/dev/null || { cat "$DATA/engramd.log" >&2; exit 1; }

"$E" --target "$T" bank create tiny --dim 16 --kind continuous --energy lse --beta 4 >/dev/null
"$PY" -c "
import numpy as np; np.save('$DATA/tiny.npy', np.random.default_rng(1).standard_normal((16,16)).astype(np.float32))"
"$E" --target "$T" store tiny "$DATA/tiny.npy" >/dev/null
"$E" --target "$T" bank create fashion --dim 784 --kind continuous --energy lse --beta 20 >/dev/null
"$E" --target "$T" store fashion "$D" --limit 10000 --normalize --batch 2000 >/dev/null

"$E" --target "$T" load tiny --concurrency 1 --duration "$SECS" --warmup 2 --mix retrieve=1 \
    --data "$DATA/tiny.npy" --seed 1 --format json >"$DATA/tiny.json"
"$E" --target "$T" load fashion --concurrency 32 --connections 4 --duration "$SECS" --warmup 2 \
    --mix retrieve=1 --data "$Q" --limit 2000 --normalize --seed 2 --format json >"$DATA/load.json"
stop

# The same bank and queries as float32 files for the core side: the first
# rows of the idx files, each row scaled to unit norm (as --normalize does).
"$PY" - "$D" "$Q" "$DATA" <<'PY'
import gzip, sys
import numpy as np
def rows(path, limit):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    count, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    x = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, h * w)[:limit]
    x = x.astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
rows(sys.argv[1], 10000).tofile(sys.argv[3] + "/xi.f32")
rows(sys.argv[2], 2000).tofile(sys.argv[3] + "/q.f32")
PY
"$COMPARE" --throughput 1 --patterns "$DATA/xi.f32" --queries "$DATA/q.f32" --dim 784 \
    --batch 32 --beta 20 --repeats 3 >"$DATA/core.json"
"$COMPARE" --bandwidth 1 --repeats 1 >"$DATA/machine.json"

"$PY" - "$DATA" <<'PY'
import json, sys
d = sys.argv[1]
load = json.load(open(d + "/load.json"))
tiny = json.load(open(d + "/tiny.json"))
core = json.load(open(d + "/core.json"))
machine = json.load(open(d + "/machine.json"))
service = load["achieved_rate"]
lat = load["latency_seconds"]
print(f"kernels {machine['simd']}, {machine['threads']} compute threads, OpenBLAS {machine['blas']}")
print()
print("| workload | service | core (batches of 32) | service / core |")
print("|---|---|---|---|")
print(f"| Fashion bank, 32 clients, Retrieve to convergence | {service:.0f} calls/s "
      f"(p50 {lat['p50'] * 1e3:.1f} ms, p99 {lat['p99'] * 1e3:.1f} ms; errors {load['errors']}) "
      f"| {core['queries_per_s']:.0f} queries/s ({core['steps_per_query']:.1f} steps a query) "
      f"| {100 * service / core['queries_per_s']:.0f} % |")
tl = tiny["latency_seconds"]
print(f"| tiny bank (16 x 16), 1 client | {tiny['achieved_rate']:.0f} calls/s, p50 "
      f"{tl['p50'] * 1e6:.0f} µs, p99 {tl['p99'] * 1e6:.0f} µs | | |")
PY
