"""Build hooks of engram-client: gRPC stubs generated from engram.proto.

Metadata lives in pyproject.toml; this file holds the package layout (src/:
scripts in client/python, like engram_example.py, never import the source
tree, which lacks the generated stubs) and two commands.

build_py  compiles engram/v1/engram.proto with grpc_tools.protoc into
          engram_client/_gen/engram/v1/{engram_pb2,engram_pb2_grpc}.py of the
          build tree (of src/ for an editable install) and rewrites
          the generated `from engram.v1 import engram_pb2` into a relative
          import and the module name baked into message classes into the
          real one, so no top-level `engram` package is ever installed or
          needed (messages pickle).
sdist     puts the proto into the archive at proto/engram/v1/engram.proto.

The proto is looked up at ./proto (present only in an unpacked sdist) and
then at ../../proto (the repository's copy, the source of truth).
ENGRAM_PROTO_DIR overrides both.

grpc_tools older than 1.32 (Debian 12 ships 1.14, libprotoc 3.5) rejects
proto3 `optional` fields. The build then compiles a copy of the proto in
which each `optional T name = N;` is written as `oneof _name { T name = N; }`,
the one-field oneof that protoc itself lowers proto3 `optional` to: the wire
format and HasField() are the same.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_REL = os.path.join("engram", "v1", "engram.proto")
PACKAGE = "engram_client"

_OPTIONAL_FIELD = re.compile(
    r"^(\s*)optional\s+([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*(\[[^\]]*\])?\s*;", re.MULTILINE)
_OPTIONAL_REJECTED = "Explicit 'optional' labels are disallowed"
_GENERATED_IMPORT = re.compile(r"^from engram\.v1 import ", re.MULTILINE)
# The module path protoc bakes into message classes ('__module__' of old
# generators, the BuildTopDescriptorsAndMessages argument of new ones).
_GENERATED_MODULE_NAME = re.compile(r"""(['"])engram\.v1\.engram_pb2\1""")


def find_proto_root():
    """Returns the directory that holds engram/v1/engram.proto."""
    candidates = []
    if os.environ.get("ENGRAM_PROTO_DIR"):
        candidates.append(os.environ["ENGRAM_PROTO_DIR"])
    candidates += [os.path.join(HERE, "proto"), os.path.join(HERE, "..", "..", "proto")]
    for root in candidates:
        if os.path.isfile(os.path.join(root, PROTO_REL)):
            return os.path.normpath(root)
    raise RuntimeError("engram/v1/engram.proto not found in any of: "
                       + ", ".join(os.path.normpath(c) for c in candidates))


def _run_protoc(proto_root, out_dir):
    """Runs grpc_tools.protoc in a child process; returns (exit code, stderr)."""
    import grpc_tools  # noqa: F401  (fail early with a clear ImportError)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I" + proto_root, "-I" + well_known,
           "--python_out=" + out_dir, "--grpc_python_out=" + out_dir, PROTO_REL]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, p.stderr


def lower_proto3_optional(text):
    """Rewrites every `optional T name = N;` as `oneof _name { T name = N; }`."""
    def repl(m):
        indent, type_, name, number, opts = m.groups()
        return "%soneof _%s { %s %s = %s%s; }" % (
            indent, name, type_, name, number, " " + opts if opts else "")
    return _OPTIONAL_FIELD.sub(repl, text)


def generate_stubs(package_dir):
    """Writes package_dir/_gen/engram/v1/engram_pb2{,_grpc}.py (with
    __init__.py files) from engram.proto."""
    proto_root = find_proto_root()
    gen = os.path.join(package_dir, "_gen")
    with tempfile.TemporaryDirectory(prefix="engram_client_build_") as tmp:
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        code, err = _run_protoc(proto_root, out)
        if code != 0 and _OPTIONAL_REJECTED in err:
            lowered = os.path.join(tmp, "proto")
            os.makedirs(os.path.join(lowered, "engram", "v1"))
            with open(os.path.join(proto_root, PROTO_REL), encoding="utf-8") as f:
                text = lower_proto3_optional(f.read())
            with open(os.path.join(lowered, PROTO_REL), "w", encoding="utf-8") as f:
                f.write(text)
            shutil.rmtree(out)
            os.makedirs(out)
            code, err = _run_protoc(lowered, out)
        if code != 0:
            raise RuntimeError("grpc_tools.protoc failed on %s:\n%s"
                               % (os.path.join(proto_root, PROTO_REL), err))
        if os.path.isdir(gen):
            shutil.rmtree(gen)
        v1 = os.path.join(gen, "engram", "v1")
        os.makedirs(v1)
        for d in (gen, os.path.join(gen, "engram"), v1):
            with open(os.path.join(d, "__init__.py"), "w") as f:
                f.write('"""Generated from engram/v1/engram.proto at build time."""\n')
        for name in ("engram_pb2.py", "engram_pb2_grpc.py"):
            with open(os.path.join(out, "engram", "v1", name), encoding="utf-8") as f:
                text = _GENERATED_IMPORT.sub("from . import ", f.read())
                text = _GENERATED_MODULE_NAME.sub("__name__", text)
            with open(os.path.join(v1, name), "w", encoding="utf-8") as f:
                f.write(text)
    return [os.path.join(root, f) for root, _, files in os.walk(gen) for f in files]


class BuildPyWithStubs(build_py):
    """build_py that also generates the gRPC stubs (see the module doc)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            package_dir = os.path.join(HERE, "src", PACKAGE)
        else:
            package_dir = os.path.join(self.build_lib, PACKAGE)
        self._generated = generate_stubs(package_dir)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + list(getattr(self, "_generated", []))


class SdistWithProto(sdist):
    """sdist that carries engram.proto, so a wheel builds from the archive."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        dest = os.path.join(base_dir, "proto", PROTO_REL)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.join(find_proto_root(), PROTO_REL), dest)


setup(
    package_dir={"": "src"},
    packages=[PACKAGE],
    package_data={PACKAGE: ["py.typed"]},
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto},
)
