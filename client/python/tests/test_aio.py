"""AsyncClient under asyncio: the same answers as Client, the same errors and
retry policy, and the same method signatures."""
import asyncio
import inspect

import grpc
import numpy as np
import pytest

import engram_client
import engram_harness
from test_client import lse_energy
from test_memory_features import readout


class AsyncCountingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Records the outcome code of every unary attempt on a grpc.aio channel."""

    def __init__(self):
        self.codes = []

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)
        self.codes.append(await call.code())
        return call


def test_async_client_has_the_sync_clients_methods_and_signatures():
    public = [n for n in dir(engram_client.Client) if not n.startswith("_")]
    for name in public:
        sync_attr = getattr(engram_client.Client, name)
        async_attr = getattr(engram_client.AsyncClient, name)
        if isinstance(sync_attr, property):
            assert isinstance(async_attr, property), name
            continue
        assert (inspect.signature(async_attr).parameters
                == inspect.signature(sync_attr).parameters), name
        if name == "sample_stream":
            assert not inspect.iscoroutinefunction(async_attr)
        elif name != "__init__":
            assert inspect.iscoroutinefunction(async_attr), name


def test_async_client_round_trips_recalls_and_matches_numpy(server, client, bank_name):
    rng = np.random.default_rng(20)
    name = bank_name()
    n, k, beta = 24, 8, 1.5
    xi = rng.standard_normal((k, n)).astype(np.float32)
    ids = [2 ** 64 - 1 - i for i in range(k)]
    states = rng.standard_normal((3, n)).astype(np.float32)
    query = xi[3] + rng.normal(0, 0.3, n).astype(np.float32)

    async def scenario():
        async with engram_client.AsyncClient(server.target) as ac:
            info = await ac.create_bank(name, n, "continuous", energy="lse", beta=beta)
            stored = await ac.store(name, xi, ids=ids, payloads=[b"a%d" % i for i in range(k)])
            got = await ac.get_patterns(name, ids[::-1])
            [recalled] = await ac.retrieve(name, query)
            energies = await ac.energy(name, states, gradient=True)
            listed = await ac.list_banks()
            return info, stored, got, recalled, energies, listed

    info, stored, got, recalled, (energies, gradients), listed = asyncio.run(scenario())
    assert (info.kind, info.energy.family, info.energy.beta) == ("continuous", "lse", beta)
    assert stored.tolist() == ids
    assert got.ids.tolist() == ids[::-1]
    assert np.array_equal(got.patterns, xi[::-1])
    assert got.payloads == [b"a%d" % i for i in range(k)][::-1]
    assert recalled.nearest.id == ids[3]
    np.testing.assert_allclose(recalled.state, xi[3], atol=1e-4)
    want_e, want_g = lse_energy(xi, states, beta)
    np.testing.assert_allclose(energies, want_e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gradients, want_g, rtol=1e-4, atol=1e-4)
    assert name in [b.name for b in listed]
    # The sync client sees the same bank and answers the same recall.
    [sync_recalled] = client.retrieve(name, query)
    assert np.array_equal(sync_recalled.state, recalled.state)


def test_async_sample_stream_matches_the_sync_stream(server, client, bank_name):
    rng = np.random.default_rng(21)
    name = bank_name()
    client.create_bank(name, 6, "continuous", energy="gaussian")
    client.store(name, rng.standard_normal((3, 6)) * 3)
    options = dict(count=2, seed=9, steps=10, sigma_max=20, sigma_min=0.01, trajectory_every=5)

    async def scenario():
        async with engram_client.AsyncClient(server.target) as ac:
            return [f async for f in ac.sample_stream(name, **options)], \
                await ac.sample(name, **options)

    frames, unary = asyncio.run(scenario())
    sync_frames = list(client.sample_stream(name, **options))
    assert [f.step for f in frames] == [f.step for f in sync_frames]
    for a, b in zip(frames[:-1], sync_frames[:-1]):
        assert a.states.shape == (2, 6)
        assert np.array_equal(a.states, b.states)
    final = np.stack([s.state for s in frames[-1].result.samples])
    assert np.array_equal(final, np.stack([s.state for s in unary.samples]))


def test_async_errors_and_retry_policy(server):
    async def scenario():
        results = {}
        async with engram_client.AsyncClient(server.target, retries=4) as ac:
            try:
                await ac.get_bank("async-missing")
            except engram_client.EngramError as e:
                results["not_found"] = e
        counter = AsyncCountingInterceptor()
        target = "127.0.0.1:%d" % engram_harness.free_port()
        async with engram_client.AsyncClient(target, retries=2, backoff=0.01,
                                             interceptors=[counter]) as ac:
            try:
                await ac.list_banks()
            except engram_client.EngramError as e:
                results["unavailable"] = e
        results["attempts"] = counter.codes
        return results

    results = asyncio.run(scenario())
    assert isinstance(results["not_found"], engram_client.NotFound)
    assert "async-missing" in results["not_found"].message
    assert isinstance(results["unavailable"], engram_client.Unavailable)
    assert results["attempts"] == [grpc.StatusCode.UNAVAILABLE] * 3


def test_async_invalid_argument_is_not_retried(server, bank_name):
    name = bank_name()

    async def scenario():
        counter = AsyncCountingInterceptor()
        async with engram_client.AsyncClient(server.target, retries=3,
                                             interceptors=[counter]) as ac:
            await ac.create_bank(name, 5)
            with pytest.raises(engram_client.InvalidArgument):
                await ac.energy(name, np.ones(4))
        return counter.codes

    assert asyncio.run(scenario()) == [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT]


def test_async_values_labels_and_filters_match_numpy_and_the_sync_client(
        server, client, bank_name):
    rng = np.random.default_rng(22)
    name = bank_name()
    n, k, m, beta = 12, 10, 4, 0.4
    xi = rng.standard_normal((k, n)).astype(np.float32)
    v = rng.standard_normal((k, m)).astype(np.float32)
    labels = [{"group": "ab"[i % 2], "rank": i} for i in range(k)]
    states = rng.standard_normal((3, n)).astype(np.float32)
    spec = {"group": "b", "rank": engram_client.Range(3, 9)}
    mask = np.array([lab["group"] == "b" and 3 <= lab["rank"] <= 9 for lab in labels])

    async def scenario():
        async with engram_client.AsyncClient(server.target) as ac:
            info = await ac.create_bank(name, n, energy="lse", beta=beta, value_dim=m,
                                        ttl_seconds=600)
            ids = await ac.store(name, xi, values=v, labels=labels)
            got = await ac.get_patterns(name, ids)
            whole = await ac.energy(name, states)
            filtered = await ac.energy(name, states, filter=spec)
            recalled = await ac.retrieve(name, states, filter=spec)
            try:
                await ac.retrieve(name, states, filter={"group": "c"})
            except engram_client.EngramError as e:
                missing = e
            frames = [f async for f in ac.sample_stream(name, count=2, seed=3, steps=8,
                                                        filter=spec)]
            return info, ids, got, whole, filtered, recalled, missing, frames

    info, ids, got, whole, filtered, recalled, missing, frames = asyncio.run(scenario())
    assert (info.value_dim, info.ttl_seconds) == (m, 600)
    assert np.array_equal(got.values, v)
    assert got.labels == labels
    assert np.all(got.expires_unix_ms > 0)
    np.testing.assert_allclose(whole.values, readout(xi, v, states, beta), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(filtered.values, readout(xi[mask], v[mask], states, beta),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(filtered.energies, lse_energy(xi[mask], states, beta)[0],
                               rtol=1e-5, atol=1e-5)
    assert isinstance(missing, engram_client.FailedPrecondition)
    sync = client.retrieve(name, states, filter=spec)
    for a, s in zip(recalled, sync):
        assert np.array_equal(a.state, s.state) and np.array_equal(a.value, s.value)
        assert mask[ids.tolist().index(a.nearest.id)]
    sync_frames = list(client.sample_stream(name, count=2, seed=3, steps=8, filter=spec))
    assert np.array_equal(frames[-1].states, sync_frames[-1].states)
    for sample in frames[-1].result.samples:
        assert mask[ids.tolist().index(sample.nearest.id)]


def test_async_energy_novelty_matches_the_sync_client(server, client, bank_name):
    rng = np.random.default_rng(23)
    name = bank_name()
    n, k, beta = 10, 20, 4.0
    client.create_bank(name, n, energy="lse", beta=beta)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    client.store(name, xi)
    states = np.vstack([xi[3] + 0.05 * rng.standard_normal(n),
                        5.0 * rng.choice([-1.0, 1.0], size=n)]).astype(np.float32)

    async def scenario():
        async with engram_client.AsyncClient(server.target) as ac:
            return (await ac.energy(name, states, novelty=True),
                    await ac.energy(name, states, gradient=True))

    got, plain = asyncio.run(scenario())
    sync = client.energy(name, states, novelty=True)
    assert np.array_equal(got.novelty, sync.novelty)
    assert np.array_equal(got.novelty_z, sync.novelty_z)
    assert got.novelty.dtype == np.float64 and got.novelty[1] == 1.0
    assert plain.novelty is None and plain.novelty_z is None
    energies, gradients = got
    assert gradients is None and np.array_equal(energies, sync.energies)
