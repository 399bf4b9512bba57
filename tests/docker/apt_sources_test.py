#!/usr/bin/env python3
"""The container test's reading of apt sources (one-line sources.list files
and deb822 .sources files) and its choice of the debootstrap mirror."""
import os
import shutil
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import docker_test  # noqa: E402


class AptSourcesTest(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="engram_apt_")
        os.makedirs(os.path.join(self.root, "sources.list.d"))
        self.keyring = os.path.join(self.root, "k.gpg")
        open(self.keyring, "w").close()

    def tearDown(self):
        shutil.rmtree(self.root)

    def write(self, name, text):
        with open(os.path.join(self.root, name), "w") as f:
            f.write(text)

    def test_one_line_entries_with_options_and_comments(self):
        self.write("sources.list",
                   "# a comment\n"
                   "deb [arch=amd64 signed-by=%s] http://m.example/debian bookworm main # note\n"
                   "deb-src http://m.example/debian bookworm main\n"
                   "deb https://s.example/debian bookworm main\n" % self.keyring)
        entries = docker_test.apt_sources(self.root)
        self.assertEqual([(e["types"], e["uris"], e["suites"]) for e in entries],
                         [(["deb"], ["http://m.example/debian"], ["bookworm"]),
                          (["deb-src"], ["http://m.example/debian"], ["bookworm"]),
                          (["deb"], ["https://s.example/debian"], ["bookworm"])])
        self.assertEqual(entries[0]["signed_by"], self.keyring)
        # Source-only and https (no CA certificates in minbase) entries are not used.
        self.assertEqual([docker_test.usable_in_base(e) for e in entries], [True, False, False])
        self.assertEqual(docker_test.debian_mirror(entries), "http://m.example/debian")

    def test_deb822_paragraphs_disabled_inline_keys_and_other_releases(self):
        self.write("sources.list.d/debian.sources",
                   "# header comment\n"
                   "Types: deb\n"
                   "Enabled: no\n"
                   "URIs: http://off.example/debian\n"
                   "Suites: bookworm\n"
                   "Components: main\n"
                   "\n"
                   "Types: deb deb-src\n"
                   "URIs: http://a.example/debian/ http://b.example/debian\n"
                   "Suites: bookworm-updates bookworm\n"
                   "Components: main\n"
                   "Signed-By:\n"
                   " -----BEGIN PGP PUBLIC KEY BLOCK-----\n"
                   " .\n"
                   " abc\n"
                   " -----END PGP PUBLIC KEY BLOCK-----\n"
                   "\n"
                   "Types: deb\n"
                   "URIs: http://u.example/ubuntu\n"
                   "Suites: jammy\n"
                   "Components: main\n")
        self.write("sources.list.d/ignored.list.disabled", "deb http://x.example/ bookworm main\n")
        entries = docker_test.apt_sources(self.root)
        self.assertEqual([e["uris"][0] for e in entries],
                         ["http://a.example/debian/", "http://u.example/ubuntu"])
        self.assertIn("-----BEGIN PGP PUBLIC KEY BLOCK-----", entries[0]["text"])
        self.assertEqual(entries[0]["signed_by"], "")  # inline key: nothing to copy
        self.assertEqual([docker_test.usable_in_base(e) for e in entries], [True, False])
        self.assertEqual(docker_test.debian_mirror(entries), "http://a.example/debian")

    def test_missing_keyring_or_no_release_entry_fails_clearly(self):
        self.write("sources.list", "deb [signed-by=/nonexistent.gpg] http://m.example/d bookworm main\n"
                                   "deb http://m.example/d bookworm-updates main\n")
        entries = docker_test.apt_sources(self.root)
        self.assertFalse(docker_test.usable_in_base(entries[0]))
        with self.assertRaisesRegex(docker_test.TestFailure, "no plain-http 'deb ... bookworm'"):
            docker_test.debian_mirror(entries)


if __name__ == "__main__":
    unittest.main(verbosity=2)
