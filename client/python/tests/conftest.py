"""Fixtures: a real engramd on a free loopback port, clients, fresh banks.

The engramd binary comes from --engramd or the ENGRAMD environment variable
(default: build/server/engramd of this repository). Processes are started by
tests/integration/engram_harness.py's Engramd, imported by path.

These tests import the installed engram_client (the package source under
src/ is never on sys.path); client/python/tests/run_in_venv.py installs it
into a fresh virtual environment and runs them.
"""
import itertools
import os
import pathlib
import sys

import grpc
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import engram_harness  # noqa: E402

import engram_client  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--engramd", default=os.environ.get("ENGRAMD"),
                     help="path of the engramd binary (env ENGRAMD)")


@pytest.fixture(scope="session")
def engramd_binary(pytestconfig):
    """Path of the engramd binary under test."""
    path = pytestconfig.getoption("--engramd") or str(ROOT / "build" / "server" / "engramd")
    if not os.access(path, os.X_OK):
        pytest.fail("engramd binary %r not found: pass --engramd or set ENGRAMD" % path)
    return path


@pytest.fixture(scope="session")
def start_engramd(engramd_binary, tmp_path_factory):
    """Returns start(extra_args=(), root_pem=None, started=True) -> Engramd;
    every server started is killed at the end of the session."""
    servers = []

    def start(extra_args=(), root_pem=None, started=True):
        data = tmp_path_factory.mktemp("engramd")
        srv = engram_harness.Engramd(engramd_binary, str(data / "data"),
                                     extra_args=list(extra_args), root_pem=root_pem)
        servers.append(srv)
        return srv.start() if started else srv

    yield start
    for srv in servers:
        srv.kill()


@pytest.fixture(scope="session")
def server(start_engramd):
    """One plaintext engramd shared by the session's tests."""
    return start_engramd()


@pytest.fixture(scope="session")
def client(server):
    """A Client of `server`."""
    with engram_client.Client(server.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def raw_stub(server):
    """A plain generated stub on its own channel: the reference for what the
    server answers, independent of the Client."""
    channel = grpc.insecure_channel(server.target)
    yield engram_client.pb_grpc.MemoryServiceStub(channel)
    channel.close()


_bank_numbers = itertools.count()


@pytest.fixture
def bank_name(request, client):
    """Returns a fresh bank name; the bank, if created, is deleted afterwards."""
    names = []

    def make():
        names.append("t%d-%s" % (next(_bank_numbers),
                                  request.node.name.lower().replace("_", "-")[:40]))
        return names[-1]

    yield make
    for name in names:
        try:
            client.delete_bank(name)
        except engram_client.NotFound:
            pass


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Records the method and outcome code of every attempt on a sync channel."""

    def __init__(self):
        self.methods = []
        self.codes = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.methods.append(client_call_details.method)
        outcome = continuation(client_call_details, request)
        self.codes.append(outcome.code())
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):
        self.methods.append(client_call_details.method)
        return continuation(client_call_details, request)


@pytest.fixture
def counting_interceptor():
    """A fresh CountingInterceptor."""
    return CountingInterceptor()
