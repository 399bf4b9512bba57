#!/usr/bin/env python3
"""Restart time of engramd with a large data directory.

Fills a data directory with --gib GiB of pattern data (continuous banks of
dimension --dim, written with `engram store` from .npy files), stops the
server, then restarts it --runs times and measures, from the moment the
process is spawned:
  - listening: the gRPC port accepts connections;
  - serving:   grpc.health.v1 reports SERVING (every bank loaded);
and checks that before SERVING the health status is NOT_SERVING and
MemoryService calls fail with UNAVAILABLE, never with partial data.

  /usr/bin/python3 bench/recovery_time.py --engramd build/server/engramd \
      --engram build/client/engram --gib 1 [--keep DIR]

The page cache is left warm (the data was just written, or read by the
previous run); a cold-cache restart additionally pays the disk read.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))
import engram_harness  # noqa: E402
import grpc  # noqa: E402


def fill(args, server, data_dir):
    banks = 4
    per_bank = int(args.gib * (1 << 30) / 4 / args.dim / banks)
    rng = np.random.default_rng(1)
    tmp = os.path.join(os.path.dirname(data_dir), "npy")
    os.makedirs(tmp, exist_ok=True)
    for b in range(banks):
        name = "bank%d" % b
        subprocess.run([args.engram, "--target", server.target, "bank", "create", name,
                        "--dim", str(args.dim), "--kind", "continuous"],
                       check=True, stdout=subprocess.DEVNULL)
        path = os.path.join(tmp, name + ".npy")
        np.save(path, rng.standard_normal((per_bank, args.dim), dtype=np.float32))
        t = time.monotonic()
        subprocess.run([args.engram, "--target", server.target, "--timeout", "600", "store", name,
                        path, "--batch", "4096"], check=True, stdout=subprocess.DEVNULL)
        print("  %s: %d patterns of N=%d stored in %.1f s" % (
            name, per_bank, args.dim, time.monotonic() - t), file=sys.stderr)
        os.remove(path)
    shutil.rmtree(tmp)
    return banks * per_bank


def measure(args, M, data_dir, expected):
    server = engram_harness.Engramd(args.engramd, data_dir)
    os.makedirs(data_dir, exist_ok=True)
    log = open(server.log_path, "ab")
    t0 = time.monotonic()
    server.proc = subprocess.Popen(
        [server.binary, "--listen", server.target, "--data_dir", data_dir,
         "--metrics_listen", "127.0.0.1:%d" % server.metrics_port],
        stdout=log, stderr=subprocess.STDOUT)
    server.log = log
    # The port opening is timed with plain TCP connects: a gRPC channel
    # created before the server listens backs off for seconds.
    while True:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.002)
    listening = time.monotonic() - t0
    channel = server.channel()
    health = M["health_rpc"].HealthStub(channel)
    stub = M["rpc"].MemoryServiceStub(channel)
    hpb = M["health_pb"]
    not_serving_seen = 0
    unavailable_seen = 0
    while True:
        try:
            status = health.Check(hpb.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            time.sleep(0.005)
            continue
        now = time.monotonic() - t0
        if status == hpb.HealthCheckResponse.SERVING:
            serving = now
            break
        not_serving_seen += 1
        try:
            # Loading can finish between the health check and this call; an
            # answer must then hold every bank in full.
            banks = stub.ListBanks(M["pb"].ListBanksRequest(), timeout=1).banks
            if expected is not None and sum(b.patterns for b in banks) != expected:
                raise AssertionError("MemoryService answered with part of the banks")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise AssertionError("expected UNAVAILABLE while loading, got %s" % e.code())
            unavailable_seen += 1
        time.sleep(0.005)
    banks = stub.ListBanks(M["pb"].ListBanksRequest(), timeout=10).banks
    rss_kib = 0
    with open("/proc/%d/status" % server.proc.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    channel.close()
    assert server.terminate() == 0
    return dict(listening_s=listening, serving_s=serving, not_serving_checks=not_serving_seen,
                unavailable_calls=unavailable_seen, patterns=sum(b.patterns for b in banks),
                bank_bytes=sum(b.bytes for b in banks), rss_mib=rss_kib / 1024)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engramd", required=True)
    p.add_argument("--engram", required=True)
    p.add_argument("--proto-dir", default=os.path.join(os.path.dirname(__file__), "..", "proto"))
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--keep", help="data directory to reuse (filled only if empty)")
    args = p.parse_args()
    M = engram_harness.generate_stubs(args.proto_dir, tempfile.mkdtemp(prefix="engram_stubs_"))
    root = args.keep or tempfile.mkdtemp(prefix="engram_recovery_")
    data_dir = os.path.join(root, "data")
    try:
        if not os.path.exists(os.path.join(data_dir, "engram.db")):
            print("filling %s with %.2f GiB of patterns" % (data_dir, args.gib), file=sys.stderr)
            server = engram_harness.Engramd(args.engramd, data_dir).start(timeout=60)
            fill(args, server, data_dir)
            assert server.terminate(timeout=120) == 0
        disk = sum(os.path.getsize(os.path.join(data_dir, f)) for f in os.listdir(data_dir)
                   if f.startswith("engram.db"))
        runs = []
        expected = None
        for i in range(args.runs):
            r = measure(args, M, data_dir, expected)
            expected = r["patterns"]
            print("  run %d: listening after %.3f s, SERVING after %.2f s (%d NOT_SERVING checks, "
                  "%d UNAVAILABLE calls), %d patterns, RSS %.0f MiB" % (
                      i + 1, r["listening_s"], r["serving_s"], r["not_serving_checks"],
                      r["unavailable_calls"], r["patterns"], r["rss_mib"]), file=sys.stderr)
            runs.append(r)
        summary = dict(database_bytes=disk, bank_bytes=runs[0]["bank_bytes"],
                       patterns=runs[0]["patterns"], dim=args.dim,
                       serving_s_median=statistics.median(r["serving_s"] for r in runs),
                       serving_s=[round(r["serving_s"], 3) for r in runs],
                       listening_s=[round(r["listening_s"], 3) for r in runs],
                       not_serving_before_loaded=all(r["not_serving_checks"] > 0 for r in runs),
                       rss_mib=round(runs[-1]["rss_mib"]))
        print(json.dumps(summary, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
