"""Client against a real engramd: results checked against numpy references
of the energies and dynamics in engram.proto, and against what was stored."""
import grpc
import numpy as np
import pytest

import engram_client
from engram_client import pb


# ---------------------------------------------------------------------------
# numpy references (double precision)

def lse_energy(xi, x, beta):
    """E = -1/beta log sum_mu exp(beta xi_mu . x) + 1/2 |x|^2, and grad E."""
    xi, x = xi.astype(np.float64), x.astype(np.float64)
    s = beta * (x @ xi.T)                                     # (B, K)
    m = s.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(s - m).sum(axis=1))
    p = np.exp(s - m)
    p /= p.sum(axis=1, keepdims=True)
    return -lse / beta + 0.5 * (x * x).sum(axis=1), x - p @ xi


def gaussian_energy(xi, x, beta):
    """E = -1/beta log sum_mu exp(-beta |x - xi_mu|^2 / 2)."""
    xi, x = xi.astype(np.float64), x.astype(np.float64)
    s = -0.5 * beta * ((x[:, None, :] - xi[None, :, :]) ** 2).sum(axis=2)
    m = s.max(axis=1)
    return -(m + np.log(np.exp(s - m[:, None]).sum(axis=1))) / beta


def lse_cccp(xi, x, beta, tol=1e-6, max_steps=100):
    """The SYNC update of an LSE bank, x <- Xi^T softmax(beta Xi x), run until
    |dx|_inf < tol (the state whose update would move it less is returned)."""
    xi, x = xi.astype(np.float64), x.astype(np.float64).copy()
    for _ in range(max_steps):
        s = beta * (xi @ x)
        p = np.exp(s - s.max())
        nxt = (p / p.sum()) @ xi
        if np.max(np.abs(nxt - x)) < tol:
            break
        x = nxt
    return x


def nearest_row(xi, x):
    """Index of the row of xi nearest to x in Euclidean distance."""
    return int(np.argmin(((xi.astype(np.float64) - x.astype(np.float64)) ** 2).sum(axis=1)))


def finite_float32(rng, shape):
    """Random float32 bit patterns over the whole finite range (subnormals,
    signed zeros, extremes), NaN and Inf excluded."""
    bits = rng.integers(0, 2 ** 32, size=shape, dtype=np.uint64).astype(np.uint32)
    exponent_all_ones = (bits & 0x7F800000) == 0x7F800000
    bits[exponent_all_ones] &= 0xBFFFFFFF
    flat = bits.reshape(-1)
    flat[:4] = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF]  # +0, -0, subnormals
    return bits.view(np.float32)


# ---------------------------------------------------------------------------
# Banks

def test_create_bank_maps_friendly_names_and_pb_values_alike(client, bank_name):
    a = client.create_bank(bank_name(), 16, "bipolar", energy="polynomial", degree=5,
                           precision="bf16")
    b = client.create_bank(bank_name(), 16, pb.STATE_KIND_BIPOLAR,
                           energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_POLYNOMIAL, degree=5),
                           precision=pb.PRECISION_BF16)
    c = client.create_bank(bank_name(), 16, "STATE_KIND_BIPOLAR",
                           energy=engram_client.EnergySpec("POLYNOMIAL", degree=5),
                           precision="BF16")
    for info in (a, b, c):
        assert (info.dim, info.kind, info.precision) == (16, "bipolar", "bf16")
        assert (info.energy.family, info.energy.degree) == ("polynomial", 5)
        assert info.raw.kind == pb.STATE_KIND_BIPOLAR
        assert info.patterns == 0
    assert client.get_bank(a.name) == a


def test_create_bank_rejects_unknown_names_before_calling(client, bank_name):
    name = bank_name()
    with pytest.raises(ValueError, match="unknown StateKind 'bipolr'.*'bipolar'"):
        client.create_bank(name, 4, "bipolr")
    with pytest.raises(ValueError, match="EnergyFamily"):
        client.create_bank(name, 4, energy="lsee")
    with pytest.raises(ValueError):
        client.create_bank(name, 4, kind=99)
    assert name not in [b.name for b in client.list_banks()]


def test_list_banks_is_ordered_by_name_and_reflects_deletes(client, bank_name):
    names = [bank_name() for _ in range(3)]
    for n in reversed(names):
        client.create_bank(n, 3)
    listed = [b.name for b in client.list_banks()]
    assert [n for n in listed if n in names] == sorted(names)
    client.delete_bank(names[1])
    assert names[1] not in [b.name for b in client.list_banks()]
    with pytest.raises(engram_client.NotFound):
        client.get_bank(names[1])


def test_bank_info_counts_patterns_and_load(client, bank_name):
    name = bank_name()
    client.create_bank(name, 10, "continuous")
    client.store(name, np.zeros((4, 10)))
    info = client.get_bank(name)
    assert info.patterns == 4
    assert info.load == pytest.approx(4 / 10)
    assert info.bytes >= 4 * 10 * 4


# ---------------------------------------------------------------------------
# Patterns

def test_store_and_get_patterns_round_trip_bit_exactly(client, bank_name):
    rng = np.random.default_rng(1)
    name = bank_name()
    dim = 33
    client.create_bank(name, dim, "continuous")
    ids = [0, 1, 2 ** 32, 2 ** 53 + 1, 2 ** 63, 2 ** 64 - 2, 2 ** 64 - 1]
    rng.shuffle(ids)
    patterns = finite_float32(rng, (len(ids), dim))
    payloads = [rng.bytes(int(n)) for n in rng.integers(1, 5000, size=len(ids))]
    payloads[2] = b""
    stored = client.store(name, patterns, ids=np.array(ids, dtype=np.uint64), payloads=payloads)
    assert stored.dtype == np.uint64
    assert stored.tolist() == ids

    want = {i: (patterns[k], payloads[k]) for k, i in enumerate(ids)}
    order = [ids[4], ids[0], ids[6], ids[2]]
    got = client.get_patterns(name, order)
    assert got.ids.tolist() == order
    assert got.patterns.dtype == np.float32 and got.patterns.shape == (4, dim)
    for row, i in enumerate(order):
        assert np.array_equal(got.patterns[row].view(np.uint32), want[i][0].view(np.uint32))
        assert got.payloads[row] == want[i][1]


def test_get_patterns_pages_cover_the_bank_once(client, bank_name):
    rng = np.random.default_rng(2)
    name = bank_name()
    client.create_bank(name, 5)
    patterns = rng.standard_normal((11, 5)).astype(np.float32)
    ids = client.store(name, patterns, payloads=["p%d" % k for k in range(11)]).tolist()
    seen, start = {}, 0
    while True:
        page = client.get_patterns(name, page_start=start, page_size=4)
        assert len(page.ids) <= 4
        for i, row, payload in zip(page.ids.tolist(), page.patterns, page.payloads):
            assert i not in seen
            seen[i] = (row, payload)
        if page.next_page_start >= 11:
            break
        start = page.next_page_start
    assert sorted(seen) == sorted(ids)
    for k, i in enumerate(ids):
        assert np.array_equal(seen[i][0], patterns[k])
        assert seen[i][1] == ("p%d" % k).encode()


def test_store_assigns_distinct_fresh_ids_for_vectors_and_batches(client, bank_name):
    name = bank_name()
    client.create_bank(name, 4)
    first = client.store(name, np.arange(4.0))            # (N,) is a batch of one
    rest = client.store(name, np.ones((3, 4), dtype=np.float64))
    assert len(first) == 1 and len(rest) == 3
    all_ids = first.tolist() + rest.tolist()
    assert len(set(all_ids)) == 4
    got = client.get_patterns(name, all_ids)
    assert np.array_equal(got.patterns, np.vstack([np.arange(4.0), np.ones((3, 4))]))


def test_delete_patterns_is_atomic(client, bank_name):
    name = bank_name()
    client.create_bank(name, 2)
    ids = client.store(name, np.eye(2).repeat(3, axis=0)).tolist()
    assert client.delete_patterns(name, ids[:2]) == 2
    assert client.get_bank(name).patterns == 4
    with pytest.raises(engram_client.NotFound):
        client.get_patterns(name, [ids[0]])
    with pytest.raises(engram_client.NotFound):
        client.delete_patterns(name, [ids[2], ids[0]])   # ids[0] is gone: nothing deleted
    assert client.get_bank(name).patterns == 4


def test_ids_outside_uint64_are_rejected_before_calling(client, bank_name):
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        client.store(bank_name(), np.ones((1, 2)), ids=[2 ** 64])
    with pytest.raises(ValueError):
        client.get_patterns("any", [-1])
    with pytest.raises(TypeError):
        client.delete_patterns("any", np.array([1.5]))


# ---------------------------------------------------------------------------
# Retrieve

def test_retrieve_recalls_the_stored_pattern_from_a_corrupted_copy(client, bank_name):
    rng = np.random.default_rng(3)
    name = bank_name()
    n, k = 64, 16
    client.create_bank(name, n, "continuous", energy="lse", beta=1.0)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    ids = client.store(name, xi, payloads=["m%d" % i for i in range(k)]).tolist()
    target = 9
    query = xi[target] + rng.normal(0, 0.5, n).astype(np.float32)
    [r] = client.retrieve(name, query, return_trace=True)
    assert r.state.dtype == np.float32 and r.state.shape == (n,)
    np.testing.assert_allclose(r.state, xi[target], atol=1e-4)
    assert r.nearest.id == ids[target]
    assert r.nearest.payload == b"m%d" % target
    assert r.nearest.similarity == pytest.approx(float(xi[target] @ r.state), rel=1e-5)
    assert r.nearest.distance == pytest.approx(np.linalg.norm(r.state - xi[target]), abs=1e-3)
    assert r.converged and r.stop_reason == "converged"
    assert r.energy_trace[0] == pytest.approx(r.energy_start)
    assert r.energy_trace[-1] == pytest.approx(r.energy_end)
    assert np.all(np.diff(r.energy_trace) <= 1e-6 * np.abs(r.energy_trace[:-1]).max())


def test_retrieve_sync_lse_reaches_the_numpy_cccp_fixed_point(client, bank_name):
    """A soft softmax (small beta): the fixed point is a mixture of patterns,
    so it checks the dynamics, not only which memory wins."""
    rng = np.random.default_rng(4)
    name = bank_name()
    n, k, beta = 12, 6, 0.15
    client.create_bank(name, n, energy="lse", beta=beta)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    ids = client.store(name, xi).tolist()
    queries = rng.standard_normal((5, n)).astype(np.float32)
    results = client.retrieve(name, queries, dynamics="sync", tol=1e-7, max_steps=500)
    assert len(results) == 5
    for q, r in zip(queries, results):
        want = lse_cccp(xi, q, beta, tol=1e-7, max_steps=500)
        np.testing.assert_allclose(r.state, want, atol=2e-4)
        assert r.nearest.id == ids[nearest_row(xi, r.state)]
        energies, _ = lse_energy(xi, r.state[None, :], beta)
        assert r.energy_end == pytest.approx(energies[0], rel=1e-5, abs=1e-5)


def test_retrieve_bipolar_async_recovers_flipped_bits(client, bank_name):
    rng = np.random.default_rng(5)
    name = bank_name()
    n, k = 128, 6
    client.create_bank(name, n, pb.STATE_KIND_BIPOLAR,
                       energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_POLYNOMIAL, degree=3))
    xi = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32)
    ids = client.store(name, xi).tolist()
    queries = xi.copy()
    for q in queries:
        q[rng.choice(n, size=n // 5, replace=False)] *= -1
    results = client.retrieve(name, queries, dynamics=pb.DYNAMICS_ASYNC, seed=7)
    for i, r in enumerate(results):
        assert np.array_equal(r.state, xi[i])
        assert r.nearest.id == ids[i]


def test_retrieve_clamped_coordinates_keep_their_query_values(client, bank_name):
    """Pattern completion: the known half is clamped, the unknown half is noise."""
    rng = np.random.default_rng(6)
    name = bank_name()
    n, k = 96, 4
    client.create_bank(name, n, "bipolar", energy="polynomial", degree=3)
    xi = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32)
    client.store(name, xi)
    clamp = np.zeros(n, dtype=bool)
    clamp[: n // 2] = True
    query = xi[2].copy()
    query[~clamp] = rng.choice([-1.0, 1.0], size=n - n // 2)
    [r] = client.retrieve(name, query, clamp=clamp, dynamics="async")
    assert np.array_equal(r.state[clamp], query[clamp])
    assert np.array_equal(r.state, xi[2])


# ---------------------------------------------------------------------------
# Energy

def test_energy_of_an_lse_bank_matches_numpy(client, bank_name):
    rng = np.random.default_rng(7)
    name = bank_name()
    n, k, beta = 32, 20, 2.5
    client.create_bank(name, n, energy="lse", beta=beta)
    xi = rng.standard_normal((k, n)).astype(np.float32) * 0.5
    client.store(name, xi)
    states = rng.standard_normal((7, n)).astype(np.float32) * 0.5
    energies, gradients = client.energy(name, states, gradient=True)
    want_e, want_g = lse_energy(xi, states, beta)
    assert energies.dtype == np.float64 and energies.shape == (7,)
    np.testing.assert_allclose(energies, want_e, rtol=1e-5, atol=1e-5)
    assert gradients.dtype == np.float32 and gradients.shape == (7, n)
    np.testing.assert_allclose(gradients, want_g, rtol=1e-4, atol=1e-4)

    # A call-level override of beta, and no gradients unless asked for.
    result = client.energy(name, states[0], energy="lse", beta=0.7)
    assert result.gradients is None
    assert result.energies[0] == pytest.approx(lse_energy(xi, states[:1], 0.7)[0][0], rel=1e-5)


def test_energy_override_gaussian_and_classical_match_numpy(client, bank_name):
    rng = np.random.default_rng(8)
    name = bank_name()
    n, k = 10, 5
    client.create_bank(name, n, "bipolar", energy="classical")
    xi = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32)
    client.store(name, xi)
    states = rng.standard_normal((4, n)).astype(np.float32)
    classical = client.energy(name, states).energies
    np.testing.assert_allclose(classical, -0.5 * ((states.astype(np.float64) @ xi.T) ** 2).sum(1),
                               rtol=1e-5)
    gaussian = client.energy(name, states, energy="gaussian", beta=0.3).energies
    np.testing.assert_allclose(gaussian, gaussian_energy(xi, states, 0.3), rtol=1e-5)


# ---------------------------------------------------------------------------
# Sampling

def _memorizing_bank(client, name, rng, n=8, k=3):
    client.create_bank(name, n, "continuous", energy="gaussian")
    xi = (rng.standard_normal((k, n)) * 3).astype(np.float32)
    ids = client.store(name, xi).tolist()
    return xi, ids


def test_sample_lands_on_stored_patterns(client, bank_name):
    rng = np.random.default_rng(9)
    name = bank_name()
    xi, ids = _memorizing_bank(client, name, rng)
    res = client.sample(name, count=5, seed=11, steps=24, sigma_max=20, sigma_min=0.01)
    assert len(res.samples) == 5 and res.steps > 0
    assert res.sigmas.dtype == np.float64 and res.sigmas[0] == pytest.approx(20)
    for s in res.samples:
        row = nearest_row(xi, s.state)
        rel = np.linalg.norm(s.state - xi[row]) / np.linalg.norm(xi[row])
        assert s.nearest.id == ids[row]
        assert s.relative_distance == pytest.approx(rel, rel=1e-3, abs=1e-6)
        assert rel < 0.05 and s.sample_class == "memorized"


def test_sample_stream_yields_frames_then_the_unary_result(client, bank_name):
    rng = np.random.default_rng(10)
    name = bank_name()
    _memorizing_bank(client, name, rng)
    options = dict(count=3, seed=5, steps=12, sigma_max=20, sigma_min=0.01)
    frames = list(client.sample_stream(name, trajectory_every=4, **options))
    assert all(f.result is None for f in frames[:-1])
    assert [f.step for f in frames[:-1]] == [4, 8, 12]
    assert all(f.states.shape == (3, 8) and f.states.dtype == np.float32 for f in frames[:-1])
    sigmas = [f.sigma for f in frames[:-1]]
    assert sigmas == sorted(sigmas, reverse=True)
    final = frames[-1].result
    unary = client.sample(name, **options)
    assert np.array_equal(np.stack([s.state for s in final.samples]),
                          np.stack([s.state for s in unary.samples]))
    assert np.array_equal(frames[-2].states, np.stack([s.state for s in unary.samples]))
    assert np.array_equal(frames[-1].states, frames[-2].states)


def test_sample_stream_closed_early_cancels_cleanly(client, bank_name):
    rng = np.random.default_rng(11)
    name = bank_name()
    _memorizing_bank(client, name, rng)
    stream = client.sample_stream(name, count=2, steps=200, seed=1)
    first = next(stream)
    assert first.states.shape == (2, 8)
    stream.close()
    assert client.get_bank(name).patterns == 3


def test_sample_options_are_checked_before_calling(client):
    with pytest.raises(TypeError):
        client.sample("any", count=1, no_such_option=1)
    with pytest.raises(TypeError):
        client.sample_stream("any", no_such_option=1)
    with pytest.raises(ValueError, match="Sampler"):
        client.sample("any", sampler="heunn")


# ---------------------------------------------------------------------------
# Errors

def _raw_details(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_unknown_bank_raises_not_found_with_the_servers_message(client, raw_stub):
    with pytest.raises(engram_client.NotFound) as info:
        client.retrieve("no-such-bank", np.zeros(3))
    code, details = _raw_details(lambda: raw_stub.Retrieve(
        pb.RetrieveRequest(bank="no-such-bank", queries=[0.0, 0.0, 0.0]), timeout=10))
    assert info.value.code == code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == details
    assert "no-such-bank" in info.value.message
    assert isinstance(info.value, engram_client.EngramError)
    assert str(info.value) == "NOT_FOUND: " + details


def test_wrong_dimension_raises_invalid_argument_with_the_servers_message(
        client, raw_stub, bank_name):
    name = bank_name()
    client.create_bank(name, 8)
    with pytest.raises(engram_client.InvalidArgument) as info:
        client.store(name, np.ones((2, 7)))
    code, details = _raw_details(lambda: raw_stub.Store(
        pb.StoreRequest(bank=name, patterns=[1.0] * 14), timeout=10))
    assert info.value.code == code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == details
    assert client.get_bank(name).patterns == 0


def test_other_codes_map_to_their_classes(client, bank_name):
    name = bank_name()
    client.create_bank(name, 4)
    with pytest.raises(engram_client.AlreadyExists):
        client.create_bank(name, 4)
    with pytest.raises(engram_client.FailedPrecondition):
        client.retrieve(name, np.ones(4), dynamics="async")   # bipolar-only dynamics
    with pytest.raises(engram_client.InvalidArgument):
        client.create_bank(bank_name().upper(), 4)            # names are lowercase


def test_a_call_past_its_deadline_raises_deadline_exceeded(client, bank_name):
    name = bank_name()
    client.create_bank(name, 256, "continuous", energy="gaussian")
    client.store(name, np.random.default_rng(12).standard_normal((64, 256)))
    with pytest.raises(engram_client.DeadlineExceeded) as info:
        client.sample(name, count=64, steps=100000, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_backup_writes_the_file_it_reports(client, server, bank_name):
    import os
    client.create_bank(bank_name(), 3)
    result = client.backup("b-%d" % os.getpid())
    assert (os.path.realpath(os.path.dirname(result.path))
            == os.path.realpath(os.path.join(server.data_dir, "backups")))
    assert os.path.getsize(result.path) == result.bytes
    assert result.banks == len(client.list_banks())
    with pytest.raises(engram_client.AlreadyExists):
        client.backup("b-%d" % os.getpid())
