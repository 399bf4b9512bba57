#!/usr/bin/env bash
# Replicas on the JetStream write log, in one run on loopback:
#  - write latency and throughput: Store (one Fashion-MNIST image a call)
#    on one node with its local SQLite only, against a replica whose writes
#    go through a three-node NATS cluster (stream with 3 copies), at 1 and 8
#    concurrent clients;
#  - read throughput: sync Retrieve (to convergence, 2 000 unseen test
#    images) on a bank of 5 000 images, through 1, 2 and 3 replicas with the
#    client's round_robin policy, 8 clients.
# `engram load` measures; the table gives calls/s and p50 / p99 latency.
#
# Every process shares this machine's cores: reads through more replicas
# show the spread and its cost here, not the throughput of a replica per
# machine, which needs a machine per replica.
#
#   bash bench/replicas.sh [seconds per load run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ENGRAMD=build/server/engramd
E=build/client/engram
PY=/usr/bin/python3
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
D=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
Q=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
BASE=${ENGRAM_BENCH_PORT:-51980}
DATA=$(mktemp -d /tmp/engram_replicas.XXXXXX)
PIDS=()
stop() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap 'stop; rm -rf "$DATA"' EXIT

wait_up() {
  for _ in $(seq 150); do
    "$E" --target "$1" --timeout 1 bank list >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "no server on $1" >&2; cat "$DATA"/*.log >&2; exit 1
}

load() {  # load <out> <target> <mix> <concurrency>
  "$E" --target "$2" load fashion --concurrency "$4" --duration "$SECS" --warmup 2 \
      --mix "$3=1" --data "$Q" --limit 2000 --normalize --seed 3 --format json >"$DATA/$1.json"
}

# One node, local SQLite only.
"$ENGRAMD" --listen "127.0.0.1:$BASE" --data_dir "$DATA/node" --metrics_listen "" \
    --writer_threads 8 >"$DATA/node.log" 2>&1 &
PIDS+=($!)
wait_up "127.0.0.1:$BASE"
"$E" --target "127.0.0.1:$BASE" bank create fashion --dim 784 --kind continuous --energy lse \
    --beta 20 >/dev/null
load node.store1 "127.0.0.1:$BASE" store 1
load node.store8 "127.0.0.1:$BASE" store 8
stop

# A three-node JetStream cluster and three replicas.
urls=""
routes=()
for i in 0 1 2; do routes+=("nats://127.0.0.1:$((BASE + 20 + i))"); done
for i in 0 1 2; do
  others=$(printf '%s\n' "${routes[@]}" | grep -v ":$((BASE + 20 + i))$" | paste -sd, -)
  "$NATS" -a 127.0.0.1 -p $((BASE + 10 + i)) -js -sd "$DATA/nats$i" -n "n$i" \
      --cluster_name engram --cluster "${routes[$i]}" --routes "$others" \
      >"$DATA/nats$i.log" 2>&1 &
  PIDS+=($!)
  urls="$urls${urls:+,}nats://127.0.0.1:$((BASE + 10 + i))"
done
targets=()
for i in 0 1 2; do
  port=$((BASE + 1 + i))
  "$ENGRAMD" --listen "127.0.0.1:$port" --data_dir "$DATA/r$i" --metrics_listen "" \
      --log "$urls" --log_stream BENCH --writer_threads 8 >"$DATA/r$i.log" 2>&1 &
  PIDS+=($!)
  targets+=("127.0.0.1:$port")
done
for t in "${targets[@]}"; do wait_up "$t"; done
"$E" --target "${targets[0]}" bank create fashion --dim 784 --kind continuous --energy lse \
    --beta 20 >/dev/null
load log.store1 "${targets[0]}" store 1
load log.store8 "${targets[0]}" store 8
# The read bank: 5 000 training images (200 a call: under NATS's 1 MiB).
"$E" --target "${targets[0]}" bank delete fashion >/dev/null
"$E" --target "${targets[0]}" bank create fashion --dim 784 --kind continuous --energy lse \
    --beta 20 >/dev/null
"$E" --target "${targets[0]}" store fashion "$D" --limit 5000 --normalize --batch 200 >/dev/null
# Reads start once every replica has applied the whole log (the write
# runs above leave the others some thousands of entries behind).
for t in "${targets[@]}"; do
  for _ in $(seq 600); do
    "$E" --target "$t" bank get fashion 2>/dev/null | grep -q "K=5000 " && break
    sleep 0.5
  done
done
load read1 "ipv4:${targets[0]}" retrieve 8
load read2 "ipv4:${targets[0]},${targets[1]}" retrieve 8
load read3 "ipv4:${targets[0]},${targets[1]},${targets[2]}" retrieve 8
stop

"$PY" - "$DATA" <<'PY'
import json, os, sys
d = sys.argv[1]
def row(name, label):
    j = json.load(open(f"{d}/{label}.json"))
    lat = j["latency_seconds"]
    err = f" ({j['errors']} failed)" if j["errors"] else ""
    print(f"| {name} | {j['achieved_rate']:.0f}{err} | {lat['p50'] * 1e3:.2f} ms | {lat['p99'] * 1e3:.2f} ms |")
print(f"{os.cpu_count()} cores shared by every process (NATS x3, engramd x3, the load client)")
print()
print("| Store, one 784-float image a call | calls/s | p50 | p99 |")
print("|---|---|---|---|")
row("one node, local SQLite, 1 client", "node.store1")
row("replica on the JetStream log (3 copies), 1 client", "log.store1")
row("one node, local SQLite, 8 clients", "node.store8")
row("replica on the JetStream log (3 copies), 8 clients", "log.store8")
print()
print("| sync Retrieve, bank 5000 x 784 lse beta 20, 8 clients | calls/s | p50 | p99 |")
print("|---|---|---|---|")
for k in (1, 2, 3):
    row(f"round_robin over {k} replica{'s' if k > 1 else ''}", f"read{k}")
PY
