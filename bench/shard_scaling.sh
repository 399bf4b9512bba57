#!/usr/bin/env bash
# A bank in shards: Energy and sync Retrieve through `engramd --role=router`
# over 1, 2 and 4 shard processes, against one node holding the whole bank,
# in one run on loopback. Bank: 20 000 Fashion-MNIST training images (784
# dims, normalised), lse beta 20; queries: 2 000 unseen test images. Load:
# `engram load`, 8 clients, Energy (one state a call) and Retrieve (to
# convergence) in separate runs. Prints calls/s, p50 latency, and the bytes
# the router moves per step (states out, partials back; from the message
# sizes, not measured on the wire).
#
# On a machine with fewer cores than processes every shard, the router and
# the load generator share the same cores: the numbers then show the cost of
# the router hop and the merge (the 1-shard row against the node), not the
# bandwidth gained by splitting a pass, which needs one machine per shard.
#
# With a separation (sparsemax, entmax15, max, log_sum_relu) the bank's
# energy is the general family with the dot similarity and that separation
# at the same beta: sparsemax and 1.5-entmax take two requests per step
# through a router (candidates, then the sums at the whole bank's
# threshold).
#
#   bash bench/shard_scaling.sh [seconds per load run, default 10] [separation]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
SEPARATION=${2:-}
ENERGY_ARGS=(--energy lse)
if [ -n "$SEPARATION" ]; then
  ENERGY_ARGS=(--energy general --similarity dot --separation "$SEPARATION")
fi
ENGRAMD=build/server/engramd
E=build/client/engram
PY=/usr/bin/python3
D=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
Q=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
BASE=${ENGRAM_BENCH_PORT:-50980}
DATA=$(mktemp -d /tmp/engram_shards.XXXXXX)
PIDS=()
stop() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap 'stop; rm -rf "$DATA"' EXIT

wait_up() {
  for _ in $(seq 100); do "$E" --target "$1" --timeout 1 health >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "no server on $1" >&2; cat "$DATA"/*.log >&2; exit 1
}

# run <label> <target>: fills the bank through <target>, then the two loads.
run() {
  local label=$1 target=$2
  "$E" --target "$target" bank create fashion --dim 784 --kind continuous "${ENERGY_ARGS[@]}" \
      --beta 20 >/dev/null
  "$E" --target "$target" store fashion "$D" --limit 20000 --normalize --batch 2000 >/dev/null
  for rpc in energy retrieve; do
    "$E" --target "$target" load fashion --concurrency 8 --duration "$SECS" --warmup 2 \
        --mix "$rpc=1" --data "$Q" --limit 2000 --normalize --seed 3 --format json \
        >"$DATA/$label.$rpc.json"
  done
}

# One node with the whole bank.
"$ENGRAMD" --listen "127.0.0.1:$BASE" --data_dir "$DATA/node" --metrics_listen "" \
    >"$DATA/node.log" 2>&1 &
PIDS+=($!)
wait_up "127.0.0.1:$BASE"
run node "127.0.0.1:$BASE"
stop

# Shards behind a router; "1nb": one shard, the router's batching of
# concurrent sync Retrieves off (--batching=false), for the A/B.
for shards in 1 2 4 1nb; do
  extra=""
  if [ "$shards" = 1nb ]; then extra="--batching=false"; fi
  count=${shards%nb}
  list=""
  for i in $(seq 0 $((count - 1))); do
    port=$((BASE + 1 + i))
    "$ENGRAMD" --listen "127.0.0.1:$port" --data_dir "$DATA/s$shards.$i" --metrics_listen "" \
        >"$DATA/s$shards.$i.log" 2>&1 &
    PIDS+=($!)
    list="$list${list:+,}127.0.0.1:$port"
  done
  for i in $(seq 0 $((count - 1))); do wait_up "127.0.0.1:$((BASE + 1 + i))"; done
  "$ENGRAMD" --role=router --shards="$list" --listen "127.0.0.1:$((BASE + 10))" \
      --metrics_listen "" $extra >"$DATA/router$shards.log" 2>&1 &
  PIDS+=($!)
  wait_up "127.0.0.1:$((BASE + 10))"
  run "shards$shards" "127.0.0.1:$((BASE + 10))"
  stop
done

"$PY" - "$DATA" "${SEPARATION:-}" <<'PY'
import json, os, sys
d = sys.argv[1]
sep = sys.argv[2]
n = 784
energy = f"general dot {sep}" if sep else "lse"
print(f"{os.cpu_count()} cores shared by every process; bank 20000 x {n}, {energy} beta 20, 8 clients")
print()
print("| bank held by | Energy calls/s | Energy p50 | Retrieve calls/s | Retrieve p50 | bytes per step per state |")
print("|---|---|---|---|---|---|")
for label, shards in (("node", 0), ("shards1", 1), ("shards2", 2), ("shards4", 4),
                      ("shards1nb", 1)):
    e = json.load(open(f"{d}/{label}.energy.json"))
    r = json.load(open(f"{d}/{label}.retrieve.json"))
    # Each step: the state to every shard (4N) and a partial back (~90 B,
    # plus the weighted sum 4N on Retrieve steps).
    # Sparsemax / 1.5-entmax: a second request per step (the state again,
    # the sums back) and 8 bytes per candidate row in the first reply.
    rounds = 2 if sep in ("sparsemax", "entmax15") else 1
    per_step = "-" if shards == 0 else f"{rounds * shards * (8 * n + 90)}"
    name = "one node" if shards == 0 else f"router + {shards} shard{'s' if shards > 1 else ''}"
    if label.endswith("nb"):
        name += ", router batching off"
    print(f"| {name} | {e['achieved_rate']:.0f} | {e['latency_seconds']['p50'] * 1e3:.2f} ms "
          f"| {r['achieved_rate']:.0f} | {r['latency_seconds']['p50'] * 1e3:.2f} ms | {per_step} |")
    errors = e["errors"] + r["errors"]
    if errors:
        print(f"  ({label}: {errors} failed calls)")
PY
