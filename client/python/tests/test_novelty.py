"""energy(..., novelty=True) against a real engramd: the novelty (mid-rank of a
state's energy among the stored patterns' own energies) and its z-score,
checked against a numpy reference computed here in double precision from the
stored patterns and the LSE energy."""
import pickle

import numpy as np
import pytest

import engram_client


# ---------------------------------------------------------------------------
# numpy reference (double precision), independent of the server and client

def lse_energies(xi, x, beta):
    """E(x) = -(1/beta) log sum_nu exp(beta xi_nu . x) + |x|^2 / 2 for each row
    of x (B, N), with xi (K, N)."""
    xi, x = np.asarray(xi, np.float64), np.atleast_2d(np.asarray(x, np.float64))
    s = beta * (x @ xi.T)                               # (B, K)
    m = s.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(s - m).sum(axis=1))
    return -lse / beta + 0.5 * (x * x).sum(axis=1)


def novelty_reference(reference_rows, xi, x, beta):
    """(novelty, z) of each row of x: the reference energies are those of the
    stored patterns `reference_rows` (each E(xi_mu) under the whole bank xi);
    novelty = (#below + #equal / 2) / R, z = (E(x) - mean) / population std."""
    stored = lse_energies(xi, reference_rows, beta)     # (R,)
    e = lse_energies(xi, x, beta)                       # (B,)
    below = (stored[None, :] < e[:, None]).sum(axis=1)
    equal = (stored[None, :] == e[:, None]).sum(axis=1)
    novelty = (below + 0.5 * equal) / stored.size
    std = stored.std()                                  # ddof=0: population
    z = (e - stored.mean()) / std if std > 0 else np.zeros_like(e)
    return novelty, z, stored


def novelty_keys(ids):
    """The documented order of the reference sample: the splitmix64
    finaliser of each pattern id (uint64 arithmetic, wrapping)."""
    z = np.asarray(ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def far_state(rng, n, scale=5.0):
    """scale * a random sign vector: far from every memory of a standard
    normal bank, so its energy is above every stored pattern's."""
    return scale * rng.choice([-1.0, 1.0], size=n)


def assert_novelty_matches(result, want_novelty, want_z, references):
    batch = len(want_novelty)
    assert result.novelty.dtype == np.float64 and result.novelty.shape == (batch,)
    assert result.novelty_z.dtype == np.float64 and result.novelty_z.shape == (batch,)
    # Within one rank of the reference (float32 vs double energies may swap a
    # near-tie), z to 1e-4.
    assert np.abs(result.novelty - want_novelty).max() <= 1.0 / references + 1e-12, (
        result.novelty, want_novelty)
    np.testing.assert_allclose(result.novelty_z, want_z, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------

def test_novelty_and_z_match_the_numpy_reference(client, bank_name):
    rng = np.random.default_rng(60)
    name = bank_name()
    n, k, beta = 16, 40, 4.0
    client.create_bank(name, n, energy="lse", beta=beta)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    client.store(name, xi)
    states = np.vstack([
        xi[7] + 0.05 * rng.standard_normal(n),       # near a stored pattern
        xi[21] + 0.3 * rng.standard_normal(n),       # a noisier copy
        0.5 * rng.standard_normal(n),                # a random small state
        far_state(rng, n),                           # far from every memory
    ]).astype(np.float32)

    result = client.energy(name, states, novelty=True)
    want_n, want_z, stored = novelty_reference(xi, xi, states, beta)
    assert_novelty_matches(result, want_n, want_z, k)
    np.testing.assert_allclose(result.energies, lse_energies(xi, states, beta), rtol=1e-5,
                               atol=1e-5)
    # The far state's energy is above every stored one: novelty exactly 1.
    assert lse_energies(xi, states[3:], beta)[0] > stored.max()
    assert result.novelty[3] == 1.0
    assert result.novelty_z[3] > 3.0
    # The state near a memory sits inside the stored distribution.
    assert 0.0 < result.novelty[0] < 1.0 and abs(result.novelty_z[0]) < 3.0

    # Still a pair; the rest outside it; nothing else changes with novelty.
    energies, gradients = result
    assert gradients is None and result.values is None
    plain = client.energy(name, states)
    assert np.array_equal(plain.energies, energies)
    assert plain.novelty is None and plain.novelty_z is None
    with_grad = client.energy(name, states, gradient=True, novelty=True)
    assert with_grad.gradients.shape == (4, n)
    assert np.array_equal(with_grad.novelty, result.novelty)
    assert np.array_equal(with_grad.novelty_z, result.novelty_z)
    # Repeated calls (the server caches the reference) agree.
    again = client.energy(name, states, novelty=True)
    assert np.array_equal(again.novelty, result.novelty)
    assert np.array_equal(again.novelty_z, result.novelty_z)

    # Pickles with its extra fields; repr names them.
    back = pickle.loads(pickle.dumps(result))
    assert np.array_equal(back.novelty, result.novelty)
    assert np.array_equal(back.novelty_z, result.novelty_z)
    assert "novelty=" in repr(result) and "novelty_z=" in repr(result)


def test_each_stored_pattern_scores_its_mid_rank(client, bank_name):
    rng = np.random.default_rng(61)
    name = bank_name()
    n, k, beta = 12, 25, 4.0
    client.create_bank(name, n, energy="lse", beta=beta)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    client.store(name, xi)
    result = client.energy(name, xi, novelty=True)
    want_n, want_z, stored = novelty_reference(xi, xi, xi, beta)
    assert_novelty_matches(result, want_n, want_z, k)
    # Distinct stored energies: pattern mu scores (rank_mu + 1/2) / K.
    assert np.unique(stored).size == k
    ranks = np.argsort(np.argsort(stored))
    assert np.abs(result.novelty - (ranks + 0.5) / k).max() <= 1.0 / k + 1e-12
    # z over the stored patterns themselves: mean 0, population std 1.
    assert abs(result.novelty_z.mean()) < 1e-4
    assert result.novelty_z.std() == pytest.approx(1.0, abs=1e-4)


def test_novelty_follows_an_energy_override_and_the_bank_contents(client, bank_name):
    rng = np.random.default_rng(62)
    name = bank_name()
    n, k = 10, 30
    client.create_bank(name, n, energy="lse", beta=4.0)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    client.store(name, xi)
    states = np.vstack([xi[2] + 0.1 * rng.standard_normal(n), 0.8 * rng.standard_normal(n),
                        far_state(rng, n)]).astype(np.float32)

    # The reference is computed under the call's energy, not the bank's.
    soft = client.energy(name, states, energy="lse", beta=0.5, novelty=True)
    want_n, want_z, _ = novelty_reference(xi, xi, states, 0.5)
    assert_novelty_matches(soft, want_n, want_z, k)
    assert soft.novelty[2] == 1.0

    # Storing changes the reference (a new bank version).
    more = rng.standard_normal((6, n)).astype(np.float32)
    client.store(name, more)
    both = np.vstack([xi, more])
    grown = client.energy(name, states, novelty=True)
    want_n, want_z, _ = novelty_reference(both, both, states, 4.0)
    assert_novelty_matches(grown, want_n, want_z, k + 6)


def test_more_than_256_patterns_use_a_sample_chosen_by_id(client, bank_name):
    rng = np.random.default_rng(63)
    name = bank_name()
    n, k, beta = 8, 300, 4.0
    client.create_bank(name, n, energy="lse", beta=beta)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    ids = client.store(name, xi)
    states = np.vstack([xi[5] + 0.05 * rng.standard_normal(n), xi[150],
                        0.5 * rng.standard_normal((3, n)), far_state(rng, n)]).astype(np.float32)
    result = client.energy(name, states, novelty=True)
    # The 256 patterns of the smallest keys of their ids.
    reference = xi[np.argsort(novelty_keys(ids), kind="stable")[:256]]
    want_n, want_z, _ = novelty_reference(reference, xi, states, beta)
    assert_novelty_matches(result, want_n, want_z, len(reference))
    assert result.novelty[-1] == 1.0
    # Not all 300 patterns, not the first 256, not an even stride: z differs.
    for other in (xi, xi[:256], xi[::2]):
        _, z_other, _ = novelty_reference(other, xi, states, beta)
        assert np.abs(z_other - want_z).max() > 1e-4


def test_filtered_novelty_uses_the_passing_patterns_only(client, bank_name):
    rng = np.random.default_rng(64)
    name = bank_name()
    n, k, beta = 12, 40, 4.0
    client.create_bank(name, n, energy="lse", beta=beta)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    labels = [{"lang": ("en", "de")[i % 2], "year": 2000 + i} for i in range(k)]
    client.store(name, xi, labels=labels)
    states = np.vstack([xi[4] + 0.05 * rng.standard_normal(n), 0.5 * rng.standard_normal(n),
                        far_state(rng, n)]).astype(np.float32)
    spec = {"lang": "en", "year": engram_client.Range(2010, 2039)}
    mask = np.array([lab["lang"] == "en" and 2010 <= lab["year"] <= 2039 for lab in labels])
    sub = xi[mask]
    assert 0 < len(sub) < k

    result = client.energy(name, states, filter=spec, novelty=True)
    want_n, want_z, _ = novelty_reference(sub, sub, states, beta)
    assert_novelty_matches(result, want_n, want_z, len(sub))
    np.testing.assert_allclose(result.energies, lse_energies(sub, states, beta), rtol=1e-5,
                               atol=1e-5)
    # Not the whole bank's reference.
    whole_n, whole_z, _ = novelty_reference(xi, xi, states, beta)
    assert np.abs(whole_z - want_z).max() > 1e-3


def test_an_empty_reference_scores_one_half_and_z_zero(client, bank_name):
    name = bank_name()
    client.create_bank(name, 4, energy="lse", beta=4.0)
    empty = client.energy(name, np.ones((2, 4)), novelty=True)
    assert empty.novelty.tolist() == [0.5, 0.5] and empty.novelty_z.tolist() == [0.0, 0.0]
    client.store(name, np.eye(4, dtype=np.float32), labels=[{"a": "x"}] * 4)
    none_pass = client.energy(name, np.ones((2, 4)), filter={"a": "y"}, novelty=True)
    assert none_pass.novelty.tolist() == [0.5, 0.5]
    assert none_pass.novelty_z.tolist() == [0.0, 0.0]


def test_energy_request_sets_return_novelty():
    req, batch = engram_client.energy_request("b", np.ones((3, 2)), novelty=True)
    assert req.return_novelty and batch == 3
    req, _ = engram_client.energy_request("b", np.ones(2))
    assert not req.return_novelty
    assert engram_client.EnergyResult(np.zeros(2)).novelty is None
