"""Retry policy: UNAVAILABLE is retried with backoff, nothing else is.

Attempts are counted by a gRPC interceptor on the client's channel, which
sees every call the client really makes."""
import threading
import time

import grpc
import numpy as np
import pytest

import engram_client
import engram_harness


def closed_port_target():
    """A loopback address nothing listens on (a port just released)."""
    return "127.0.0.1:%d" % engram_harness.free_port()


def test_unavailable_is_retried_then_raised(counting_interceptor):
    retries, backoff = 3, 0.02
    client = engram_client.Client(closed_port_target(), retries=retries, backoff=backoff,
                                  timeout=5, interceptors=[counting_interceptor])
    start = time.monotonic()
    with pytest.raises(engram_client.Unavailable) as info:
        client.list_banks()
    elapsed = time.monotonic() - start
    client.close()
    assert counting_interceptor.codes == [grpc.StatusCode.UNAVAILABLE] * (retries + 1)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(info.value, ConnectionError)
    # Delays are uniform in [d/2, d] with d = backoff * 2**i.
    assert elapsed >= sum(backoff * 2 ** i / 2 for i in range(retries))
    assert elapsed < 5


def test_zero_retries_makes_one_attempt(counting_interceptor):
    with engram_client.Client(closed_port_target(), retries=0,
                              interceptors=[counting_interceptor]) as client:
        with pytest.raises(engram_client.Unavailable):
            client.get_bank("x")
    assert len(counting_interceptor.codes) == 1


def test_invalid_argument_and_not_found_are_not_retried(server, counting_interceptor, bank_name):
    name = bank_name()
    with engram_client.Client(server.target, retries=5, backoff=0.01,
                              interceptors=[counting_interceptor]) as client:
        client.create_bank(name, 4)
        with pytest.raises(engram_client.InvalidArgument):
            client.store(name, np.ones(3))
        with pytest.raises(engram_client.NotFound):
            client.get_bank(name + "-absent")
    assert counting_interceptor.codes == [grpc.StatusCode.OK,
                                          grpc.StatusCode.INVALID_ARGUMENT,
                                          grpc.StatusCode.NOT_FOUND]


def test_a_server_that_comes_up_during_the_retries_answers(start_engramd, counting_interceptor):
    srv = start_engramd(started=False)          # port chosen, nothing listening yet
    client = engram_client.Client(srv.target, retries=30, backoff=0.05, max_backoff=0.3,
                                  timeout=5, interceptors=[counting_interceptor])
    outcome = {}

    def call():
        try:
            outcome["banks"] = client.list_banks()
        except engram_client.EngramError as e:
            outcome["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while not counting_interceptor.codes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counting_interceptor.codes[0] == grpc.StatusCode.UNAVAILABLE
    srv.start()
    thread.join(timeout=30)
    client.close()
    assert outcome.get("banks") == [], outcome
    assert counting_interceptor.codes[-1] == grpc.StatusCode.OK
    assert len(counting_interceptor.codes) >= 2


def test_sample_stream_retries_unavailable_before_the_first_frame(counting_interceptor):
    with engram_client.Client(closed_port_target(), retries=2, backoff=0.01,
                              interceptors=[counting_interceptor]) as client:
        with pytest.raises(engram_client.Unavailable):
            list(client.sample_stream("x", count=1))
    assert counting_interceptor.methods == ["/engram.v1.MemoryService/SampleStream"] * 3


def test_negative_retries_are_rejected():
    with pytest.raises(ValueError):
        engram_client.Client(retries=-1)
