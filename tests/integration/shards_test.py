#!/usr/bin/env python3
"""A bank in shards behind a router, as separate engramd processes on
loopback: three shard nodes, one router (--role=router) and one single node
holding the same patterns as the reference.

- Through the router, Retrieve and Energy answer as the single node: the same
  nearest ids and stop reasons, states and energies equal up to float
  reassociation (relative 1e-4), and every shard holds part of the bank.
- kill -9 of a shard under concurrent Store load: calls that need it answer
  UNAVAILABLE naming that shard (never a partial answer); once it is
  restarted on its data directory, every Store the router acknowledged is
  there with its exact bytes, and the router answers as a single node
  holding what the shards hold.

  /usr/bin/python3 shards_test.py --engramd build/server/engramd --proto-dir proto
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engram_harness  # noqa: E402

ARGS = None
M = None  # generated modules

DIM = 24
BETA = 6.0
SHARDS = 3


def setUpModule():
    global M
    M = engram_harness.generate_stubs(ARGS.proto_dir, tempfile.mkdtemp(prefix="engram_stubs_"))


class ShardedBankTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="engram_shards_")
        self.shards = [engram_harness.Engramd(ARGS.engramd, os.path.join(self.dir, "shard%d" % i)).start()
                       for i in range(SHARDS)]
        self.router = engram_harness.Engramd(
            ARGS.engramd, os.path.join(self.dir, "router"),
            extra_args=["--role=router", "--shards=" + ",".join(s.target for s in self.shards)]).start()
        self.single = engram_harness.Engramd(ARGS.engramd, os.path.join(self.dir, "single")).start()
        self.channels = []
        self.pb = M["pb"]
        self.via_router = self.stub(self.router)
        self.via_single = self.stub(self.single)

    def tearDown(self):
        for c in self.channels:
            c.close()
        for p in self.shards + [self.router, self.single]:
            p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def stub(self, server):
        channel = server.channel()
        self.channels.append(channel)
        return M["rpc"].MemoryServiceStub(channel)

    def create(self, stub, name):
        pb = self.pb
        return stub.CreateBank(pb.CreateBankRequest(
            name=name, dim=DIM, kind=pb.STATE_KIND_CONTINUOUS,
            energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_LSE, beta=BETA)), timeout=20)

    def store(self, stub, name, x, ids):
        x = np.asarray(x, dtype=np.float32)
        return stub.Store(self.pb.StoreRequest(
            bank=name, patterns=x.ravel().tolist(), ids=ids,
            payloads=[b"p%d" % i for i in ids]), timeout=20)

    def fetch_all(self, stub, name):
        """id -> (pattern bytes, payload), paging through the bank."""
        out, start = {}, 0
        while True:
            page = stub.GetPatterns(self.pb.GetPatternsRequest(
                bank=name, page_start=start, page_size=500), timeout=20)
            x = np.array(page.patterns, dtype=np.float32).reshape(-1, DIM)
            for i, pid in enumerate(page.ids):
                out[pid] = (x[i].tobytes(), page.payloads[i])
            if len(page.ids) == 0 or page.next_page_start == start:
                return out
            start = page.next_page_start

    def assert_answers_as_single(self, name, rng, queries=12, recall=True):
        """Retrieve (SYNC) and Energy through the router equal the single
        node's on noisy copies of stored patterns."""
        pb = self.pb
        held = self.fetch_all(self.via_single, name)
        ids = sorted(held)
        picks = rng.choice(len(ids), size=queries, replace=False)
        base = np.stack([np.frombuffer(held[ids[i]][0], dtype=np.float32) for i in picks])
        q = (base + 0.3 * rng.standard_normal(base.shape)).astype(np.float32)
        req = pb.RetrieveRequest(bank=name, queries=q.ravel().tolist(),
                                 options=pb.RetrieveOptions(dynamics=pb.DYNAMICS_SYNC, max_steps=50))
        a = self.via_router.Retrieve(req, timeout=30).results
        b = self.via_single.Retrieve(req, timeout=30).results
        self.assertEqual(len(a), queries)
        for i, (ra, rb) in enumerate(zip(a, b)):
            self.assertEqual(ra.nearest.id, rb.nearest.id, "query %d" % i)
            self.assertEqual(ra.nearest.payload, rb.nearest.payload)
            self.assertEqual(ra.stop_reason, rb.stop_reason, "query %d" % i)
            np.testing.assert_allclose(np.array(ra.state), np.array(rb.state), rtol=1e-4, atol=1e-5)
            # Noise 0.3 per coordinate at beta 6 falls back into the stored
            # memory while the bank is well below its capacity.
            if recall:
                self.assertEqual(ra.nearest.id, ids[picks[i]], "query %d did not recall its pattern" % i)
        ea = self.via_router.Energy(pb.EnergyRequest(bank=name, states=q.ravel().tolist(),
                                                     return_gradient=True), timeout=20)
        eb = self.via_single.Energy(pb.EnergyRequest(bank=name, states=q.ravel().tolist(),
                                                     return_gradient=True), timeout=20)
        np.testing.assert_allclose(np.array(ea.energies), np.array(eb.energies), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.array(ea.gradients), np.array(eb.gradients), rtol=1e-4, atol=1e-5)

    def test_router_answers_as_one_node_and_every_shard_holds_part(self):
        rng = np.random.default_rng(7)
        self.create(self.via_router, "b")
        self.create(self.via_single, "b")
        k = 150
        x = rng.standard_normal((k, DIM)).astype(np.float32)
        ids = [int(i) for i in rng.choice(1 << 40, size=k, replace=False)]
        for lo in range(0, k, 50):
            self.store(self.via_router, "b", x[lo:lo + 50], ids[lo:lo + 50])
            self.store(self.via_single, "b", x[lo:lo + 50], ids[lo:lo + 50])
        counts = [self.stub(s).GetBank(self.pb.GetBankRequest(name="b"), timeout=10).patterns
                  for s in self.shards]
        self.assertEqual(sum(counts), k)
        self.assertTrue(all(c > 0 for c in counts), counts)
        self.assertEqual(self.via_router.GetBank(self.pb.GetBankRequest(name="b"), timeout=10).patterns, k)
        self.assertEqual(self.fetch_all(self.via_router, "b"), self.fetch_all(self.via_single, "b"))
        self.assert_answers_as_single("b", rng)

    def test_a_shard_killed_under_store_load_is_named_and_loses_no_acknowledged_write(self):
        pb = self.pb
        self.create(self.via_router, "w")
        acked = {}  # id -> pattern bytes, for Stores the router acknowledged
        lock = threading.Lock()
        stop = threading.Event()
        failures = []  # (code, details) of Stores that were not acknowledged

        def writer(seed):
            r = np.random.default_rng(seed)
            stub = self.stub(self.router)
            while not stop.is_set():
                x = r.standard_normal((8, DIM)).astype(np.float32)
                ids = [int(i) for i in r.integers(1, 1 << 50, size=8)]
                try:
                    self.store(stub, "w", x, ids)
                except grpc.RpcError as e:
                    with lock:
                        failures.append((e.code(), e.details()))
                    time.sleep(0.02)
                    continue
                with lock:
                    for i, pid in enumerate(ids):
                        acked[pid] = x[i].tobytes()

        threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                with lock:
                    if len(acked) >= 200:
                        break
                time.sleep(0.02)
            victim = self.shards[1]
            victim.kill()
            # Calls that need the dead shard say which one it is.
            with self.assertRaises(grpc.RpcError) as ctx:
                self.via_router.Retrieve(pb.RetrieveRequest(
                    bank="w", queries=[0.1] * DIM), timeout=20)
            self.assertEqual(ctx.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn("shard 1 (%s)" % victim.target, ctx.exception.details())
            deadline = time.time() + 30
            while time.time() < deadline:
                with lock:
                    if any(code == grpc.StatusCode.UNAVAILABLE for code, _ in failures):
                        break
                time.sleep(0.02)
            victim.start()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        self.assertTrue(len(acked) >= 200, len(acked))
        with lock:
            codes = {code for code, _ in failures}
            named = [d for code, d in failures if code == grpc.StatusCode.UNAVAILABLE]
        # A Store needing the dead shard is refused as UNAVAILABLE naming it;
        # nothing else went wrong.
        self.assertTrue(named, "no Store was refused while a shard was down")
        self.assertLessEqual(codes, {grpc.StatusCode.UNAVAILABLE}, failures[:5])
        self.assertTrue(all("shard 1 (%s)" % victim.target in d for d in named), named[:3])

        # The router dials a restarted shard again within about a second.
        deadline = time.time() + 20
        while True:
            try:
                self.via_router.GetBank(pb.GetBankRequest(name="w"), timeout=5)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                    raise
                time.sleep(0.1)
        held = self.fetch_all(self.via_router, "w")
        lost = [pid for pid in acked if pid not in held]
        self.assertEqual(lost, [], "acknowledged patterns lost after kill -9 of a shard")
        for pid, x in acked.items():
            self.assertEqual(held[pid][0], x, "pattern %d changed" % pid)
            self.assertEqual(held[pid][1], b"p%d" % pid)
        # The router answers as one node holding what the shards hold.
        self.create(self.via_single, "w")
        ids = sorted(held)
        x = np.stack([np.frombuffer(held[i][0], dtype=np.float32) for i in ids])
        for lo in range(0, len(ids), 500):
            self.store(self.via_single, "w", x[lo:lo + 500], ids[lo:lo + 500])
        self.assert_answers_as_single("w", np.random.default_rng(11), recall=False)
        print("\nshard kill -9: acknowledged patterns=%d, held=%d, refused Stores=%d"
              % (len(acked), len(held), len(named)), file=sys.stderr)


class RouterTlsTest(unittest.TestCase):
    def test_tls_from_client_to_router_and_from_router_to_shards(self):
        """Client -> router and router -> shards over TLS (--tls_cert /
        --tls_key on every process, --shard_tls_ca on the router); a router
        dialling TLS shards in plaintext is refused by them and names the
        shard; a CA file that is not PEM stops the router at start."""
        pb = M["pb"]
        d = tempfile.mkdtemp(prefix="engram_shards_tls_")
        procs = []
        try:
            cert, key = engram_harness.make_cert(d)
            pem = open(cert, "rb").read()
            tls = ["--tls_cert", cert, "--tls_key", key]
            shards = []
            for i in range(2):
                shards.append(engram_harness.Engramd(
                    ARGS.engramd, os.path.join(d, "shard%d" % i), extra_args=tls,
                    root_pem=pem).start())
                procs.append(shards[-1])
            addresses = ",".join(s.target for s in shards)
            router = engram_harness.Engramd(
                ARGS.engramd, os.path.join(d, "router"),
                extra_args=["--role=router", "--shards=" + addresses, "--shard_tls_ca", cert] + tls,
                root_pem=pem).start()
            procs.append(router)
            ch = router.channel()
            stub = M["rpc"].MemoryServiceStub(ch)
            stub.CreateBank(pb.CreateBankRequest(
                name="t", dim=DIM, kind=pb.STATE_KIND_CONTINUOUS,
                energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_LSE, beta=BETA)), timeout=20)
            x = np.random.default_rng(5).standard_normal((40, DIM)).astype(np.float32)
            ids = list(stub.Store(pb.StoreRequest(bank="t", patterns=x.ravel().tolist()),
                                  timeout=20).ids)
            counts = [M["rpc"].MemoryServiceStub(s.channel()).GetBank(
                pb.GetBankRequest(name="t"), timeout=10).patterns for s in shards]
            self.assertEqual(sum(counts), 40)
            self.assertTrue(all(c > 0 for c in counts), counts)
            r = stub.Retrieve(pb.RetrieveRequest(bank="t", queries=(x[7] + 0.05).tolist()),
                              timeout=20)
            self.assertEqual(r.results[0].nearest.id, ids[7])
            ch.close()

            plain = engram_harness.Engramd(
                ARGS.engramd, os.path.join(d, "plain"),
                extra_args=["--role=router", "--shards=" + addresses]).start()
            procs.append(plain)
            pch = plain.channel()
            with self.assertRaises(grpc.RpcError) as ctx:
                M["rpc"].MemoryServiceStub(pch).GetBank(pb.GetBankRequest(name="t"), timeout=10)
            self.assertEqual(ctx.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn("shard 0 (%s)" % shards[0].target, ctx.exception.details())
            pch.close()

            bad = os.path.join(d, "bad.pem")
            with open(bad, "w") as f:
                f.write("not a certificate\n")
            p = subprocess.run(
                [ARGS.engramd, "--role=router", "--shards=" + addresses, "--shard_tls_ca", bad,
                 "--listen", "127.0.0.1:0", "--metrics_listen", ""],
                capture_output=True, text=True, timeout=30)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("--shard_tls_ca '%s'" % bad, p.stderr)
        finally:
            for proc in procs:
                proc.kill()
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engramd", required=True)
    parser.add_argument("--proto-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
