"""Bearer tokens and TLS against engramd started with --auth_token_file and
--tls_cert / --tls_key."""
import asyncio
import shutil
import subprocess

import grpc
import pytest

import engram_client

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def token_server(start_engramd, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    return start_engramd(["--auth_token_file", str(token_file)])


def test_missing_or_wrong_token_is_unauthenticated(token_server):
    for token in (None, "wrong", TOKEN + "x"):
        with engram_client.Client(token_server.target, token=token, retries=0) as c:
            with pytest.raises(engram_client.Unauthenticated) as info:
                c.list_banks()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in info.value.message


def test_the_right_token_is_accepted(token_server):
    with engram_client.Client(token_server.target, token=TOKEN) as c:
        info = c.create_bank("authed", 3)
        assert [b.name for b in c.list_banks()] == [info.name]
        c.delete_bank("authed")


def test_async_client_sends_the_token(token_server):
    async def scenario():
        async with engram_client.AsyncClient(token_server.target, retries=0) as anonymous:
            with pytest.raises(engram_client.Unauthenticated):
                await anonymous.list_banks()
        async with engram_client.AsyncClient(token_server.target, token=TOKEN) as ac:
            return await ac.list_banks()

    assert asyncio.run(scenario()) == []


@pytest.fixture(scope="module")
def tls_server(start_engramd, tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    srv = start_engramd(["--tls_cert", str(cert), "--tls_key", str(key)],
                        root_pem=cert.read_bytes())
    return srv, cert


def test_tls_with_root_certificates_as_path_or_bytes(tls_server):
    srv, cert = tls_server
    with engram_client.Client(srv.target, root_certificates=str(cert)) as c:
        assert c.list_banks() == []
    with engram_client.Client(srv.target, tls=True, root_certificates=cert.read_bytes()) as c:
        assert c.list_banks() == []


def test_tls_server_refuses_plaintext_and_unknown_roots(tls_server):
    srv, _ = tls_server
    with engram_client.Client(srv.target, retries=0, timeout=5) as c:
        with pytest.raises(engram_client.Unavailable):
            c.list_banks()
    # The system roots do not vouch for a self-signed certificate.
    with engram_client.Client(srv.target, tls=True, retries=0, timeout=5) as c:
        with pytest.raises(engram_client.Unavailable):
            c.list_banks()
