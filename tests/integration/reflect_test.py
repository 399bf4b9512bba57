#!/usr/bin/env python3
"""Runs the reflection client (client/python/engram_reflect.py) against a real
engramd: list, describe and JSON calls, checked against the protos and
against calls through generated stubs."""
import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engram_harness  # noqa: E402

ARGS = None
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "client", "python", "engram_reflect.py")
SERVICE = "engram.v1.MemoryService"


def proto_rpcs():
    """(name, server_streaming) of every rpc in engram.proto, in order."""
    with open(os.path.join(ROOT, "proto", "engram", "v1", "engram.proto")) as f:
        text = f.read()
    return [(m.group(1), bool(m.group(2)))
            for m in re.finditer(r"^\s*rpc\s+(\w+)\s*\(\s*\w+\s*\)\s*returns\s*\(\s*(stream\s+)?",
                                 text, re.M)]


class ReflectTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="engram_reflect_")
        cls.mods = engram_harness.generate_stubs(os.path.join(ROOT, "proto"),
                                                 os.path.join(cls.dir, "stubs"))
        token = os.path.join(cls.dir, "token")
        with open(token, "w") as f:
            f.write("s3cret\n")
        cls.server = engram_harness.Engramd(ARGS.engramd, os.path.join(cls.dir, "data")).start()
        cls.auth_server = engram_harness.Engramd(
            ARGS.engramd, os.path.join(cls.dir, "auth-data"),
            extra_args=["--auth_token_file", token]).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.kill()
        cls.auth_server.kill()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def run_tool(self, *args, ok=True, stdin=None):
        env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
        p = subprocess.run([sys.executable, TOOL, "--stubs", os.path.join(self.dir, "refl")]
                           + list(args), capture_output=True, text=True, timeout=60,
                           input=stdin, env=env)
        if ok:
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        return p

    def call(self, method, request, *flags):
        p = self.run_tool("-d", json.dumps(request), *flags, self.server.target,
                          SERVICE + "/" + method)
        return json.loads(p.stdout)

    def test_list_shows_every_service(self):
        out = self.run_tool(self.server.target, "list").stdout.split()
        self.assertEqual(out, ["engram.shard.v1.Shard", SERVICE, "grpc.health.v1.Health",
                               "grpc.reflection.v1alpha.ServerReflection"])

    def test_list_service_shows_every_rpc_of_the_proto(self):
        out = self.run_tool(self.server.target, "list", SERVICE).stdout.split()
        self.assertEqual(out, [SERVICE + "." + name for name, _ in proto_rpcs()])

    def test_describe_service_renders_each_rpc_with_streaming(self):
        out = self.run_tool(self.server.target, "describe", SERVICE).stdout
        self.assertTrue(out.startswith(SERVICE + " is a service:\nservice MemoryService {"), out)
        for name, streaming in proto_rpcs():
            line = [l for l in out.splitlines() if l.strip().startswith("rpc %s (" % name)]
            self.assertEqual(len(line), 1, name)
            self.assertEqual("returns ( stream " in line[0], streaming, line[0])

    def test_describe_message_matches_the_generated_descriptor(self):
        out = self.run_tool(self.server.target, "describe", "engram.v1.SampleRequest").stdout
        fields = dict((int(m.group(2)), m.group(1))
                      for m in re.finditer(r"(\w+) = (\d+);", out))
        desc = self.mods["pb"].SampleRequest.DESCRIPTOR
        self.assertEqual(fields, {f.number: f.name for f in desc.fields})
        self.assertIn("optional double churn = 10;", out)
        self.assertIn("repeated float query = 7;", out)
        self.assertIn(".engram.v1.Schedule schedule = 5;", out)

    def test_describe_oneof_and_enum(self):
        out = self.run_tool(self.server.target, "describe",
                            "grpc.reflection.v1alpha.ServerReflectionRequest").stdout
        self.assertIn("  oneof message_request {\n    string file_by_filename = 3;", out)
        out = self.run_tool(self.server.target, "describe", "engram.v1.StopReason").stdout
        self.assertIn("engram.v1.StopReason is an enum:", out)
        self.assertIn("STOP_REASON_CONVERGED = 1;", out)

    def test_json_calls_create_store_retrieve_and_stream(self):
        info = self.call("CreateBank", {"name": "refl", "dim": 4,
                                        "kind": "STATE_KIND_CONTINUOUS",
                                        "energy": {"family": "ENERGY_FAMILY_LSE", "beta": 8}})
        self.assertEqual(info["dim"], 4)
        # The bank is real: seen through generated stubs too.
        pb, rpc = self.mods["pb"], self.mods["rpc"]
        with self.server.channel() as ch:
            got = rpc.MemoryServiceStub(ch).GetBank(pb.GetBankRequest(name="refl"), timeout=10)
        self.assertEqual((got.dim, got.kind), (4, pb.STATE_KIND_CONTINUOUS))
        payloads = [base64.b64encode(b).decode() for b in (b"north", b"east", b"south")]
        stored = self.call("Store", {"bank": "refl", "patterns": [1, 0, 0, 0, 0, 1, 0, 0,
                                                                   0, 0, 1, 0],
                                     "payloads": payloads})
        self.assertEqual(stored["ids"], ["1", "2", "3"])
        result = self.call("Retrieve", {"bank": "refl", "queries": [0.1, 0.8, 0.2, 0.0]})
        nearest = result["results"][0]["nearest"]
        self.assertEqual((nearest["id"], base64.b64decode(nearest["payload"])), ("2", b"east"))
        p = self.run_tool("-d", '{"bank": "refl", "count": 1, "seed": 1, '
                          '"schedule": {"steps": 3}, "trajectory_every": 1}',
                          self.server.target, SERVICE + "/SampleStream")
        frames = [json.loads(f) for f in re.split(r"(?<=\n})\n(?={)", p.stdout.strip())]
        self.assertGreaterEqual(len(frames), 3, p.stdout)
        # Request from standard input ('-d @').
        p = self.run_tool("-d", "@", self.server.target, SERVICE + "/GetBank",
                          stdin='{"name": "refl"}')
        self.assertEqual(json.loads(p.stdout)["patterns"], "3")

    def test_errors_exit_non_zero_with_the_status(self):
        p = self.run_tool("-d", '{"name": "missing"}', self.server.target, SERVICE + "/GetBank",
                          ok=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("Code: NOT_FOUND", p.stderr)
        p = self.run_tool("-d", '{"bank": "x"}', self.server.target, SERVICE + "/GetBank",
                          ok=False)
        self.assertIn("bad JSON for engram.v1.GetBankRequest", p.stderr)
        p = self.run_tool(self.server.target, "describe", "engram.v1.NoSuchThing", ok=False)
        self.assertIn("NOT_FOUND", p.stderr)

    def test_health_needs_its_proto_and_then_answers(self):
        # engramd's health service is registered without a descriptor.
        p = self.run_tool(self.server.target, "grpc.health.v1.Health/Check", ok=False)
        self.assertIn("--proto", p.stderr)
        p = self.run_tool("--proto", "grpc/health/v1/health.proto", "-d",
                          '{"service": "%s"}' % SERVICE, self.server.target,
                          "grpc.health.v1.Health/Check")
        self.assertEqual(json.loads(p.stdout), {"status": "SERVING"})

    def test_bearer_token_header(self):
        target = self.auth_server.target
        p = self.run_tool("-d", "{}", target, SERVICE + "/ListBanks", ok=False)
        self.assertIn("UNAUTHENTICATED", p.stderr)
        p = self.run_tool("-H", "authorization: Bearer s3cret", "-d", "{}", target,
                          SERVICE + "/ListBanks")
        self.assertEqual(json.loads(p.stdout), {})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engramd", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
