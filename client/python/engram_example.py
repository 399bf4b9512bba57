#!/usr/bin/env python3
"""A small Engram client in Python: create a bank, store patterns, recall one
from a corrupted copy, draw samples, then clean up.

Needs Debian's python3-grpcio and python3-numpy (run with /usr/bin/python3),
plus protoc and grpc_python_plugin (protobuf-compiler, protobuf-compiler-grpc)
to generate the stubs from proto/ on first use:

  /usr/bin/python3 client/python/engram_example.py --target 127.0.0.1:50051

Set ENGRAM_TOKEN if the server requires a bearer token.
"""
import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

import grpc
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def load_stubs(out_dir):
    """Generates engram/v1 stubs into out_dir (once) and imports them."""
    if not os.path.exists(os.path.join(out_dir, "engram", "v1", "engram_pb2.py")):
        os.makedirs(out_dir, exist_ok=True)
        plugin = shutil.which("grpc_python_plugin") or "/usr/bin/grpc_python_plugin"
        subprocess.run(["protoc", "-I", PROTO_DIR, "--python_out", out_dir, "--grpc_out", out_dir,
                        "--plugin=protoc-gen-grpc=" + plugin, "engram/v1/engram.proto"], check=True)
        for d in ("engram", os.path.join("engram", "v1")):
            open(os.path.join(out_dir, d, "__init__.py"), "a").close()
    sys.path.insert(0, out_dir)
    return (importlib.import_module("engram.v1.engram_pb2"),
            importlib.import_module("engram.v1.engram_pb2_grpc"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.environ.get("ENGRAM_TARGET", "127.0.0.1:50051"))
    ap.add_argument("--bank", default="python-example")
    ap.add_argument("--stubs", default=os.path.join(tempfile.gettempdir(), "engram_py_stubs"))
    args = ap.parse_args()
    pb, rpc = load_stubs(args.stubs)
    metadata = []
    if os.environ.get("ENGRAM_TOKEN"):
        metadata.append(("authorization", "Bearer " + os.environ["ENGRAM_TOKEN"]))

    with grpc.insecure_channel(args.target) as channel:
        stub = rpc.MemoryServiceStub(channel)
        n, k = 256, 12
        rng = np.random.default_rng(0)
        patterns = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32)

        # 1. A bipolar bank with the polynomial (n = 3) dense energy.
        info = stub.CreateBank(pb.CreateBankRequest(
            name=args.bank, dim=n, kind=pb.STATE_KIND_BIPOLAR,
            energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_POLYNOMIAL, degree=3)),
            metadata=metadata, timeout=10)
        print("created %s: N=%d, capacity %.0f patterns (%s)"
              % (info.name, info.dim, info.capacity.patterns, info.capacity.formula))
        try:
            # 2. Store: one atomic, durable batch; payloads say what each memory is.
            stored = stub.Store(pb.StoreRequest(
                bank=args.bank, patterns=patterns.ravel().tolist(),
                payloads=[("pattern-%d" % i).encode() for i in range(k)]),
                metadata=metadata, timeout=10)
            print("stored %d patterns, ids %s" % (len(stored.ids), list(stored.ids)))

            # 3. Retrieve pattern 5 from a copy with 20 % of its bits flipped.
            query = patterns[5].copy()
            query[rng.choice(n, size=n // 5, replace=False)] *= -1
            result = stub.Retrieve(pb.RetrieveRequest(
                bank=args.bank, queries=query.tolist(),
                options=pb.RetrieveOptions(dynamics=pb.DYNAMICS_ASYNC, return_trace=True)),
                metadata=metadata, timeout=10).results[0]
            exact = np.array_equal(np.array(result.state, dtype=np.float32), patterns[5])
            print("recalled %s (id %d) in %d sweeps, exact=%s, energy %s"
                  % (result.nearest.payload.decode(), result.nearest.id, result.steps, exact,
                     " -> ".join("%.0f" % e for e in result.energy_trace)))

            # 4. Sample: annealed AM from random states lands on memories.
            samples = stub.Sample(pb.SampleRequest(
                bank=args.bank, count=4, seed=1,
                schedule=pb.Schedule(kind=pb.SCHEDULE_KIND_GEOMETRIC, sigma_max=30, sigma_min=1,
                                     steps=40)), metadata=metadata, timeout=30).samples
            for s in samples:
                print("sample: %s, nearest %s%s" % (pb.SampleClass.Name(s.sample_class),
                                                    s.nearest.payload.decode(),
                                                    " (mirrored)" if s.mirrored else ""))
            return 0 if exact else 1
        finally:
            stub.DeleteBank(pb.DeleteBankRequest(name=args.bank), metadata=metadata, timeout=10)


if __name__ == "__main__":
    sys.exit(main())
