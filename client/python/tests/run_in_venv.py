#!/usr/bin/env python3
r"""Installs engram-client into a fresh virtual environment and runs its tests.

  /usr/bin/python3 client/python/tests/run_in_venv.py --engramd build/server/engramd \
      [-- PYTEST_ARGS]

Steps, all offline, in a temporary directory removed at the end:
  1. copy client/python and proto/engram into <tmp>/src (the repository
     layout), so the in-tree build writes build/ and *.egg-info there and not
     into the source tree (concurrent runs cannot collide);
  2. python3 -m venv --system-site-packages <tmp>/venv (Debian's grpcio,
     grpc_tools, protobuf, numpy and pytest come from the system);
  3. <tmp>/venv/bin/pip install --no-index --no-build-isolation <tmp>/src/client/python;
  4. from <tmp> (outside the source tree), run
     python -m pytest client/python/tests --engramd ENGRAMD.

Exit code: pytest's, or 1 when the install fails. install_package() is also
used by tests/integration/examples_test.py.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
SYSTEM_PYTHON = "/usr/bin/python3"

_SKIP = shutil.ignore_patterns("build", "dist", "*.egg-info", "_gen", "__pycache__",
                               ".pytest_cache", "tests")


def install_package(work_dir, python=SYSTEM_PYTHON, root=ROOT):
    """Creates work_dir/venv and installs engram-client from a copy of the
    sources into it, without network. Returns the venv's python; raises
    subprocess.CalledProcessError (with pip's output) on failure."""
    src = os.path.join(work_dir, "src")
    shutil.copytree(os.path.join(root, "client", "python"),
                    os.path.join(src, "client", "python"), ignore=_SKIP)
    shutil.copytree(os.path.join(root, "proto", "engram"), os.path.join(src, "proto", "engram"))
    venv = os.path.join(work_dir, "venv")
    subprocess.run([python, "-m", "venv", "--system-site-packages", venv], check=True,
                   capture_output=True, text=True)
    venv_python = os.path.join(venv, "bin", "python")
    subprocess.run([venv_python, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                    "--disable-pip-version-check", "--quiet",
                    os.path.join(src, "client", "python")],
                   check=True, capture_output=True, text=True, cwd=work_dir)
    return venv_python


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engramd", required=True, help="engramd binary under test")
    ap.add_argument("--python", default=SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON)
                    else sys.executable, help="interpreter the venv is made from")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="engram_pyclient_")
    try:
        try:
            python = install_package(work, args.python)
        except subprocess.CalledProcessError as e:
            sys.stderr.write("installing engram-client failed: %s\n%s%s\n"
                             % (" ".join(e.cmd), e.stdout or "", e.stderr or ""))
            return 1
        where = subprocess.run(
            [python, "-c", "import engram_client; print(engram_client.__file__)"],
            cwd=work, capture_output=True, text=True, check=True).stdout
        print("testing engram_client installed at", where.strip(), flush=True)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                   ENGRAMD=os.path.abspath(args.engramd))
        cmd = [python, "-m", "pytest", "-p", "no:cacheprovider",
               "--basetemp", os.path.join(work, "pytest"),
               "--rootdir", os.path.join(ROOT, "client", "python"),
               os.path.join(ROOT, "client", "python", "tests"),
               "--engramd", os.path.abspath(args.engramd)] + args.pytest_args
        return subprocess.run(cmd, cwd=work, env=env).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
