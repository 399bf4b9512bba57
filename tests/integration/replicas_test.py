#!/usr/bin/env python3
"""A replica group on a replicated write log: three engramd replicas whose
writes go through one JetStream stream of a three-node NATS cluster, all as
processes on loopback.

- Writes through any replica apply on every replica in the same order: the
  same automatic ids, the same bytes; a read with min_sequence sees every
  write up to that sequence on any replica; bad input is refused before it
  reaches the log.
- kill -9 of a replica under write load loses no acknowledged write: once
  restarted it catches up and holds what the others hold.
- One NATS node down: writes go on. Two down: writes fail UNAVAILABLE and
  reads go on; with the nodes back, writes go on again.
- A new replica started from a Backup snapshot catches up from the log
  position the snapshot recorded.
- A client spreading calls with gRPC's round_robin policy reads its writes
  through every replica.

  /usr/bin/python3 replicas_test.py --engramd build/server/engramd --proto-dir proto
"""
import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engram_harness  # noqa: E402

ARGS = None
M = None  # generated modules

DIM = 16
# Reads wait at most this long for their min_sequence (engramd flag).
MIN_SEQUENCE_WAIT_MS = 5000


def setUpModule():
    global M
    M = engram_harness.generate_stubs(ARGS.proto_dir, tempfile.mkdtemp(prefix="engram_stubs_"))


class ReplicaGroupTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="engram_replicas_")
        self.pb = M["pb"]
        self.channels = []
        self.nats = engram_harness.NatsCluster(self.dir).start()
        self.replicas = []
        for i in range(3):
            self.replicas.append(self.start_replica(os.path.join(self.dir, "r%d" % i)))
        self.stubs = [self.stub(r) for r in self.replicas]

    def tearDown(self):
        for c in self.channels:
            c.close()
        for r in self.replicas:
            r.kill()
        self.nats.stop()
        if not os.environ.get("ENGRAM_KEEP_TEST_DIRS"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def start_replica(self, data_dir, extra=()):
        r = engram_harness.Engramd(
            ARGS.engramd, data_dir,
            extra_args=["--log=" + self.nats.urls, "--log_stream=GROUP",
                        "--log_publish_timeout_ms=2000",
                        "--min_sequence_wait_ms=%d" % MIN_SEQUENCE_WAIT_MS,
                        "--writer_threads=4", "--expire_interval_ms=200"] + list(extra))
        r.start(timeout=60)
        self.wait_serving(r)
        return r

    def wait_serving(self, replica, timeout=60):
        stub = self.stub(replica)
        deadline = time.time() + timeout
        while True:
            try:
                stub.ListBanks(self.pb.ListBanksRequest(), timeout=5)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                    raise
                time.sleep(0.1)

    def stub(self, replica):
        ch = replica.channel()
        self.channels.append(ch)
        return M["rpc"].MemoryServiceStub(ch)

    def create_bank(self, stub, name="mem", **kw):
        return stub.CreateBank(self.pb.CreateBankRequest(
            name=name, dim=DIM, kind=self.pb.STATE_KIND_CONTINUOUS, **kw), timeout=30)

    def rows(self, n, seed):
        return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)

    def wait_applied(self, stub, sequence, timeout=60):
        """Waits (bounded) until the replica behind `stub` has applied
        `sequence`; each read waits at most --min_sequence_wait_ms."""
        deadline = time.time() + timeout
        while True:
            try:
                stub.ListBanks(self.pb.ListBanksRequest(), timeout=5)
                stub.GetBank(self.pb.GetBankRequest(name="mem", min_sequence=sequence), timeout=30)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                    raise
                time.sleep(0.1)

    def contents(self, stub, bank="mem", min_sequence=0):
        """id -> (pattern bytes, payload) of every pattern, read page by page."""
        out, start = {}, 0
        while True:
            page = stub.GetPatterns(self.pb.GetPatternsRequest(
                bank=bank, page_start=start, page_size=500, min_sequence=min_sequence), timeout=30)
            pats = np.asarray(page.patterns, dtype=np.float32).reshape(-1, page.dim)
            for i, pid in enumerate(page.ids):
                out[pid] = (pats[i].tobytes(), page.payloads[i])
            if page.next_page_start == start or len(page.ids) == 0:
                return out
            start = page.next_page_start

    def test_writes_through_any_replica_apply_everywhere_in_one_order(self):
        pb = self.pb
        created = self.create_bank(self.stubs[0])
        self.assertGreater(created.sequence, 0)
        acked = {}  # id -> (bytes, payload)
        last = created.sequence
        order = []
        for k in range(24):
            stub = self.stubs[k % 3]
            x = self.rows(2, k)
            payloads = [b"p%d-%d" % (k, j) for j in range(2)]
            r = stub.Store(pb.StoreRequest(bank="mem", patterns=x.ravel().tolist(),
                                           payloads=payloads), timeout=30)
            self.assertGreater(r.sequence, last, "sequences grow with each acknowledged write")
            last = r.sequence
            order += list(r.ids)
            for j, pid in enumerate(r.ids):
                acked[pid] = (x[j].tobytes(), payloads[j])
            # Read-your-writes on the other replicas, at once.
            for other in (self.stubs[(k + 1) % 3], self.stubs[(k + 2) % 3]):
                got = other.GetPatterns(pb.GetPatternsRequest(
                    bank="mem", ids=list(r.ids), min_sequence=r.sequence), timeout=30)
                self.assertEqual(list(got.ids), list(r.ids))
                self.assertEqual(np.asarray(got.patterns, np.float32).tobytes(), x.tobytes())
        # Automatic ids follow the log's order: 1, 2, 3, ... whichever replica took the call.
        self.assertEqual(order, list(range(1, len(order) + 1)))

        # Refused by the request's own fault: a clear code, nothing published.
        before = self.stubs[1].GetBank(pb.GetBankRequest(name="mem", min_sequence=last)).sequence
        with self.assertRaises(grpc.RpcError) as e:
            self.stubs[1].Store(pb.StoreRequest(bank="mem", patterns=[1.0] * (DIM + 1)))
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(grpc.RpcError) as e:
            self.stubs[1].Store(pb.StoreRequest(bank="mem", patterns=[float("nan")] * DIM))
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(self.stubs[1].GetBank(pb.GetBankRequest(name="mem")).sequence, before)
        # Refused by the bank's state: the entry is in the log and every
        # replica refuses it alike.
        with self.assertRaises(grpc.RpcError) as e:
            self.stubs[2].Store(pb.StoreRequest(bank="mem", patterns=self.rows(1, 99).ravel().tolist(),
                                                ids=[3]), timeout=30)
        self.assertEqual(e.exception.code(), grpc.StatusCode.ALREADY_EXISTS)

        deleted = self.stubs[2].DeletePatterns(pb.DeletePatternsRequest(bank="mem", ids=[1, 5]),
                                               timeout=30)
        self.assertEqual(deleted.deleted, 2)
        del acked[1], acked[5]
        # After a delete of the highest id, an automatic id is still new on every replica.
        top = max(acked)
        self.stubs[0].DeletePatterns(pb.DeletePatternsRequest(bank="mem", ids=[top]), timeout=30)
        del acked[top]
        r = self.stubs[1].Store(pb.StoreRequest(bank="mem", patterns=self.rows(1, 7).ravel().tolist()),
                                timeout=30)
        self.assertEqual(list(r.ids), [top + 1])
        acked[top + 1] = (self.rows(1, 7)[0].tobytes(), b"")

        views = [self.contents(s, min_sequence=r.sequence) for s in self.stubs]
        for v in views:
            self.assertEqual(v, acked)

        # Recall answers alike on every replica (the same bank, bit for bit;
        # states compared at 1e-6 relative).
        q = self.rows(3, 1234).ravel().tolist()
        answers = [s.Retrieve(pb.RetrieveRequest(bank="mem", queries=q, min_sequence=r.sequence),
                              timeout=30) for s in self.stubs]
        for a in answers[1:]:
            for x, y in zip(a.results, answers[0].results):
                self.assertEqual(x.nearest.id, y.nearest.id)
                np.testing.assert_allclose(x.state, y.state, rtol=1e-6, atol=1e-7)

        # A sequence no write has reached: UNAVAILABLE naming where the replica is.
        t = time.time()
        with self.assertRaises(grpc.RpcError) as e:
            self.stubs[0].GetPatterns(pb.GetPatternsRequest(bank="mem", ids=[2],
                                                            min_sequence=r.sequence + 1000),
                                      timeout=60)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("applied the write log up to", e.exception.details())
        self.assertGreaterEqual(time.time() - t, MIN_SEQUENCE_WAIT_MS / 1000 * 0.9)

    def test_expiry_is_one_log_entry_applied_alike(self):
        pb = self.pb
        self.create_bank(self.stubs[0], name="ttl")
        r = self.stubs[1].Store(pb.StoreRequest(bank="ttl", patterns=self.rows(3, 3).ravel().tolist(),
                                                ttl_seconds=1), timeout=30)
        keep = self.stubs[2].Store(pb.StoreRequest(bank="ttl",
                                                   patterns=self.rows(1, 4).ravel().tolist()),
                                   timeout=30)
        expires = set()
        for s in self.stubs:
            got = s.GetPatterns(pb.GetPatternsRequest(bank="ttl", ids=list(r.ids),
                                                      min_sequence=keep.sequence), timeout=30)
            expires.add(tuple(got.expires_unix_ms))
        self.assertEqual(len(expires), 1, "every replica computed the same expiry times")
        deadline = time.time() + 30
        while True:
            sizes = [s.GetBank(pb.GetBankRequest(name="ttl")).patterns for s in self.stubs]
            if sizes == [1, 1, 1]:
                break
            self.assertLess(time.time(), deadline, "expired patterns not deleted: %s" % sizes)
            time.sleep(0.2)
        seqs = [s.GetBank(pb.GetBankRequest(name="ttl")).sequence for s in self.stubs]
        top = max(seqs)
        views = [self.contents(s, bank="ttl", min_sequence=top) for s in self.stubs]
        self.assertEqual(list(views[0]), list(keep.ids))
        self.assertTrue(all(v == views[0] for v in views))

    def write_load(self, stubs, seconds, threads=4, per_call=2):
        """Concurrent Stores with distinct explicit ids through `stubs` (a
        callable giving the stub list now); returns (acked id -> bytes,
        highest acknowledged sequence, error codes)."""
        pb = self.pb
        acked, codes = {}, {}
        top = [0]
        lock = threading.Lock()
        stop = time.time() + seconds

        def writer(t):
            n = 0
            while time.time() < stop:
                ids = [t * 10_000_000 + n * per_call + j + 1 for j in range(per_call)]
                x = self.rows(per_call, ids[0])
                current = stubs()
                stub = current[n % len(current)]
                n += 1
                try:
                    r = stub.Store(pb.StoreRequest(bank="mem", patterns=x.ravel().tolist(), ids=ids),
                                   timeout=15)
                    with lock:
                        for j, pid in enumerate(ids):
                            acked[pid] = x[j].tobytes()
                        top[0] = max(top[0], r.sequence)
                except grpc.RpcError as e:
                    with lock:
                        codes[e.code()] = codes.get(e.code(), 0) + 1
                    time.sleep(0.05)

        ts = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        return ts, acked, top, codes

    def test_kill9_replica_under_write_load_loses_nothing_and_catches_up(self):
        pb = self.pb
        self.create_bank(self.stubs[0])
        up = {"stubs": [self.stubs[0], self.stubs[1]]}
        ts, acked, top, codes = self.write_load(lambda: up["stubs"], seconds=4.0)
        time.sleep(1.0)
        self.replicas[1].kill()
        time.sleep(1.0)
        restarted = self.start_replica(self.replicas[1].data_dir)
        self.replicas[1] = restarted
        self.stubs[1] = self.stub(restarted)
        for t in ts:
            t.join()
        self.assertGreater(len(acked), 20, "the load acknowledged writes")
        unexpected = {c: n for c, n in codes.items()
                      if c not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)}
        self.assertEqual(unexpected, {}, "only the killed replica's calls may fail")
        for s in self.stubs:
            self.wait_applied(s, top[0])
        views = [self.contents(s, min_sequence=top[0]) for s in self.stubs]
        for i, v in enumerate(views):
            missing = [pid for pid in acked if pid not in v]
            self.assertEqual(missing, [], "replica %d lost acknowledged writes" % i)
            for pid, b in acked.items():
                self.assertEqual(v[pid][0], b)
        self.assertEqual(views[1], views[0], "the restarted replica holds what the others hold")
        self.assertEqual(views[2], views[0])

    def test_nats_node_loss_one_writes_go_on_two_writes_fail_reads_go_on(self):
        pb = self.pb
        self.create_bank(self.stubs[0])
        first = self.stubs[0].Store(pb.StoreRequest(bank="mem",
                                                    patterns=self.rows(4, 1).ravel().tolist()),
                                    timeout=30)
        self.nats.kill_node(0)
        # Writes go on once the stream's leader is elected among the two left.
        deadline = time.time() + 30
        n = 0
        last = first
        while n < 10:
            try:
                last = self.stubs[n % 3].Store(
                    pb.StoreRequest(bank="mem", patterns=self.rows(1, 100 + n).ravel().tolist()),
                    timeout=15)
                n += 1
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
                if "is in the log as sequence" in e.details():
                    # The write went on: it is in the log and every replica
                    # will apply it; this replica's apply lags (its consumer
                    # moves off the killed node), which a slow machine shows.
                    n += 1
                    continue
                self.assertEqual(n, 0, "once writes went on with one node down, they keep going")
                self.assertLess(time.time(), deadline, "writes did not resume with one node down")
                time.sleep(0.2)
        self.nats.kill_node(1)
        with self.assertRaises(grpc.RpcError) as e:
            self.stubs[1].Store(pb.StoreRequest(bank="mem", patterns=self.rows(1, 7).ravel().tolist()),
                                timeout=30)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("quorum", e.exception.details())
        # Reads go on on every replica, up to the last acknowledged write.
        for s in self.stubs:
            v = self.contents(s, min_sequence=last.sequence)
            self.assertTrue(set(first.ids) | set(last.ids) <= set(v))
            s.Retrieve(pb.RetrieveRequest(bank="mem", queries=self.rows(1, 5).ravel().tolist()),
                       timeout=30)
        self.nats.start_node(0)
        self.nats.start_node(1)
        deadline = time.time() + 60
        while True:
            try:
                r = self.stubs[2].Store(pb.StoreRequest(bank="mem",
                                                        patterns=self.rows(1, 8).ravel().tolist()),
                                        timeout=15)
                break
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
                self.assertLess(time.time(), deadline, "writes did not resume with the nodes back")
                time.sleep(0.3)
        # Every replica catches up once its reading of the stream is back
        # (a consumer on a killed node is re-created after a silence).
        for s in self.stubs:
            self.wait_applied(s, r.sequence)
        views = [self.contents(s, min_sequence=r.sequence) for s in self.stubs]
        self.assertTrue(all(v == views[0] for v in views))

    def test_new_replica_bootstraps_from_backup_and_the_log(self):
        pb = self.pb
        self.create_bank(self.stubs[0])
        last = None
        for k in range(10):
            last = self.stubs[k % 3].Store(pb.StoreRequest(
                bank="mem", patterns=self.rows(3, k).ravel().tolist()), timeout=30)
        backup = self.stubs[0].Backup(pb.BackupRequest(file="snap"), timeout=60)
        with sqlite3.connect(backup.path) as db:
            (recorded,) = db.execute("SELECT value FROM meta WHERE key = 'log_seq'").fetchone()
        self.assertGreaterEqual(recorded, last.sequence, "the snapshot records its log position")
        for k in range(10, 20):
            last = self.stubs[k % 3].Store(pb.StoreRequest(
                bank="mem", patterns=self.rows(3, k).ravel().tolist()), timeout=30)
        self.stubs[1].DeletePatterns(pb.DeletePatternsRequest(bank="mem", ids=[2, 40]), timeout=30)
        fresh = self.start_replica(os.path.join(self.dir, "r3"),
                                   extra=["--restore_from=" + backup.path])
        self.replicas.append(fresh)
        stub = self.stub(fresh)
        top = self.stubs[1].GetBank(pb.GetBankRequest(name="mem")).sequence
        self.wait_applied(stub, top)
        self.assertEqual(self.contents(stub, min_sequence=top),
                         self.contents(self.stubs[0], min_sequence=top))
        self.assertNotIn(2, self.contents(stub))

    def test_a_replica_behind_a_trimmed_log_stops_with_a_clear_error(self):
        pb = self.pb
        self.create_bank(self.stubs[0])
        self.replicas[2].kill()
        last = None
        for k in range(5):
            last = self.stubs[k % 2].Store(pb.StoreRequest(
                bank="mem", patterns=self.rows(1, k).ravel().tolist()), timeout=30)
        # The log drops the entries the dead replica has not applied.
        reply = json.loads(self.nats.request("$JS.API.STREAM.PURGE.GROUP", b"{}"))
        self.assertTrue(reply.get("success"), reply)
        restarted = engram_harness.Engramd(ARGS.engramd, self.replicas[2].data_dir,
                                           extra_args=self.replicas[2].extra_args)
        restarted.start(timeout=60)
        self.replicas[2] = restarted
        stub = self.stub(restarted)
        deadline = time.time() + 60
        while True:
            try:
                stub.ListBanks(pb.ListBanksRequest(), timeout=5)
                details = ""
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE)
                details = e.details()
            if "no longer holds entry" in details:
                break
            self.assertLess(time.time(), deadline, "the replica did not notice the trimmed log")
            time.sleep(0.2)
        self.assertIn("--restore_from", details)
        # The replicas that applied everything go on.
        r = self.stubs[0].Store(pb.StoreRequest(bank="mem", patterns=self.rows(1, 9).ravel().tolist()),
                                timeout=30)
        self.assertGreater(r.sequence, last.sequence)

    def test_round_robin_client_reads_its_writes_through_every_replica(self):
        pb = self.pb
        self.create_bank(self.stubs[0])
        target = "ipv4:" + ",".join(r.target for r in self.replicas)
        ch = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
        self.channels.append(ch)
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = M["rpc"].MemoryServiceStub(ch)
        last_seq = 0
        for k in range(30):
            x = self.rows(1, k)
            r = stub.Store(pb.StoreRequest(bank="mem", patterns=x.ravel().tolist()), timeout=30)
            got = stub.GetPatterns(pb.GetPatternsRequest(bank="mem", ids=list(r.ids),
                                                         min_sequence=r.sequence), timeout=30)
            self.assertEqual(np.asarray(got.patterns, np.float32).tobytes(), x.tobytes())
            last_seq = r.sequence
        for r in self.replicas:
            self.wait_applied(self.stub(r), last_seq)
            text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % r.metrics_port,
                                          timeout=10).read().decode()
            served = [line for line in text.splitlines()
                      if line.startswith("grpc_server_handled_total")
                      and 'grpc_method="GetPatterns"' in line]
            self.assertTrue(served and any(float(s.split()[-1]) > 0 for s in served),
                            "replica %s served none of the reads" % r.target)
            series = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith("engram_write_log_") and "{" in line
                      and "_bucket" not in line}
            self.assertEqual(series.get("engram_write_log_up"), 1.0)
            self.assertGreaterEqual(series.get("engram_write_log_applied_sequence", 0), last_seq)


class RoutedReplicaGroupsTest(unittest.TestCase):
    """The router of part 1 over two shards, each a replica group of two on
    its own stream: reads through the router see every write acknowledged
    through it, whichever replica answers, and a replica's death is
    survived by its group."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="engram_routed_replicas_")
        self.pb = M["pb"]
        self.channels = []
        self.nats = engram_harness.NatsCluster(self.dir).start()
        self.groups = []
        for g in range(2):
            group = []
            for r in range(2):
                e = engram_harness.Engramd(
                    ARGS.engramd, os.path.join(self.dir, "g%dr%d" % (g, r)),
                    extra_args=["--log=" + self.nats.urls, "--log_stream=SHARD%d" % g,
                                "--log_publish_timeout_ms=2000", "--writer_threads=4",
                                "--min_sequence_wait_ms=%d" % MIN_SEQUENCE_WAIT_MS])
                group.append(e.start(timeout=60))
            self.groups.append(group)
        shards = ",".join("|".join(r.target for r in group) for group in self.groups)
        self.router = engram_harness.Engramd(
            ARGS.engramd, os.path.join(self.dir, "router"),
            extra_args=["--role=router", "--shards=" + shards]).start(timeout=60)
        self.via_router = self.stub(self.router)
        deadline = time.time() + 60
        while True:
            try:
                for group in self.groups:
                    for r in group:
                        self.stub(r).ListBanks(self.pb.ListBanksRequest(), timeout=5)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                    raise
                time.sleep(0.1)

    def tearDown(self):
        for c in self.channels:
            c.close()
        self.router.kill()
        for group in self.groups:
            for r in group:
                r.kill()
        self.nats.stop()
        if not os.environ.get("ENGRAM_KEEP_TEST_DIRS"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def stub(self, replica):
        ch = replica.channel()
        self.channels.append(ch)
        return M["rpc"].MemoryServiceStub(ch)

    def served(self, replica, method):
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % replica.metrics_port,
                                      timeout=10).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("grpc_server_handled_total")
                   and 'grpc_method="%s"' % method in line)

    def round_trip(self, k):
        """Store two patterns through the router, then read and recall them
        through it at once."""
        pb = self.pb
        x = np.random.default_rng(k).standard_normal((2, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        r = self.via_router.Store(pb.StoreRequest(bank="mem", patterns=x.ravel().tolist()),
                                  timeout=30)
        got = self.via_router.GetPatterns(pb.GetPatternsRequest(bank="mem", ids=list(r.ids)),
                                          timeout=30)
        self.assertEqual(list(got.ids), list(r.ids))
        self.assertEqual(np.asarray(got.patterns, np.float32).tobytes(), x.tobytes())
        rec = self.via_router.Retrieve(pb.RetrieveRequest(bank="mem", queries=x.ravel().tolist()),
                                       timeout=30)
        self.assertEqual([q.nearest.id for q in rec.results], list(r.ids))
        return r

    def test_reads_through_the_router_see_its_writes_on_any_replica(self):
        pb = self.pb
        self.via_router.CreateBank(pb.CreateBankRequest(
            name="mem", dim=DIM, kind=pb.STATE_KIND_CONTINUOUS,
            energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_LSE, beta=50.0)), timeout=30)
        for k in range(20):
            self.round_trip(k)
        for group in self.groups:
            for r in group:
                self.assertGreater(self.served(r, "Steps") + self.served(r, "GetPatterns"), 0,
                                   "replica %s served none of the router's reads" % r.target)
        # A node honours the router's least sequence in the call's metadata.
        with self.assertRaises(grpc.RpcError) as e:
            self.stub(self.groups[0][0]).GetBank(
                pb.GetBankRequest(name="mem"), timeout=60,
                metadata=(("engram-min-sequence", str(10**9)),))
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)

        # One replica of shard 0 dies: its group goes on through the other.
        self.groups[0][0].kill()
        deadline = time.time() + 30
        ok = 0
        k = 100
        while ok < 10:
            k += 1
            try:
                self.round_trip(k)
                ok += 1
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
                self.assertEqual(ok, 0, "once calls went on without the dead replica, they keep going")
                self.assertLess(time.time(), deadline, "shard 0 did not go on with one replica")
                time.sleep(0.2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engramd", required=True)
    parser.add_argument("--proto-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest)
