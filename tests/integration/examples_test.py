#!/usr/bin/env python3
"""Runs the documented example clients against a real engramd."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "client", "python", "tests"))
import engram_harness  # noqa: E402
import run_in_venv  # noqa: E402  (installs engram-client into a temporary venv)

ARGS = None


class ExamplesTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="engram_examples_")
        self.server = engram_harness.Engramd(ARGS.engramd, os.path.join(self.dir, "data")).start()

    def tearDown(self):
        self.server.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_python_example(self):
        # The example imports the engram-client package: install it offline
        # into a virtual environment made from this interpreter, as a user would.
        try:
            python = run_in_venv.install_package(os.path.join(self.dir, "pyclient"),
                                                 sys.executable)
        except subprocess.CalledProcessError as e:
            self.fail("installing engram-client failed: %s\n%s%s" % (e.cmd, e.stdout, e.stderr))
        p = subprocess.run(
            [python, os.path.join(ROOT, "client", "python", "engram_example.py"),
             "--target", self.server.target],
            capture_output=True, text=True, timeout=120, cwd=self.dir)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("recalled pattern-5", p.stdout)
        self.assertIn("exact=True", p.stdout)
        self.assertEqual(p.stdout.count("sample: SAMPLE_CLASS_"), 4, p.stdout)
        self.assertGreaterEqual(p.stdout.count("sample: SAMPLE_CLASS_MEMORIZED"), 3, p.stdout)


    def test_node_example(self):
        node_dir = os.path.join(ROOT, "client", "node")
        node, npm = shutil.which("node"), shutil.which("npm")
        self.assertIsNotNone(node, "node is needed for the Node.js example")
        # The example runs on the engram-client package in node_dir, which
        # needs only its runtime dependencies. The lock file is the one
        # client/node/scripts/run_tests.sh holds while it installs into the
        # same node_modules.
        import fcntl
        with open(os.path.join(node_dir, ".npm-install.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
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
