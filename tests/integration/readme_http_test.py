#!/usr/bin/env python3
"""Runs README.md's JSON-over-HTTP examples (the block between
<!-- http-examples:begin --> and <!-- http-examples:end -->) with curl
against a real engramd, and checks each answer against the `# -> ...` line
after it: an answer shown as JSON must contain every part of it between
`...` elides, in order; every answer line must be JSON.

  readme_http_test.py --engramd build/server/engramd --readme README.md
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engram_harness import Engramd, free_port  # noqa: E402


def examples(readme):
    text = open(readme).read()
    m = re.search(r"<!-- http-examples:begin -->\s*```sh\n(.*?)```\s*<!-- http-examples:end -->",
                  text, re.S)
    if not m:
        raise SystemExit("README has no http-examples block")
    commands, current = [], None
    for line in m.group(1).splitlines():
        if line.startswith("# ->"):
            current["expect"] = line[len("# ->"):].strip()
        elif line.startswith("#") or not line.strip():
            continue
        elif current is not None and current["text"].endswith("\\"):
            current["text"] += "\n" + line
        elif current is not None and current["text"].count("'") % 2 == 1:
            current["text"] += "\n" + line
        else:
            current = {"text": line, "expect": None}
            commands.append(current)
    return commands


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engramd", required=True)
    ap.add_argument("--readme", required=True)
    args = ap.parse_args()
    cmds = examples(args.readme)
    assert len(cmds) >= 4, "expected at least 4 curl examples, found %d" % len(cmds)
    with tempfile.TemporaryDirectory() as tmp:
        http_port = free_port()
        server = Engramd(args.engramd, os.path.join(tmp, "data"),
                         extra_args=["--http_listen=127.0.0.1:%d" % http_port])
        server.start()
        try:
            for c in cmds:
                text = c["text"].replace("127.0.0.1:8080", "127.0.0.1:%d" % http_port)
                p = subprocess.run(["bash", "-c", text], capture_output=True, text=True,
                                   timeout=60)
                assert p.returncode == 0, "%s\nexited %d: %s" % (text, p.returncode, p.stderr)
                lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
                assert lines, "%s\nanswered nothing" % text
                for ln in lines:
                    json.loads(ln)
                want = c["expect"]
                if want and want.startswith("{"):
                    pos = 0
                    for part in [x for x in want.split("...") if x]:
                        at = p.stdout.find(part, pos)
                        assert at >= 0, ("%s\nanswered\n%s\nwhich lacks %r (README shows %s)"
                                         % (text, p.stdout[:2000], part, want))
                        pos = at + len(part)
                print("ok: %s" % text.splitlines()[0])
        finally:
            server.terminate()
    print("README HTTP examples: %d commands answered as shown" % len(cmds))


if __name__ == "__main__":
    main()
