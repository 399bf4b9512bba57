#!/usr/bin/env python3
"""The `engram` CLI end to end against a real engramd: every file format,
corruption options, JSON output checked against numpy, exit codes, and a
graceful SIGTERM.
"""
import argparse
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engram_harness  # noqa: E402

ARGS = None


def write_idx_gz(path, array_u8):
    """IDX: magic 0x00 0x00 type ndim, big-endian dims, then the data."""
    dims = array_u8.shape
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, len(dims)]))
        for d in dims:
            f.write(struct.pack(">I", d))
        f.write(array_u8.astype(np.uint8).tobytes())


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="engram_cli_")
        cls.server = engram_harness.Engramd(ARGS.engramd, os.path.join(cls.dir, "data")).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.kill()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def engram(self, *args, expect=0):
        p = subprocess.run([ARGS.engram, "--target", self.server.target] + list(args),
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, expect, "engram %s\nstdout: %s\nstderr: %s"
                         % (" ".join(args), p.stdout, p.stderr))
        return p

    def json(self, *args):
        return json.loads(self.engram("--json", *args).stdout)

    def test_bipolar_bank_from_every_format(self):
        rng = np.random.default_rng(11)
        n, k = 256, 12
        xi = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32)
        npy = os.path.join(self.dir, "xi.npy")
        np.save(npy, xi)
        csv = os.path.join(self.dir, "xi.csv")
        np.savetxt(csv, xi, delimiter=",", fmt="%g")
        # IDX of 0/255 pixels; --binarize maps them back to the same +-1.
        idx = os.path.join(self.dir, "xi-idx3-ubyte.gz")
        write_idx_gz(idx, ((xi > 0) * 255).reshape(k, 16, 16))
        labels = os.path.join(self.dir, "labels-idx1-ubyte.gz")
        write_idx_gz(labels, np.arange(k, dtype=np.uint8) % 10)

        for name, path, extra in (("fnpy", npy, []), ("fcsv", csv, []),
                                  ("fidx", idx, ["--binarize", "--labels", labels])):
            info = self.json("bank", "create", name, "--dim", str(n), "--kind", "bipolar",
                             "--energy", "polynomial", "--degree", "3")
            self.assertEqual(info["dim"], n)
            self.assertEqual(info["kind"], "STATE_KIND_BIPOLAR")
            stored = self.json("store", name, path, *extra)
            self.assertEqual(stored["stored"], k)
            out = os.path.join(self.dir, name + "_back.npy")
            self.engram("get", name, "--out", out)
            back = np.load(out)
            self.assertEqual(back.dtype, np.float32)
            self.assertEqual(back.tobytes(), xi.tobytes(), name)

            r = self.json("retrieve", name, path, *[e for e in extra if e != "--labels" and e != labels],
                          "--flip", "0.15", "--seed", "4")
            self.assertEqual(r["queries"], k)
            self.assertEqual(r["recovered"], k, name)
            r = self.json("retrieve", name, path, *[e for e in extra if e != "--labels" and e != labels],
                          "--mask-fraction", "0.5", "--dynamics", "async", "--seed", "5")
            self.assertEqual(r["recovered"], k, name)
        got = self.json("get", "fidx", "3")
        self.assertEqual(got["ids"], [3])
        text = self.engram("get", "fidx", "3").stdout
        self.assertIn('payload="2"', text)  # label of row 2 (ids start at 1)

    def test_energy_json_matches_numpy(self):
        rng = np.random.default_rng(2)
        n, k, beta = 16, 40, 3.0
        xi = rng.standard_normal((k, n)).astype(np.float32)
        np.save(os.path.join(self.dir, "g.npy"), xi)
        self.json("bank", "create", "gauss", "--dim", str(n), "--kind", "continuous",
                  "--energy", "gaussian", "--beta", str(beta))
        self.json("store", "gauss", os.path.join(self.dir, "g.npy"))
        x = rng.standard_normal((5, n)).astype(np.float32)
        np.save(os.path.join(self.dir, "x.npy"), x)
        e = self.json("energy", "gauss", os.path.join(self.dir, "x.npy"))
        d2 = ((x[:, None, :].astype(np.float64) - xi[None, :, :]) ** 2).sum(-1)
        a = -beta * d2 / 2
        m = a.max(axis=1, keepdims=True)
        want = -(m[:, 0] + np.log(np.exp(a - m).sum(axis=1))) / beta
        np.testing.assert_allclose(np.array(e["energies"]), want, rtol=1e-5, atol=1e-5)

    def test_values_labels_and_filters_match_numpy(self):
        rng = np.random.default_rng(5)
        n, k, m, beta = 12, 30, 4, 5.0
        xi = (0.5 * rng.standard_normal((k, n))).astype(np.float32)
        v = rng.standard_normal((k, m)).astype(np.float32)
        cls = (np.arange(k) % 3).astype(np.float32).reshape(-1, 1)
        for name, arr in (("kv_x", xi), ("kv_v", v), ("kv_c", cls)):
            np.save(os.path.join(self.dir, name + ".npy"), arr)
        info = self.json("bank", "create", "kv", "--dim", str(n), "--energy", "lse", "--beta",
                         str(beta), "--value-dim", str(m), "--ttl", "3600")
        self.assertEqual(info["value_dim"], m)
        self.assertEqual(info["ttl_seconds"], "3600")
        self.json("store", "kv", os.path.join(self.dir, "kv_x.npy"), "--values",
                  os.path.join(self.dir, "kv_v.npy"), "--labels", os.path.join(self.dir, "kv_c.npy"),
                  "--label-key", "digit")
        x = (0.5 * rng.standard_normal((3, n))).astype(np.float32)
        np.save(os.path.join(self.dir, "kv_q.npy"), x)
        for expr, keep in (("digit#=1", cls[:, 0] == 1), ("digit#=0|2", cls[:, 0] != 1),
                           ("digit#=1..2", cls[:, 0] >= 1)):
            e = self.json("energy", "kv", os.path.join(self.dir, "kv_q.npy"), "--filter", expr)
            s = beta * x.astype(np.float64) @ xi[keep].T.astype(np.float64)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            want = p @ v[keep].astype(np.float64)
            np.testing.assert_allclose(np.array(e["values"]).reshape(3, m), want, rtol=1e-5,
                                       atol=1e-6, err_msg=expr)
            lse = s.max(axis=1) + np.log(np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1))
            want_e = -lse / beta + 0.5 * (x.astype(np.float64) ** 2).sum(axis=1)
            np.testing.assert_allclose(np.array(e["energies"]), want_e, rtol=1e-5, atol=1e-5)
        # Novelty: the mid-rank of each state's energy among the stored patterns' energies.
        far = np.full((1, n), 4.0, dtype=np.float32)
        np.save(os.path.join(self.dir, "kv_far.npy"), np.concatenate([xi[:1], far]))
        e = self.json("energy", "kv", os.path.join(self.dir, "kv_far.npy"), "--novelty")

        def lse(states):
            s = beta * states.astype(np.float64) @ xi.T.astype(np.float64)
            top = s.max(axis=1)
            return (-(top + np.log(np.exp(s - top[:, None]).sum(axis=1))) / beta
                    + 0.5 * (states.astype(np.float64) ** 2).sum(axis=1))
        ref = lse(xi)
        for i, st in enumerate(np.concatenate([xi[:1], far])):
            want = ((ref < lse(st[None])[0]).sum() + 0.5 * (ref == lse(st[None])[0]).sum()) / k
            self.assertAlmostEqual(e["novelty"][i], want, delta=1.0 / k)
        self.assertEqual(e["novelty"][1], 1.0)
        p = self.engram("retrieve", "kv", os.path.join(self.dir, "kv_q.npy"), "--filter",
                        "digit#=7", expect=1)
        self.assertIn("FAILED_PRECONDITION", p.stderr)
        p = self.engram("retrieve", "kv", os.path.join(self.dir, "kv_q.npy"), "--filter",
                        "digit#=x", expect=1)
        self.assertIn("not an integer", p.stderr)

    def test_sample_memorizes_and_writes_pngs(self):
        n, k = 64, 4
        xi = np.zeros((k, n), dtype=np.float32)
        for mu in range(k):
            xi[mu, mu * 16:(mu + 1) * 16] = 3.0  # well separated 8x8 "images"
        np.save(os.path.join(self.dir, "img.npy"), xi)
        self.json("bank", "create", "imgs", "--dim", str(n), "--kind", "continuous",
                  "--energy", "gaussian")
        self.json("store", "imgs", os.path.join(self.dir, "img.npy"))
        grid = os.path.join(self.dir, "grid.png")
        strip = os.path.join(self.dir, "strip.png")
        out = self.json("sample", "imgs", "--count", "12", "--sigma-max", "20", "--steps", "32",
                        "--seed", "9", "--png", grid, "--png-trajectory", strip,
                        "--trajectory-every", "8", "--stream")
        self.assertEqual(out["memorized"], 12)
        samples = out["response"]["samples"]
        for smp in samples:
            state = np.array(smp["state"], dtype=np.float32)
            mu = int(smp["nearest"]["id"]) - 1
            np.testing.assert_allclose(state, xi[mu], atol=1e-3)
        for path in (grid, strip):
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        # Same seed, same samples; another seed, other trajectories.
        again = self.json("sample", "imgs", "--count", "12", "--sigma-max", "20", "--steps", "32",
                          "--seed", "9")
        self.assertEqual([s_["state"] for s_ in again["response"]["samples"]],
                         [s_["state"] for s_ in samples])
        self.engram("sample", "imgs", "--sampler", "nope", expect=1)

    def scrape(self):
        import re
        import urllib.request
        text = urllib.request.urlopen(
            "http://127.0.0.1:%d/metrics" % self.server.metrics_port, timeout=10).read().decode()
        counts = {}
        for m in re.finditer(r'grpc_server_handled_total\{([^}]*)\} (\S+)', text):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            key = (labels["grpc_method"], labels["grpc_code"])
            counts[key] = counts.get(key, 0) + float(m.group(2))
        return counts, text

    def test_load_report_matches_server_metrics(self):
        rng = np.random.default_rng(4)
        n = 32
        np.save(os.path.join(self.dir, "load.npy"), rng.standard_normal((50, n)).astype(np.float32))
        self.json("bank", "create", "loadb", "--dim", str(n), "--kind", "continuous")
        self.json("store", "loadb", os.path.join(self.dir, "load.npy"))
        before, _ = self.scrape()
        report = self.json("load", "loadb", "--total", "150", "--concurrency", "3",
                           "--mix", "retrieve=3,energy=1", "--format", "json", "--seed", "2")
        after, text = self.scrape()
        self.assertEqual(report["calls"], 150)
        self.assertEqual(report["errors"], 0)
        self.assertEqual(report["codes"], {"OK": 150})
        for rpc, method in (("retrieve", "Retrieve"), ("energy", "Energy")):
            delta = after.get((method, "OK"), 0) - before.get((method, "OK"), 0)
            self.assertEqual(delta, report["calls_by_rpc"][rpc], method)
        self.assertEqual(report["calls_by_rpc"]["retrieve"] + report["calls_by_rpc"]["energy"], 150)
        lat = report["latency_seconds"]
        self.assertTrue(0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"])
        self.assertEqual(sum(b["count"] for b in report["histogram"]), 150)
        self.assertIn("engram_retrieve_steps_bucket", text)

    def test_backup(self):
        out = self.json("backup", "cli-snap")
        self.assertTrue(out["path"].endswith("backups/cli-snap"))
        self.assertTrue(os.path.exists(out["path"]))
        self.engram("backup", "cli-snap", expect=1)

    def test_health(self):
        self.assertEqual(self.engram("health").stdout.strip(), "SERVING")
        self.assertEqual(self.json("health", "--service", "engram.v1.MemoryService")["status"], "SERVING")
        p = self.engram("health", "--service", "no.such.Service", expect=1)
        self.assertIn("NOT_FOUND", p.stderr)

    def test_bank_export_import_round_trips_bit_for_bit(self):
        out = tempfile.mkdtemp(prefix="engram_cli_stubs_", dir=self.dir)
        m = engram_harness.generate_stubs(ARGS.proto_dir, out)
        pb = m["pb"]
        channel = self.server.channel()
        stub = m["rpc"].MemoryServiceStub(channel)
        rng = np.random.default_rng(5)

        def contents(bank):
            info = stub.GetBank(pb.GetBankRequest(name=bank), timeout=10)
            rows, start = {}, 0
            while True:
                page = stub.GetPatterns(pb.GetPatternsRequest(
                    bank=bank, page_start=start, page_size=700), timeout=30)
                x = np.array(page.patterns, dtype=np.float32).reshape(-1, info.dim)
                v = np.array(page.values, dtype=np.float32).reshape(len(page.ids),
                                                                    info.value_dim)
                for i, pid in enumerate(page.ids):
                    labels = (sorted(page.labels[i].strings.items()),
                              sorted(page.labels[i].ints.items()))
                    rows[pid] = (x[i].tobytes(), page.payloads[i], v[i].tobytes(), labels)
                if not page.ids:
                    break
                start = page.next_page_start
            config = (info.dim, info.kind, info.energy.SerializeToString(), info.precision,
                      info.value_dim, info.ttl_seconds, info.decay_half_life_seconds)
            return config, rows

        # Continuous: more rows than one export page, sparse ids, binary and
        # empty payloads, -0.0 and subnormals; then deletes reorder the rows.
        n = 37
        stub.CreateBank(pb.CreateBankRequest(
            name="exp-src", dim=n, kind=pb.STATE_KIND_CONTINUOUS,
            energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_LSE, beta=3.5)), timeout=10)
        k = 2300
        x = rng.standard_normal((k, n)).astype(np.float32)
        x[::7, 3] = -0.0
        x[::11, 5] = np.float32(1e-42)
        ids = [int(i) for i in dict.fromkeys(rng.integers(1, 2**63, size=k + 10).tolist())][:k]
        payloads = [rng.bytes(int(rng.integers(0, 40))) for _ in range(k)]
        payloads[0] = b"\x00\xff\x00"
        for s in range(0, k, 500):
            stub.Store(pb.StoreRequest(bank="exp-src", patterns=x[s:s + 500].ravel().tolist(),
                                       ids=ids[s:s + 500], payloads=payloads[s:s + 500]), timeout=30)
        stub.DeletePatterns(pb.DeletePatternsRequest(bank="exp-src", ids=ids[10:300:3]), timeout=10)
        # Bipolar with a polynomial energy and server-assigned ids.
        stub.CreateBank(pb.CreateBankRequest(
            name="exp-bip", dim=64, kind=pb.STATE_KIND_BIPOLAR,
            energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_POLYNOMIAL, degree=4)), timeout=10)
        stub.Store(pb.StoreRequest(bank="exp-bip", patterns=rng.choice(
            [-1.0, 1.0], size=(30, 64)).ravel().tolist()), timeout=10)

        # Key -> value with labels, a time to live and decay with age.
        stub.CreateBank(pb.CreateBankRequest(
            name="exp-kv", dim=8, kind=pb.STATE_KIND_CONTINUOUS, value_dim=3, ttl_seconds=3600,
            decay_half_life_seconds=600), timeout=10)
        labels = [pb.Labels(strings={"lang": ["en", "de"][r % 2]}, ints={"year": 2000 + r})
                  for r in range(12)]
        stub.Store(pb.StoreRequest(
            bank="exp-kv", patterns=rng.standard_normal((12, 8)).astype(np.float32).ravel().tolist(),
            values=rng.standard_normal((12, 3)).astype(np.float32).ravel().tolist(),
            labels=labels), timeout=10)

        for src in ("exp-src", "exp-bip", "exp-kv"):
            path = os.path.join(self.dir, src + ".engram")
            before = contents(src)
            report = self.json("bank", "export", src, path)
            self.assertEqual(report["patterns"], len(before[1]))
            with open(path, "rb") as f:
                self.assertEqual(f.read(21), b"engram-bank-export 1\n")
            # Under a new name: same config, same ids, same bits, same payloads.
            self.json("bank", "import", path, "--name", src + "-copy")
            self.assertEqual(contents(src + "-copy"), before)
            # The original name is taken until the bank is deleted.
            p = self.engram("bank", "import", path, expect=1)
            self.assertIn("ALREADY_EXISTS", p.stderr)
            self.engram("bank", "delete", src)
            self.engram("bank", "import", path)
            self.assertEqual(contents(src), before)

        # A truncated file is refused with DATA_LOSS, saying how much arrived.
        path = os.path.join(self.dir, "exp-src.engram")
        cut = os.path.join(self.dir, "cut.engram")
        with open(path, "rb") as f, open(cut, "wb") as g:
            g.write(f.read(os.path.getsize(path) // 2))
        p = self.engram("bank", "import", cut, "--name", "exp-cut", expect=1)
        self.assertIn("DATA_LOSS", p.stderr)
        other = os.path.join(self.dir, "not-an-export.bin")
        with open(other, "wb") as f:
            f.write(b"\x93NUMPY not a bank")
        p = self.engram("bank", "import", other, expect=1)
        self.assertIn("not an engram bank export", p.stderr)
        channel.close()

    def test_bank_lifecycle_and_exit_codes(self):
        self.json("bank", "create", "life", "--dim", "3", "--kind", "continuous")
        names = [b["name"] for b in self.json("bank", "list")["banks"]]
        self.assertIn("life", names)
        p = self.engram("bank", "create", "life", "--dim", "3", "--kind", "continuous", expect=1)
        self.assertIn("ALREADY_EXISTS", p.stderr)
        p = self.engram("bank", "get", "missing", expect=1)
        self.assertIn("NOT_FOUND", p.stderr)
        p = self.engram("bank", "create", "x", "--dim", "3", "--bogus", "1", expect=2)
        self.assertIn("unknown option --bogus", p.stderr)
        self.assertIn("usage: engram bank create NAME", p.stderr)
        self.engram("frobnicate", expect=2)
        self.engram("bank", "delete", "life")
        self.engram("bank", "get", "life", expect=1)


    def test_help_and_usage_list_every_option_of_the_command(self):
        """The help and each usage error come from the one command table:
        every option a command accepts is listed, and no other is accepted."""
        top = self.engram("--help").stdout
        for opt in ("--token TOKEN", "--tls-ca FILE", "--target HOST:PORT", "--json"):
            self.assertIn(opt, top)
        for cmd in ("bank create NAME", "bank import FILE", "retrieve BANK FILE", "sample BANK",
                    "load BANK", "health"):
            self.assertIn("engram " + cmd, top)
        p = self.engram("retrieve", "b", expect=2)  # a missing operand
        usage = " ".join(p.stderr.split())
        for opt in ("--seed S", "--tol T", "--max-steps N", "--dynamics", "--energy FAMILY",
                    "--limit N", "--partial"):
            self.assertIn(opt, usage)
        self.assertIn("--seed S", self.engram("sample", "--help").stdout)
        p = self.engram("retrieve", "b", "f.npy", "--stream", expect=2)  # sample's, not retrieve's
        self.assertIn("unknown option --stream", p.stderr)
        self.engram("bank", "frob", "x", expect=2)


class ShutdownTest(unittest.TestCase):
    def test_sigterm_exits_cleanly(self):
        d = tempfile.mkdtemp(prefix="engram_term_")
        try:
            s = engram_harness.Engramd(ARGS.engramd, os.path.join(d, "data")).start()
            self.assertEqual(s.terminate(), 0)
            self.assertIn("stopped", open(s.log_path).read())
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engramd", required=True)
    parser.add_argument("--engram", required=True)
    parser.add_argument("--proto-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
