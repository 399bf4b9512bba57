#!/usr/bin/env python3
"""Integration tests against real engramd processes on loopback, driven by a
Python client whose stubs are generated from proto/ in the test.

  /usr/bin/python3 engramd_test.py --engramd build/server/engramd \
      --engram build/client/engram --proto-dir proto
"""
import argparse
import json
import os
import re
import random
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import threading
import time
import unittest

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engram_harness  # noqa: E402

ARGS = None
M = None  # generated modules


def setUpModule():
    global M
    out = tempfile.mkdtemp(prefix="engram_stubs_")
    M = engram_harness.generate_stubs(ARGS.proto_dir, out)


class ServerTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="engram_it_")
        self.server = engram_harness.Engramd(ARGS.engramd, os.path.join(self.dir, "data")).start()
        self.channel = self.server.channel()
        self.stub = M["rpc"].MemoryServiceStub(self.channel)
        self.pb = M["pb"]

    def tearDown(self):
        self.channel.close()
        self.server.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self):
        self.channel.close()
        self.server.start()
        self.channel = self.server.channel()
        self.stub = M["rpc"].MemoryServiceStub(self.channel)

    def create(self, name, dim, kind, family=0, beta=0.0, degree=0):
        pb = self.pb
        return self.stub.CreateBank(pb.CreateBankRequest(
            name=name, dim=dim, kind=kind,
            energy=pb.EnergyConfig(family=family, beta=beta, degree=degree)), timeout=10)

    def handled_by_code(self, started=False):
        """{(method, code): count} of grpc_server_handled_total on /metrics
        (with `started`, {method: count} of grpc_server_started_total)."""
        url = "http://127.0.0.1:%d/metrics" % self.server.metrics_port
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out = {}
        name = "grpc_server_started_total" if started else "grpc_server_handled_total"
        for m in re.finditer(r'^%s\{([^}]*)\} (\S+)$' % name, text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            key = labels.get("grpc_method")
            if not started:
                key = (key, labels.get("grpc_code"))
            out[key] = float(m.group(2))
        return out

    def store(self, bank, x, ids=None, payloads=None):
        x = np.asarray(x, dtype=np.float32)
        return self.stub.Store(self.pb.StoreRequest(
            bank=bank, patterns=x.ravel().tolist(), ids=ids or [], payloads=payloads or []),
            timeout=30)


class AnyLanguageTest(ServerTest):
    def test_health_serving(self):
        health = M["health_rpc"].HealthStub(self.channel)
        req = M["health_pb"].HealthCheckRequest(service="")
        self.assertEqual(health.Check(req, timeout=5).status,
                         M["health_pb"].HealthCheckResponse.SERVING)

    def test_reflection_lists_memory_service(self):
        refl = M["refl_rpc"].ServerReflectionStub(self.channel)
        req = M["refl_pb"].ServerReflectionRequest(list_services="")
        names = []
        for resp in refl.ServerReflectionInfo(iter([req]), timeout=5):
            names += [s.name for s in resp.list_services_response.service]
        self.assertIn("engram.v1.MemoryService", names)
        self.assertIn("grpc.health.v1.Health", names)

    def test_create_store_retrieve_from_python(self):
        pb = self.pb
        rng = np.random.default_rng(0)
        n, k = 200, 10
        xi = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32)
        info = self.create("py", n, pb.STATE_KIND_BIPOLAR, pb.ENERGY_FAMILY_CLASSICAL)
        self.assertEqual(info.dim, n)
        self.assertAlmostEqual(info.capacity.patterns, 0.138 * n)
        stored = self.store("py", xi, payloads=[b"p%d" % i for i in range(k)])
        self.assertEqual(len(stored.ids), k)
        # 15 % flipped bits.
        q = xi.copy()
        for row in q:
            idx = rng.choice(n, size=30, replace=False)
            row[idx] *= -1
        resp = self.stub.Retrieve(pb.RetrieveRequest(
            bank="py", queries=q.ravel().tolist(),
            options=pb.RetrieveOptions(dynamics=pb.DYNAMICS_ASYNC, seed=3)), timeout=30)
        self.assertEqual(len(resp.results), k)
        for mu, r in enumerate(resp.results):
            np.testing.assert_array_equal(np.array(r.state, dtype=np.float32), xi[mu])
            self.assertEqual(r.nearest.id, stored.ids[mu])
            self.assertEqual(r.nearest.payload, b"p%d" % mu)
            self.assertEqual(r.stop_reason, pb.STOP_REASON_CONVERGED)
        # Energy matches a numpy reference: -1/2 sum_mu (xi_mu . x)^2.
        x = rng.standard_normal((3, n)).astype(np.float32)
        e = self.stub.Energy(pb.EnergyRequest(bank="py", states=x.ravel().tolist()), timeout=10)
        want = -0.5 * ((x.astype(np.float64) @ xi.T.astype(np.float64)) ** 2).sum(axis=1)
        np.testing.assert_allclose(np.array(e.energies), want, rtol=1e-5)

    def test_lse_energy_and_gradient_match_numpy(self):
        pb = self.pb
        rng = np.random.default_rng(1)
        n, k, beta = 32, 50, 4.0
        xi = rng.standard_normal((k, n)).astype(np.float32)
        self.create("lse", n, pb.STATE_KIND_CONTINUOUS, pb.ENERGY_FAMILY_LSE, beta)
        self.store("lse", xi)
        x = rng.standard_normal((4, n)).astype(np.float32)
        e = self.stub.Energy(pb.EnergyRequest(bank="lse", states=x.ravel().tolist(),
                                              return_gradient=True), timeout=10)
        xd, xid = x.astype(np.float64), xi.astype(np.float64)
        s = beta * xd @ xid.T
        m = s.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True)))[:, 0]
        want = -lse / beta + 0.5 * (xd ** 2).sum(axis=1)
        p = np.exp(s - m)
        p /= p.sum(axis=1, keepdims=True)
        grad = xd - p @ xid
        np.testing.assert_allclose(np.array(e.energies), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(e.gradients).reshape(4, n), grad, rtol=1e-4, atol=1e-4)


class BadInputTest(ServerTest):
    def test_every_class_gets_its_code_and_changes_nothing(self):
        pb = self.pb
        n = 6
        self.create("c", n, pb.STATE_KIND_CONTINUOUS)
        self.create("b", n, pb.STATE_KIND_BIPOLAR)
        self.store("c", np.arange(2 * n, dtype=np.float32).reshape(2, n), ids=[1, 2])
        self.store("b", np.ones((1, n)))

        def snapshot():
            banks = self.stub.ListBanks(pb.ListBanksRequest(), timeout=5).banks
            probe = np.linspace(-1, 1, n).tolist()
            e = self.stub.Energy(pb.EnergyRequest(bank="c", states=probe), timeout=5).energies[0]
            return [(b.name, b.patterns) for b in banks], e

        before = snapshot()
        big = np.zeros(70 * 1024 * 1024 // 4, dtype=np.float32)  # > 64 MiB message
        C = grpc.StatusCode
        cases = [
            ("dimension mismatch", C.INVALID_ARGUMENT, lambda: self.store("c", np.zeros(n + 1))),
            ("NaN", C.INVALID_ARGUMENT, lambda: self.store("c", [0, 1, float("nan"), 0, 0, 0])),
            ("Inf", C.INVALID_ARGUMENT, lambda: self.store("c", [0, 1, float("inf"), 0, 0, 0])),
            ("empty", C.INVALID_ARGUMENT, lambda: self.store("c", [])),
            ("bad name", C.INVALID_ARGUMENT, lambda: self.store("../../etc", np.zeros(n))),
            ("non-bipolar", C.INVALID_ARGUMENT, lambda: self.store("b", np.zeros(n))),
            ("unknown bank", C.NOT_FOUND, lambda: self.store("nope", np.zeros(n))),
            ("existing id", C.ALREADY_EXISTS, lambda: self.store("c", np.zeros((2, n)), ids=[7, 1])),
            ("duplicate bank", C.ALREADY_EXISTS, lambda: self.create("c", n, pb.STATE_KIND_CONTINUOUS)),
            ("unknown enum", C.INVALID_ARGUMENT, lambda: self.create("x", n, 17)),
            ("unspecified kind", C.INVALID_ARGUMENT, lambda: self.create("x", n, 0)),
            ("unknown dynamics", C.INVALID_ARGUMENT, lambda: self.stub.Retrieve(pb.RetrieveRequest(
                bank="c", queries=[0.0] * n, options=pb.RetrieveOptions(dynamics=9)), timeout=5)),
            ("mask out of range", C.INVALID_ARGUMENT, lambda: self.stub.Retrieve(pb.RetrieveRequest(
                bank="c", queries=[0.0] * n, clamp=[True] * (n + 1)), timeout=5)),
            ("async on continuous", C.FAILED_PRECONDITION, lambda: self.stub.Retrieve(pb.RetrieveRequest(
                bank="c", queries=[0.0] * n, options=pb.RetrieveOptions(dynamics=pb.DYNAMICS_ASYNC)),
                timeout=5)),
            ("message size", C.RESOURCE_EXHAUSTED, lambda: self.stub.Store(
                pb.StoreRequest(bank="c", patterns=big), timeout=30)),
            ("delete absent id", C.NOT_FOUND, lambda: self.stub.DeletePatterns(
                pb.DeletePatternsRequest(bank="c", ids=[1, 99]), timeout=5)),
        ]
        for what, code, call in cases:
            with self.subTest(what):
                with self.assertRaises(grpc.RpcError) as ctx:
                    call()
                self.assertEqual(ctx.exception.code(), code, ctx.exception.details())
                self.assertTrue(ctx.exception.details())
                self.assertEqual(snapshot(), before)


    def test_undecodable_requests_get_invalid_argument_and_change_nothing(self):
        """Bytes that are not the request message never reach Engram's
        handlers: every method answers INVALID_ARGUMENT naming the request
        type (not the UNIMPLEMENTED that gRPC 1.51's callback handlers send),
        and counts the call under that code; an unknown method is
        UNIMPLEMENTED."""
        pb = self.pb
        self.create("raw", 4, pb.STATE_KIND_CONTINUOUS)
        cases = [
            ("Store", b"\x12\xff\xff\xff\xff\x0f"),   # packed floats longer than the message
            ("CreateBank", b"\x0a\x02\xc3\x28"),        # name that is not UTF-8
            ("Retrieve", b"\xff\xff"),                    # invalid tag
            ("DeletePatterns", b"\x0a\x03raw\x12\x01"),  # truncated packed ids
        ]
        before = self.handled_by_code()
        for method, body in cases:
            call = self.channel.unary_unary("/engram.v1.MemoryService/" + method)
            with self.subTest(method):
                with self.assertRaises(grpc.RpcError) as ctx:
                    call(body, timeout=5)
                self.assertEqual(ctx.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
                self.assertIn("engram.v1.%sRequest" % method, ctx.exception.details())
        # A call is counted when the server finishes it, which may be just
        # after the client has its status: wait (bounded) for the counts.
        keys = [(method, "InvalidArgument") for method, _ in cases]
        give_up = time.monotonic() + 10
        while True:
            after = self.handled_by_code()
            if all(after.get(k, 0) - before.get(k, 0) >= 1 for k in keys) or \
                    time.monotonic() > give_up:
                break
            time.sleep(0.05)
        for key in keys:
            self.assertEqual(after.get(key, 0) - before.get(key, 0), 1, key)
        with self.assertRaises(grpc.RpcError) as ctx:
            self.channel.unary_unary("/engram.v1.MemoryService/Frobnicate")(b"", timeout=5)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        banks = self.stub.ListBanks(pb.ListBanksRequest(), timeout=5).banks
        self.assertEqual([(b.name, b.patterns) for b in banks], [("raw", 0)])

    def test_calls_past_their_deadline_are_counted_once_with_their_code(self):
        """Retrieve and Store calls with deadlines too short to be served:
        every call the server saw start (grpc_server_started_total) is
        counted once in grpc_server_handled_total, under the code it ended
        with there: OK, DEADLINE_EXCEEDED, or CANCELLED when the client's
        deadline passed (and the client left) before the server's own
        deadline did; never UNIMPLEMENTED or INVALID_ARGUMENT. A call whose
        deadline passes in the client before it is sent never reaches the
        server and is in neither count."""
        pb = self.pb
        n, k = 256, 2000
        rng = np.random.default_rng(5)
        self.create("slow", n, pb.STATE_KIND_CONTINUOUS, pb.ENERGY_FAMILY_LSE, beta=0.5)
        self.store("slow", rng.standard_normal((k, n)) / np.sqrt(n))
        before = self.handled_by_code()
        started_before = self.handled_by_code(started=True)
        seen = {}
        calls = {"Retrieve": 0, "Store": 0}
        futures = []
        for i in range(60):
            timeout = (0.0005, 0.002, 0.1)[i % 3]
            q = rng.standard_normal(8 * n).astype(np.float32).tolist()
            futures.append(("Retrieve", self.stub.Retrieve.future(pb.RetrieveRequest(
                bank="slow", queries=q, options=pb.RetrieveOptions(max_steps=50)), timeout=timeout)))
            futures.append(("Store", self.stub.Store.future(pb.StoreRequest(
                bank="slow", patterns=rng.standard_normal(n).astype(np.float32).tolist()),
                timeout=timeout)))
        for method, f in futures:
            calls[method] += 1
            try:
                f.result()
                code = "OK"
            except grpc.RpcError as e:
                code = {grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded"}.get(e.code(), e.code())
            seen[(method, code)] = seen.get((method, code), 0) + 1
        self.assertTrue(set(code for _, code in seen) <= {"OK", "DeadlineExceeded"}, seen)
        # The server counts a call when it ends there, which may be after
        # the client gave up on it.
        stop = time.monotonic() + 20
        while True:
            after = self.handled_by_code()
            started = self.handled_by_code(started=True)
            delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
            totals = {m: sum(v for (mm, _), v in delta.items() if mm == m) for m in calls}
            starts = {m: started.get(m, 0) - started_before.get(m, 0) for m in calls}
            if totals == starts or time.monotonic() > stop:
                break
            time.sleep(0.2)
        self.assertEqual(totals, starts, delta)
        for m in calls:
            self.assertLessEqual(starts[m], calls[m])
            self.assertGreater(starts[m], 0, starts)
        codes = {key: v for key, v in delta.items() if key[0] in calls and v}
        self.assertEqual(set(c for _, c in codes) - {"OK", "DeadlineExceeded", "Canceled"}, set(),
                         codes)


class DurabilityTest(ServerTest):
    """kill -9 at random moments under concurrent Store, DeletePatterns,
    CreateBank and DeleteBank traffic; after every restart the server holds
    exactly the acknowledged state, give or take each client's one call that
    was in flight (which must have happened wholly or not at all)."""

    SHARED_DIM = 32
    OWN_DIM = 16
    KILL_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)

    def test_acknowledged_writes_survive_kill9(self):
        pb = self.pb
        self.create("shared", self.SHARED_DIM, pb.STATE_KIND_CONTINUOUS)
        # The acknowledged state: bank -> {id: (pattern bytes, payload)}.
        model = {"shared": {}}
        dims = {"shared": self.SHARED_DIM}
        counts = dict(stores=0, patterns=0, deletes=0, deleted=0, creates=0, bank_deletes=0)
        errors = []
        lock = threading.Lock()
        stop = threading.Event()
        clients = 4

        def client(no, cycle, pending):
            """One client's sequential traffic; `pending` receives the call in
            flight when the server died."""
            r = np.random.default_rng(cycle * 100 + no)
            stub = M["rpc"].MemoryServiceStub(self.server.channel())
            own_prefix = "e%d-" % no
            serial = cycle * 1_000_000
            while not stop.is_set():
                with lock:
                    own = sorted(b for b in model if b.startswith(own_prefix))
                    mine = {b: [i for i in model[b] if i // 10**12 == no + 1]
                            for b in ["shared"] + own}
                roll = r.random()
                serial += 1
                if roll < 0.12 and len(own) < 3:
                    op = ("create", "%s%d" % (own_prefix, serial))
                    call = lambda: stub.CreateBank(pb.CreateBankRequest(
                        name=op[1], dim=self.OWN_DIM, kind=pb.STATE_KIND_CONTINUOUS), timeout=5)
                elif roll < 0.22 and own:
                    op = ("drop", own[int(r.integers(len(own)))])
                    call = lambda: stub.DeleteBank(pb.DeleteBankRequest(name=op[1]), timeout=5)
                elif roll < 0.40 and any(mine.values()):
                    bank = str(r.choice([b for b in mine if mine[b]]))
                    ids = [int(i) for i in r.choice(mine[bank], size=min(len(mine[bank]),
                                                    int(r.integers(1, 6))), replace=False)]
                    op = ("delete", bank, ids)
                    call = lambda: stub.DeletePatterns(pb.DeletePatternsRequest(
                        bank=op[1], ids=op[2]), timeout=5)
                else:
                    bank = "shared" if not own or r.random() < 0.6 else own[int(r.integers(len(own)))]
                    n = dims.get(bank, self.OWN_DIM)
                    k = int(r.integers(1, 20))
                    ids = [(no + 1) * 10**12 + serial * 100 + i for i in range(k)]
                    x = r.standard_normal((k, n)).astype(np.float32)
                    x[0, 0] = -0.0
                    x[-1, -1] = np.float32(1e-40)  # subnormal: bits must survive too
                    payloads = [r.bytes(int(r.integers(0, 12))) for _ in range(k)]
                    op = ("store", bank, {pid: (x[i].tobytes(), payloads[i])
                                          for i, pid in enumerate(ids)})
                    call = lambda: stub.Store(pb.StoreRequest(
                        bank=op[1], patterns=x.ravel().tolist(), ids=ids, payloads=payloads),
                        timeout=5)
                pending[no] = op
                try:
                    call()
                except grpc.RpcError as e:
                    if e.code() not in self.KILL_CODES:
                        errors.append("%s: %s %s" % (op[0], e.code(), e.details()))
                    return
                with lock:
                    self.apply(model, dims, op, counts)
                pending[no] = None

        cycles = ARGS.kill_cycles
        for cycle in range(cycles):
            stop.clear()
            pending = [None] * clients
            threads = [threading.Thread(target=client, args=(c, cycle, pending))
                       for c in range(clients)]
            for t in threads:
                t.start()
            time.sleep(random.Random(cycle).uniform(0.3, 1.2))
            self.server.kill()
            stop.set()
            for t in threads:
                t.join(timeout=30)
            self.assertEqual(errors, [])
            self.restart()  # fails the test if the server does not come back
            health = M["health_rpc"].HealthStub(self.channel)
            self.assertEqual(health.Check(M["health_pb"].HealthCheckRequest(), timeout=5).status,
                             M["health_pb"].HealthCheckResponse.SERVING)
            got = self.fetch_everything()
            # Each client's in-flight call happened wholly or not at all.
            for op in pending:
                if op is None:
                    continue
                kind, name = op[0], op[1]
                if kind == "store":
                    present = [pid in got.get(name, {}) for pid in op[2]]
                    self.assertTrue(all(present) or not any(present),
                                    "half of an unacknowledged Store batch is present")
                    if all(present):
                        self.apply(model, dims, op, counts)
                elif kind == "delete":
                    present = [pid in got.get(name, {}) for pid in op[2]]
                    self.assertTrue(all(present) or not any(present),
                                    "half of an unacknowledged DeletePatterns happened")
                    if not any(present):
                        self.apply(model, dims, op, counts)
                elif kind == "create" and name in got:
                    self.apply(model, dims, op, counts)
                elif kind == "drop" and name not in got:
                    self.apply(model, dims, op, counts)
            lost = sum(1 for b in model for pid in model[b] if pid not in got.get(b, {}))
            self.assertEqual(lost, 0, "acknowledged patterns lost after kill -9")
            self.assertEqual(sorted(got), sorted(model), "bank set differs from the acknowledged one")
            for b in model:
                self.assertEqual(sorted(got[b]), sorted(model[b]),
                                 "bank %s: ids differ (deleted ids back, or extra ids)" % b)
                for pid, (bits, payload) in model[b].items():
                    self.assertEqual(got[b][pid], (bits, payload),
                                     "bank %s id %d not bit for bit" % (b, pid))
        self.assertGreater(counts["patterns"], 0)
        print("\nkill -9 cycles=%d clients=%d acknowledged: stores=%d (patterns=%d) "
              "deletes=%d (patterns=%d) creates=%d bank_deletes=%d; lost=0 torn=0 resurrected=0"
              % (cycles, clients, counts["stores"], counts["patterns"], counts["deletes"],
                 counts["deleted"], counts["creates"], counts["bank_deletes"]), file=sys.stderr)

    @staticmethod
    def apply(model, dims, op, counts):
        kind, name = op[0], op[1]
        if kind == "store":
            model[name].update(op[2])
            counts["stores"] += 1
            counts["patterns"] += len(op[2])
        elif kind == "delete":
            for pid in op[2]:
                del model[name][pid]
            counts["deletes"] += 1
            counts["deleted"] += len(op[2])
        elif kind == "create":
            model[name] = {}
            dims[name] = DurabilityTest.OWN_DIM
            counts["creates"] += 1
        elif kind == "drop":
            del model[name]
            counts["bank_deletes"] += 1

    def fetch_everything(self):
        """bank -> {id: (pattern bytes, payload)} for every bank."""
        out = {}
        for info in self.stub.ListBanks(self.pb.ListBanksRequest(), timeout=10).banks:
            out[info.name] = self.fetch_all(info.name, info.dim, with_payloads=True)
        return out

    def fetch_all(self, bank, n, with_payloads=False):
        """Every stored pattern, id -> float32 vector (or (bytes, payload)),
        paging through the bank."""
        pb = self.pb
        out = {}
        start = 0
        while True:
            page = self.stub.GetPatterns(pb.GetPatternsRequest(
                bank=bank, page_start=start, page_size=5000), timeout=30)
            x = np.array(page.patterns, dtype=np.float32).reshape(-1, n)
            for i, pid in enumerate(page.ids):
                out[pid] = (x[i].tobytes(), page.payloads[i]) if with_payloads else x[i]
            if page.next_page_start == start or len(page.ids) == 0:
                return out
            start = page.next_page_start


class BackupTest(ServerTest):
    fetch_all = DurabilityTest.fetch_all

    def test_snapshot_under_write_load_restores_the_acknowledged_state(self):
        pb = self.pb
        n = 24
        self.create("snap", n, pb.STATE_KIND_CONTINUOUS)
        acked, attempted = {}, {}
        lock = threading.Lock()
        stop = threading.Event()

        def writer(seed):
            r = np.random.default_rng(seed)
            stub = M["rpc"].MemoryServiceStub(self.server.channel())
            b = 0
            while not stop.is_set():
                ids = [seed * 1_000_000 + b * 10 + i for i in range(5)]
                x = r.standard_normal((5, n)).astype(np.float32)
                with lock:
                    for i, pid in enumerate(ids):
                        attempted[pid] = (tuple(ids), x[i])
                stub.Store(pb.StoreRequest(bank="snap", patterns=x.ravel().tolist(), ids=ids),
                           timeout=10)
                with lock:
                    for i, pid in enumerate(ids):
                        acked[pid] = x[i]
                b += 1

        threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2, 3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        with lock:
            acked_before = set(acked)
        resp = self.stub.Backup(pb.BackupRequest(file="snap1.db"), timeout=60)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        self.assertTrue(resp.path.endswith(os.path.join("backups", "snap1.db")), resp.path)
        self.assertEqual(resp.banks, 1)
        self.assertGreater(resp.bytes, 0)
        total_after = len(self.fetch_all("snap", n))
        # Bad names and reuse.
        for name, code in (("../x", grpc.StatusCode.INVALID_ARGUMENT),
                           ("Upper", grpc.StatusCode.INVALID_ARGUMENT),
                           ("snap1.db", grpc.StatusCode.ALREADY_EXISTS)):
            with self.assertRaises(grpc.RpcError) as ctx:
                self.stub.Backup(pb.BackupRequest(file=name), timeout=10)
            self.assertEqual(ctx.exception.code(), code, name)
        # Restore into a fresh data directory.
        restored = engram_harness.Engramd(ARGS.engramd, os.path.join(self.dir, "restored"),
                                          extra_args=["--restore_from", resp.path]).start()
        try:
            ch = restored.channel()
            self.stub_restored = M["rpc"].MemoryServiceStub(ch)
            stub, self.stub = self.stub, self.stub_restored
            got = self.fetch_all("snap", n)
            self.stub = stub
            ch.close()
        finally:
            restored.kill()
        self.assertTrue(acked_before <= set(got), "an acknowledged write is missing")
        self.assertLess(len(got), total_after, "the snapshot should predate later writes")
        for pid, x in got.items():
            self.assertIn(pid, acked, "snapshot holds a write never acknowledged")
            self.assertEqual(x.tobytes(), acked[pid].tobytes())
            batch_ids, _ = attempted[pid]
            self.assertTrue(all(b in got for b in batch_ids), "half a batch in the snapshot")
        # Restoring over an existing database is refused.
        p = subprocess.run([ARGS.engramd, "--data_dir", self.server.data_dir, "--listen",
                            "127.0.0.1:%d" % engram_harness.free_port(), "--metrics_listen", "",
                            "--restore_from", resp.path], capture_output=True, text=True, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("restore_from", p.stdout + p.stderr)


class SecurityTest(unittest.TestCase):
    """TLS from PEM files and a bearer token from a file; health stays open."""

    def test_tls_and_token(self):
        d = tempfile.mkdtemp(prefix="engram_sec_")
        try:
            cert, key = engram_harness.make_cert(d)
            token_file = os.path.join(d, "token")
            with open(token_file, "w") as f:
                f.write("tok-%d\n" % os.getpid())
            server = engram_harness.Engramd(
                ARGS.engramd, os.path.join(d, "data"),
                extra_args=["--tls_cert", cert, "--tls_key", key, "--auth_token_file", token_file],
                root_pem=open(cert, "rb").read()).start()
            try:
                ch = server.channel()
                pb = M["pb"]
                stub = M["rpc"].MemoryServiceStub(ch)
                health = M["health_rpc"].HealthStub(ch)
                self.assertEqual(health.Check(M["health_pb"].HealthCheckRequest(), timeout=5).status,
                                 M["health_pb"].HealthCheckResponse.SERVING)
                req = pb.CreateBankRequest(name="s", dim=2, kind=pb.STATE_KIND_CONTINUOUS)
                for md in ([], [("authorization", "Bearer nope")]):
                    with self.assertRaises(grpc.RpcError) as ctx:
                        stub.CreateBank(req, metadata=md, timeout=5)
                    self.assertEqual(ctx.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
                good = [("authorization", "Bearer tok-%d" % os.getpid())]
                stub.CreateBank(req, metadata=good, timeout=5)
                self.assertEqual(len(stub.ListBanks(pb.ListBanksRequest(), metadata=good,
                                                    timeout=5).banks), 1)
                # The token never reaches the log.
                self.assertNotIn("tok-%d" % os.getpid(), open(server.log_path).read())
                # The CLI with --tls-ca and ENGRAM_TOKEN.
                p = subprocess.run([ARGS.engram, "--target", "localhost:%d" % server.port,
                                    "--tls-ca", cert, "--json", "bank", "list"],
                                   env=dict(os.environ, ENGRAM_TOKEN="tok-%d" % os.getpid()),
                                   capture_output=True, text=True, timeout=30)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertIn('"name":"s"', p.stdout)
                ch.close()
            finally:
                server.kill()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_bad_tls_files_are_named_in_the_error(self):
        """engramd refuses to start on a file that is not a PEM certificate or
        key, naming the file; a corrupt PEM body is reported as a TLS refusal
        naming both files."""
        d = tempfile.mkdtemp(prefix="engram_badtls_")
        try:
            cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                 "-out", cert, "-days", "1", "-subj", "/CN=localhost"],
                check=True, capture_output=True)
            junk = os.path.join(d, "junk.pem")
            with open(junk, "w") as f:
                f.write("not a certificate\n")
            corrupt = os.path.join(d, "corrupt.pem")
            with open(cert) as f:
                lines = f.read().splitlines()
            with open(corrupt, "w") as f:  # PEM armour around a damaged body
                f.write("\n".join([lines[0], "AAAA" + lines[1][4:]] + lines[2:]) + "\n")

            def run(cert_file, key_file):
                return subprocess.run(
                    [ARGS.engramd, "--listen", "127.0.0.1:%d" % engram_harness.free_port(),
                     "--data_dir", os.path.join(d, "data"), "--metrics_listen", "",
                     "--tls_cert", cert_file, "--tls_key", key_file],
                    capture_output=True, text=True, timeout=30)
            p = run(junk, key)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("--tls_cert '%s' holds no PEM certificate" % junk, p.stderr)
            p = run(cert, junk)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("--tls_key '%s' holds no PEM private key" % junk, p.stderr)
            p = run(corrupt, key)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("the TLS library refused the certificate '%s'" % corrupt, p.stderr)
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engramd", required=True)
    parser.add_argument("--engram", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--kill-cycles", type=int, default=int(os.environ.get("ENGRAM_KILL_CYCLES", "3")))
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
