#!/usr/bin/env python3
"""A small Engram client in Python: create a bank, store patterns, recall one
from a corrupted copy, draw samples, then clean up.

Needs the engram-client package (client/python), installed for the Python
that runs this file, e.g. with Debian's python3-grpcio, python3-grpc-tools,
python3-numpy and python3-venv:

  python3 -m venv --system-site-packages venv
  venv/bin/pip install --no-build-isolation client/python
  venv/bin/python client/python/engram_example.py --target 127.0.0.1:50051

Set ENGRAM_TOKEN if the server requires a bearer token. Exit code 0 when the
corrupted pattern is recalled exactly, 1 when it is not or a call fails, 2
when engram_client cannot be imported.
"""
import argparse
import os
import sys

import numpy as np

try:
    import engram_client
except ImportError as e:
    sys.stderr.write("engram_example.py needs the engram-client package (%s); install it with\n"
                     "  pip install --no-build-isolation client/python\n"
                     "(see client/python/README.md)\n" % e)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.environ.get("ENGRAM_TARGET", "127.0.0.1:50051"))
    ap.add_argument("--bank", default="python-example")
    args = ap.parse_args()

    with engram_client.Client(args.target, token=os.environ.get("ENGRAM_TOKEN") or None,
                              timeout=10) as client:
        n, k = 256, 12
        rng = np.random.default_rng(0)
        patterns = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32)

        # 1. A bipolar bank with the polynomial (n = 3) dense energy.
        info = client.create_bank(args.bank, n, "bipolar", energy="polynomial", degree=3)
        print("created %s: N=%d, capacity %.0f patterns (%s)"
              % (info.name, info.dim, info.capacity.patterns, info.capacity.formula))
        try:
            # 2. Store: one atomic, durable batch; payloads say what each memory is.
            ids = client.store(args.bank, patterns,
                               payloads=["pattern-%d" % i for i in range(k)])
            print("stored %d patterns, ids %s" % (len(ids), ids.tolist()))

            # 3. Retrieve pattern 5 from a copy with 20 % of its bits flipped.
            query = patterns[5].copy()
            query[rng.choice(n, size=n // 5, replace=False)] *= -1
            [result] = client.retrieve(args.bank, query, dynamics="async", return_trace=True)
            exact = np.array_equal(result.state, patterns[5])
            print("recalled %s (id %d) in %d sweeps, exact=%s, energy %s"
                  % (result.nearest.payload.decode(), result.nearest.id, result.steps, exact,
                     " -> ".join("%.0f" % e for e in result.energy_trace)))

            # 4. Sample: annealed AM from random states lands on memories.
            samples = client.sample(args.bank, count=4, seed=1, schedule="geometric",
                                    sigma_max=30, sigma_min=1, steps=40, timeout=30).samples
            for s in samples:
                print("sample: SAMPLE_CLASS_%s, nearest %s%s"
                      % (s.sample_class.upper(), s.nearest.payload.decode(),
                         " (mirrored)" if s.mirrored else ""))
            return 0 if exact else 1
        finally:
            client.delete_bank(args.bank)


if __name__ == "__main__":
    sys.exit(main())
