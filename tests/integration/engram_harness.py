"""Test harness: generates Python stubs from proto/ and runs real engramd
processes on loopback.

Used by the integration tests; needs Debian's python3-grpcio and
python3-numpy (run with /usr/bin/python3) and protoc + grpc_python_plugin.
"""
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc


def generate_stubs(proto_dir, out_dir):
    """Generates Python stubs for proto/ and returns the imported modules.

    engram.v1 goes to out_dir/gen, which is put on sys.path. The standard
    grpc.health / grpc.reflection protos go to out_dir/std, which is not: a
    generated package named "grpc" would shadow grpcio, so those modules are
    loaded under private names."""
    plugin = shutil.which("grpc_python_plugin") or "/usr/bin/grpc_python_plugin"
    gen = os.path.join(out_dir, "gen")
    std = os.path.join(out_dir, "std")
    for d, sub in ((gen, "engram"), (std, "grpc")):
        os.makedirs(d, exist_ok=True)
        protos = []
        for root, _, files in os.walk(os.path.join(proto_dir, sub)):
            protos += [os.path.relpath(os.path.join(root, f), proto_dir)
                       for f in files if f.endswith(".proto")]
        subprocess.run(
            ["protoc", "-I", proto_dir, "--python_out", d, "--grpc_out", d,
             "--plugin=protoc-gen-grpc=" + plugin] + sorted(protos),
            check=True)
    for root, dirs, _ in os.walk(gen):
        for dd in dirs:
            open(os.path.join(root, dd, "__init__.py"), "a").close()
    if gen not in sys.path:
        sys.path.insert(0, gen)
    mods = {
        "pb": importlib.import_module("engram.v1.engram_pb2"),
        "rpc": importlib.import_module("engram.v1.engram_pb2_grpc"),
    }
    for key, name in (("health_pb", "grpc.health.v1.health_pb2"),
                      ("health_rpc", "grpc.health.v1.health_pb2_grpc"),
                      ("refl_pb", "grpc.reflection.v1alpha.reflection_pb2"),
                      ("refl_rpc", "grpc.reflection.v1alpha.reflection_pb2_grpc")):
        mods[key] = _load_shadowed(std, name)
    return mods


def _load_shadowed(out_dir, name):
    import importlib.util
    path = os.path.join(out_dir, *name.split(".")) + ".py"
    alias = "engram_gen_" + name.replace(".", "_")
    # *_pb2_grpc imports its *_pb2 by package path; pre-register that name.
    spec = importlib.util.spec_from_file_location(alias, path)
    mod = importlib.util.module_from_spec(spec)
    if name.endswith("_pb2_grpc"):
        pb2_name = name[: -len("_grpc")]
        pb2 = sys.modules.get("engram_gen_" + pb2_name.replace(".", "_"))
        src = open(path).read()
        pkg_import = "from %s import %s as " % (pb2_name.rsplit(".", 1)[0], pb2_name.rsplit(".", 1)[1])
        alias_line = src.replace(pkg_import, "import engram_gen_%s as " % pb2_name.replace(".", "_"))
        code = compile(alias_line, path, "exec")
        exec(code, mod.__dict__)
        sys.modules[alias] = mod
        return mod
    spec.loader.exec_module(mod)
    sys.modules[alias] = mod
    return mod


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engramd:
    """One engramd process with its own data directory and ports."""

    def __init__(self, binary, data_dir, extra_args=(), root_pem=None, env=None):
        self.binary = binary
        self.data_dir = data_dir
        self.port = free_port()
        self.metrics_port = free_port()
        self.extra_args = list(extra_args)
        self.root_pem = root_pem
        self.env = env
        self.proc = None
        self.log_path = os.path.join(data_dir, "engramd.log")

    @property
    def target(self):
        return "127.0.0.1:%d" % self.port

    def start(self, timeout=20.0):
        os.makedirs(self.data_dir, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--listen", self.target, "--data_dir", self.data_dir,
             "--metrics_listen", "127.0.0.1:%d" % self.metrics_port] + self.extra_args,
            stdout=self.log, stderr=subprocess.STDOUT,
            env=None if self.env is None else dict(os.environ, **self.env))
        channel = self.channel()
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self.kill()
            raise RuntimeError("engramd did not start: " + open(self.log_path).read())
        finally:
            channel.close()
        return self

    def kill(self):
        """SIGKILL: no chance to flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def _close_log(self):
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None

    def terminate(self, timeout=20.0):
        """SIGTERM; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._close_log()
        return code

    def channel(self):
        options = [("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.max_send_message_length", 256 << 20)]
        if self.root_pem is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_pem)
            return grpc.secure_channel(self.target, creds, options=options)
        return grpc.insecure_channel(self.target, options=options)


def make_cert(directory):
    """A self-signed certificate for localhost / 127.0.0.1 and its key, as
    files in `directory`; returns (cert path, key path)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
         "-out", cert, "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    return cert, key


def make_tempdir(prefix):
    return tempfile.mkdtemp(prefix=prefix)


class NatsCluster:
    """A JetStream cluster of `size` nats-server processes on loopback, each
    with its own store directory; nodes can be killed (-9) and restarted on
    the same ports and data."""

    def __init__(self, directory, size=3, binary=None):
        self.binary = binary or shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.directory = directory
        self.client_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.procs = [None] * size

    @property
    def urls(self):
        return ",".join("nats://127.0.0.1:%d" % p for p in self.client_ports)

    def start_node(self, i):
        routes = ",".join("nats://127.0.0.1:%d" % p
                          for j, p in enumerate(self.route_ports) if j != i)
        store = os.path.join(self.directory, "nats%d" % i)
        os.makedirs(store, exist_ok=True)
        log = open(os.path.join(self.directory, "nats%d.log" % i), "ab")
        self.procs[i] = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.client_ports[i]), "-js",
             "-sd", store, "-n", "n%d" % i, "--cluster_name", "engram",
             "--cluster", "nats://127.0.0.1:%d" % self.route_ports[i], "--routes", routes],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.client_ports[i]), timeout=1):
                    return
            except OSError:
                if self.procs[i].poll() is not None:
                    raise RuntimeError("nats-server %d exited" % i)
                time.sleep(0.05)
        raise RuntimeError("nats-server %d did not listen" % i)

    def start(self):
        for i in range(len(self.procs)):
            self.start_node(i)
        return self

    def kill_node(self, i):
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
        self.procs[i] = None

    def stop(self):
        for i in range(len(self.procs)):
            self.kill_node(i)

    def request(self, subject, payload=b"{}", node=None, timeout=10.0):
        """One NATS request (e.g. a JetStream API call, "$JS.API.STREAM.PURGE.<stream>")
        over the plain NATS protocol to a live node; returns the reply's payload."""
        if node is None:
            node = next(i for i, p in enumerate(self.procs) if p is not None and p.poll() is None)
        with socket.create_connection(("127.0.0.1", self.client_ports[node]), timeout=timeout) as s:
            f = s.makefile("rb")
            f.readline()  # INFO
            inbox = "_INBOX.engram_harness"
            s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
            s.sendall(("SUB %s 1\r\n" % inbox).encode())
            s.sendall(("PUB %s %s %d\r\n" % (subject, inbox, len(payload))).encode() + payload + b"\r\n")
            s.sendall(b"PING\r\n")
            while True:
                line = f.readline()
                if not line:
                    raise RuntimeError("NATS closed the connection")
                if line.startswith(b"MSG "):
                    size = int(line.split()[-1])
                    data = f.read(size + 2)[:size]
                    return data
                if line.startswith(b"PING"):
                    s.sendall(b"PONG\r\n")
                if line.startswith(b"-ERR"):
                    raise RuntimeError(line.decode().strip())
