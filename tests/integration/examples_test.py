#!/usr/bin/env python3
"""Runs the documented example clients against a real engramd."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engram_harness  # noqa: E402

ARGS = None
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ExamplesTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="engram_examples_")
        self.server = engram_harness.Engramd(ARGS.engramd, os.path.join(self.dir, "data")).start()

    def tearDown(self):
        self.server.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_python_example(self):
        p = subprocess.run(
            [sys.executable, os.path.join(ROOT, "client", "python", "engram_example.py"),
             "--target", self.server.target, "--stubs", os.path.join(self.dir, "stubs")],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("recalled pattern-5", p.stdout)
        self.assertIn("exact=True", p.stdout)
        self.assertEqual(p.stdout.count("sample: SAMPLE_CLASS_"), 4, p.stdout)
        self.assertGreaterEqual(p.stdout.count("sample: SAMPLE_CLASS_MEMORIZED"), 3, p.stdout)


    def test_node_example(self):
        node_dir = os.path.join(ROOT, "client", "node")
        node, npm = shutil.which("node"), shutil.which("npm")
        self.assertIsNotNone(node, "node is needed for the Node.js example")
        if not os.path.isdir(os.path.join(node_dir, "node_modules", "@grpc", "grpc-js")):
            subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=node_dir, check=True,
                           capture_output=True, timeout=300)
        p = subprocess.run([node, os.path.join(node_dir, "engram_example.js"),
                            "--target", self.server.target],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("recalled memory-3", p.stdout)
        self.assertIn("ids above 2^53 round-trip exactly: 9007199254740993,18446744073709551615",
                      p.stdout)
        self.assertEqual(p.stdout.count("sample: SAMPLE_CLASS_MEMORIZED"), 3, p.stdout)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engramd", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
