"""Key -> value banks, labels with filtered calls, and time to live, against a
real engramd. Readouts are checked against numpy references of the attention
step, filtered calls against a second bank that holds only the matching
patterns (and against the numpy dynamics on that subset)."""
import time

import numpy as np
import pytest

import engram_client
from engram_client import Range, pb
from test_client import finite_float32, lse_cccp, lse_energy


# ---------------------------------------------------------------------------
# numpy references (double precision)

def readout(xi, values, x, beta, family="lse"):
    """sum_mu p_mu v_mu with p = softmax(beta * S): S = Xi x for lse,
    -|x - xi_mu|^2 / 2 for gaussian. x is (N,) or (B, N)."""
    xi, values, x = (a.astype(np.float64) for a in (xi, values, np.atleast_2d(x)))
    if family == "lse":
        s = x @ xi.T
    else:
        s = -0.5 * ((x[:, None, :] - xi[None, :, :]) ** 2).sum(axis=2)
    z = beta * s
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p @ values


def now_ms():
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------
# Banks with values

def test_bank_info_echoes_value_dim_and_ttl(client, bank_name):
    info = client.create_bank(bank_name(), 8, value_dim=5, ttl_seconds=3600)
    assert (info.value_dim, info.ttl_seconds) == (5, 3600)
    assert (info.raw.value_dim, info.raw.ttl_seconds) == (5, 3600)
    assert client.get_bank(info.name) == info
    plain = client.create_bank(bank_name(), 8)
    assert (plain.value_dim, plain.ttl_seconds) == (0, 0)


def test_decay_weighs_patterns_by_the_age_the_server_recorded(client, bank_name):
    # Two equally good matches stored ~0.4 s apart on a bank whose weights
    # halve every second: one step from their midpoint weighs the older one
    # by 2^(-(t_b - t_a) / 1 s) relative to the newer, whatever the time of
    # the call, with t_a, t_b the store times the server reports.
    name = bank_name()
    n, beta = 4, 2.0
    info = client.create_bank(name, n, energy="lse", beta=beta, decay_half_life_seconds=1)
    assert (info.decay_half_life_seconds, info.raw.decay_half_life_seconds) == (1, 1)
    eye = np.eye(n, dtype=np.float32)
    lo = now_ms()
    client.store(name, eye[:1])
    time.sleep(0.4)
    client.store(name, eye[1:2])
    hi = now_ms()
    got = client.get_patterns(name)
    assert got.stored_unix_ms.dtype == np.int64
    t_a, t_b = got.stored_unix_ms.tolist()
    assert lo <= t_a < t_b <= hi
    [res] = client.retrieve(name, 0.5 * (eye[0] + eye[1]), max_steps=1)
    older = 2.0 ** (-(t_b - t_a) / 1000.0)
    np.testing.assert_allclose(res.state[:2], [older / (1 + older), 1 / (1 + older)], atol=1e-5)
    with pytest.raises(engram_client.FailedPrecondition):
        client.retrieve(name, eye[0], energy=pb.EnergyConfig(
            family=pb.ENERGY_FAMILY_GENERAL, separation=pb.SEPARATION_SPARSEMAX))
    with pytest.raises(engram_client.FailedPrecondition):
        client.create_bank(bank_name(), n, "bipolar", decay_half_life_seconds=1)


@pytest.mark.parametrize("family", ["lse", "gaussian"])
def test_energy_values_are_the_numpy_attention_readout(client, bank_name, family):
    rng = np.random.default_rng(30)
    name = bank_name()
    n, k, m, beta = 16, 12, 5, 0.35
    client.create_bank(name, n, energy=family, beta=beta, value_dim=m)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    v = rng.standard_normal((k, m)).astype(np.float32)
    client.store(name, xi, values=v)
    # Random states (soft mixtures of values) and states near patterns.
    states = np.vstack([rng.standard_normal((4, n)),
                        xi[:2] + 0.3 * rng.standard_normal((2, n))]).astype(np.float32)
    result = client.energy(name, states)
    assert result.values.dtype == np.float32 and result.values.shape == (6, m)
    want = readout(xi, v, states, beta, family)
    np.testing.assert_allclose(result.values, want, rtol=1e-5, atol=1e-6)
    # The mixture is not one stored value (the test would not tell p apart).
    assert np.abs(want - v[np.argmax(np.abs(want @ v.T), axis=1)]).max() > 0.1
    # An energy override changes the weights: the readout follows it.
    other = client.energy(name, states, energy=family, beta=2.0)
    np.testing.assert_allclose(other.values, readout(xi, v, states, 2.0, family),
                               rtol=1e-5, atol=1e-6)
    energies, gradients = result   # still a pair
    assert gradients is None and energies.shape == (6,)
    if family == "lse":
        np.testing.assert_allclose(energies, lse_energy(xi, states, beta)[0], rtol=1e-5,
                                   atol=1e-5)


def test_retrieve_from_a_corrupted_key_reads_out_its_value(client, bank_name):
    rng = np.random.default_rng(31)
    name = bank_name()
    n, k, m, beta = 64, 16, 8, 12.0
    client.create_bank(name, n, energy="lse", beta=beta, value_dim=m)
    xi = rng.standard_normal((k, n)).astype(np.float32)
    v = rng.standard_normal((k, m)).astype(np.float32)
    ids = client.store(name, xi, values=v, payloads=["k%d" % i for i in range(k)]).tolist()
    targets = [2, 11]
    queries = xi[targets] + rng.normal(0, 0.5, (2, n)).astype(np.float32)
    results = client.retrieve(name, queries)
    for t, r in zip(targets, results):
        assert r.converged and r.nearest.id == ids[t]
        assert r.value.dtype == np.float32 and r.value.shape == (m,)
        np.testing.assert_allclose(r.value, v[t], atol=1e-4)
        # The readout at the returned state, exactly as numpy computes it.
        np.testing.assert_allclose(r.value, readout(xi, v, r.state, beta)[0], rtol=1e-5,
                                   atol=1e-6)


def test_banks_without_values_return_none(client, bank_name):
    name = bank_name()
    client.create_bank(name, 4)
    client.store(name, np.eye(4))
    [r] = client.retrieve(name, np.ones(4))
    assert r.value is None
    assert client.energy(name, np.ones(4)).values is None
    assert client.get_patterns(name).values is None


# ---------------------------------------------------------------------------
# Labels, values and expiry round trip

def test_labels_values_and_expiry_round_trip_bit_for_bit(client, bank_name):
    rng = np.random.default_rng(32)
    name = bank_name()
    n, m = 6, 7
    client.create_bank(name, n, value_dim=m, ttl_seconds=3600)
    xi = rng.standard_normal((5, n)).astype(np.float32)
    v = finite_float32(rng, (5, m))
    labels = [{"lang": "en", "year": 2001},
              {"lang": "d\u00e9 \u6f22\u5b57", "min": -2 ** 63, "max": 2 ** 63 - 1},
              {},
              {"only": np.int64(-7), "k" * 256: "v" * 256},
              {"empty": ""}]
    before = now_ms()
    ids = client.store(name, xi[:3], ids=[10, 11, 12], values=v[:3], labels=labels[:3])
    after_default = now_ms()
    client.store(name, xi[3:], ids=[13, 14], values=v[3:], labels=labels[3:], ttl_seconds=7200)
    after = now_ms()
    assert ids.tolist() == [10, 11, 12]

    for got in (client.get_patterns(name, [14, 10, 13, 11, 12]),
                client.get_patterns(name, page_start=0, page_size=5)):
        order = [int(i) - 10 for i in got.ids]
        assert sorted(order) == [0, 1, 2, 3, 4]
        assert got.values.dtype == np.float32 and got.values.shape == (5, m)
        assert np.array_equal(got.values.view(np.uint32), v[order].view(np.uint32))
        assert np.array_equal(got.patterns, xi[order])
        for row, i in enumerate(order):
            want = {key: int(val) if isinstance(val, np.integer) else val
                    for key, val in labels[i].items()}
            assert got.labels[row] == want
            assert {key: type(val) for key, val in got.labels[row].items()} \
                == {key: type(val) for key, val in want.items()}
        assert got.expires_unix_ms.dtype == np.int64
        for row, i in enumerate(order):
            ttl_ms = 3600 * 1000 if i < 3 else 7200 * 1000
            lo, hi = (before, after_default) if i < 3 else (after_default, after)
            assert lo + ttl_ms - 5 <= got.expires_unix_ms[row] <= hi + ttl_ms + 5


def test_patterns_without_ttl_never_expire(client, bank_name):
    name = bank_name()
    client.create_bank(name, 3)
    client.store(name, np.eye(3))
    got = client.get_patterns(name)
    assert got.expires_unix_ms.tolist() == [0, 0, 0]
    assert got.labels == [{}, {}, {}]


def test_expired_patterns_leave_reads_at_once_and_the_bank_soon(client, bank_name):
    rng = np.random.default_rng(33)
    name = bank_name()
    n, beta = 32, 4.0
    client.create_bank(name, n, energy="lse", beta=beta, value_dim=2)
    xi = rng.standard_normal((2, n)).astype(np.float32)
    client.store(name, xi[:1], ids=[1], values=[[1, 0]], labels=[{"tag": "keep"}])
    client.store(name, xi[1:], ids=[2], values=[[0, 1]], labels=[{"tag": "temp"}],
                 ttl_seconds=1)
    [expires] = client.get_patterns(name, [2]).expires_unix_ms.tolist()
    assert 0 < expires - now_ms() <= 1000
    [r] = client.retrieve(name, xi[1])
    assert r.nearest.id == 2 and np.allclose(r.value, [0, 1], atol=1e-4)

    time.sleep(max(0.0, (expires - now_ms() + 20) / 1000))
    # Past its expiry the pattern is out of every read, swept or not.
    [r] = client.retrieve(name, xi[1])
    assert r.nearest.id == 1
    np.testing.assert_allclose(r.value, [1, 0], atol=1e-6)   # one pattern: its value
    energies, _ = client.energy(name, xi)
    np.testing.assert_allclose(energies, lse_energy(xi[:1], xi, beta)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(engram_client.FailedPrecondition):
        client.retrieve(name, xi[1], filter={"tag": "temp"})

    # The sweep (every 1000 ms by default) deletes it from the bank.
    deadline = time.monotonic() + 2.5
    while True:
        try:
            client.get_patterns(name, [2])
        except engram_client.NotFound:
            break
        assert time.monotonic() < deadline, "expired pattern 2 still stored"
        time.sleep(0.05)
    assert client.get_bank(name).patterns == 1
    assert client.get_patterns(name).ids.tolist() == [1]


# ---------------------------------------------------------------------------
# Filters

K_LABELLED = 24


def _labels(i):
    """lang cycles en, de, fr; year 1995 + i, missing for every fifth pattern."""
    out = {"lang": ("en", "de", "fr")[i % 3]}
    if i % 5 != 4:
        out["year"] = 1995 + i
    return out


FILTERS = [
    ("equals", {"lang": "en"}, lambda lab: lab["lang"] == "en"),
    ("any_of", {"lang": ["de", "fr"]}, lambda lab: lab["lang"] in ("de", "fr")),
    ("int_range", {"year": Range(2000, 2009)}, lambda lab: 2000 <= lab.get("year", 0) <= 2009),
    ("int_equals", {"year": 2003}, lambda lab: lab.get("year") == 2003),
    ("and_int_any_of", {"lang": "en", "year": {2001, 2004, 2007, 2010, 2013}},
     lambda lab: lab["lang"] == "en" and lab.get("year") in (2001, 2004, 2007, 2010, 2013)),
]


@pytest.fixture
def labelled(client, bank_name):
    """A soft LSE bank (beta 0.25: recall mixes patterns, so the result depends
    on which are in the bank) of K_LABELLED labelled patterns with values;
    returns (make_subset(mask) -> bank name, name, xi, values, ids, labels)."""
    rng = np.random.default_rng(34)
    n, m, beta = 16, 3, 0.25
    name = bank_name()
    client.create_bank(name, n, energy="lse", beta=beta, value_dim=m)
    xi = rng.standard_normal((K_LABELLED, n)).astype(np.float32)
    v = rng.standard_normal((K_LABELLED, m)).astype(np.float32)
    ids = np.arange(100, 100 + K_LABELLED, dtype=np.uint64)
    labels = [_labels(i) for i in range(K_LABELLED)]
    payloads = [b"p%d" % i for i in range(K_LABELLED)]
    client.store(name, xi, ids=ids, payloads=payloads, values=v, labels=labels)

    def make_subset(mask):
        sub = bank_name()
        client.create_bank(sub, n, energy="lse", beta=beta, value_dim=m)
        client.store(sub, xi[mask], ids=ids[mask], payloads=[p for p, k in zip(payloads, mask)
                                                             if k], values=v[mask])
        return sub

    return dict(make_subset=make_subset, name=name, xi=xi, v=v, ids=ids, labels=labels,
                beta=beta, n=n)


@pytest.mark.parametrize("spec,predicate", [f[1:] for f in FILTERS], ids=[f[0] for f in FILTERS])
def test_filtered_calls_equal_calls_on_a_bank_of_the_matching_patterns(
        client, labelled, spec, predicate):
    b = labelled
    mask = np.array([predicate(lab) for lab in b["labels"]])
    assert 0 < mask.sum() < K_LABELLED
    subset = b["make_subset"](mask)
    queries = np.random.default_rng(35).standard_normal((3, b["n"])).astype(np.float32)
    opts = dict(tol=1e-7, max_steps=500)

    filtered = client.retrieve(b["name"], queries, filter=spec, **opts)
    alone = client.retrieve(subset, queries, **opts)
    unfiltered = client.retrieve(b["name"], queries, **opts)
    moved = 0.0
    for q, f, a, u in zip(queries, filtered, alone, unfiltered):
        np.testing.assert_allclose(f.state, a.state, atol=1e-6)
        np.testing.assert_allclose(f.state, lse_cccp(b["xi"][mask], q, b["beta"], tol=1e-7,
                                                      max_steps=500), atol=2e-4)
        np.testing.assert_allclose(f.value, a.value, atol=1e-6)
        np.testing.assert_allclose(f.value, readout(b["xi"][mask], b["v"][mask], f.state,
                                                    b["beta"])[0], rtol=1e-5, atol=1e-6)
        assert f.nearest.id == a.nearest.id and f.nearest.payload == a.nearest.payload
        assert mask[int(f.nearest.id) - 100]
        assert f.energy_end == pytest.approx(a.energy_end, rel=1e-6, abs=1e-6)
        moved = max(moved, float(np.abs(f.state - u.state).max()))
    assert moved > 1e-2   # the filter changed the answer

    states = np.vstack([queries, b["xi"][:2]])
    fe = client.energy(b["name"], states, gradient=True, filter=spec)
    ae = client.energy(subset, states, gradient=True)
    want_e, want_g = lse_energy(b["xi"][mask], states, b["beta"])
    np.testing.assert_allclose(fe.energies, want_e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fe.gradients, want_g, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fe.energies, ae.energies, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fe.values, readout(b["xi"][mask], b["v"][mask], states,
                                                  b["beta"]), rtol=1e-5, atol=1e-6)


def test_filtered_sampling_equals_sampling_a_bank_of_the_matching_patterns(client, labelled):
    b = labelled
    spec = {"lang": "fr", "year": range(2000, 2020)}
    mask = np.array([lab["lang"] == "fr" and 2000 <= lab.get("year", 0) < 2020
                     for lab in b["labels"]])
    assert 1 < mask.sum() < K_LABELLED
    subset = b["make_subset"](mask)
    opts = dict(count=3, seed=5, steps=12, sigma_max=10, sigma_min=0.05)
    filtered = client.sample(b["name"], filter=spec, **opts)
    alone = client.sample(subset, **opts)
    for f, a in zip(filtered.samples, alone.samples):
        np.testing.assert_allclose(f.state, a.state, atol=1e-5)
        assert f.nearest.id == a.nearest.id and mask[int(f.nearest.id) - 100]
    frames = list(client.sample_stream(b["name"], filter=spec, trajectory_every=4, **opts))
    final = np.stack([s.state for s in frames[-1].result.samples])
    np.testing.assert_allclose(final, np.stack([s.state for s in alone.samples]), atol=1e-5)


def test_a_filter_nothing_passes_is_a_failed_precondition(client, labelled):
    name, x = labelled["name"], labelled["xi"][0]
    for spec in ({"lang": "xx"}, {"no_such_key": "en"}, {"lang": "en", "lang2": "de"},
                 {"year": Range(3000, 4000)}, {"lang": 5}):   # lang is a string label
        with pytest.raises(engram_client.FailedPrecondition):
            client.retrieve(name, x, filter=spec)
    with pytest.raises(engram_client.FailedPrecondition):
        client.sample(name, filter={"lang": "xx"}, steps=4)
    with pytest.raises(engram_client.FailedPrecondition):
        list(client.sample_stream(name, filter={"lang": "xx"}, steps=4))


def test_malformed_filters_are_invalid_arguments(client, labelled):
    name, x = labelled["name"], labelled["xi"][0]
    no_test = pb.Filter(conditions=[pb.Condition(key="lang")])
    too_many = {"k%d" % i: "v" for i in range(17)}
    for spec in ({"year": Range(2009, 2000)}, {"lang": []}, {"": "en"}, too_many, no_test,
                 {"year": range(5, 5)}):
        with pytest.raises(engram_client.InvalidArgument):
            client.retrieve(name, x, filter=spec)
    with pytest.raises(engram_client.InvalidArgument):
        client.energy(name, x, filter=no_test)
    with pytest.raises(engram_client.InvalidArgument):
        client.sample(name, filter={"lang": []}, steps=4)
    # What the client cannot encode fails before any call.
    for spec in ({"lang": True}, {"lang": 1.5}, {"lang": ["en", 1]}, {1: "en"}, [("lang", "en")],
                 {"year": Range(1.5, 2)}):
        with pytest.raises(TypeError):
            client.retrieve(name, x, filter=spec)
    with pytest.raises(ValueError, match="step"):
        client.energy(name, x, filter={"year": range(0, 10, 2)})


def test_label_filter_encodes_each_form():
    f = engram_client.label_filter({"a": "x", "b": ("x", "y"), "c": 3, "d": [1, np.int32(2)],
                                    "e": Range(-5, 5), "g": range(-5, 6)})
    assert [c.key for c in f.conditions] == list("abcdeg")
    assert [c.WhichOneof("test") for c in f.conditions] == [
        "equals", "any_of", "int_equals", "int_any_of", "int_range", "int_range"]
    a, b, c, d, e, g = f.conditions
    assert (a.equals, list(b.any_of.values), c.int_equals, list(d.int_any_of.values)) == \
        ("x", ["x", "y"], 3, [1, 2])
    assert (e.int_range.min, e.int_range.max) == (g.int_range.min, g.int_range.max) == (-5, 5)
    raw = pb.Filter(conditions=[pb.Condition(key="k", int_equals=1)])
    assert engram_client.label_filter(raw) == raw
    assert engram_client.label_filter(None) is None
    req = engram_client.retrieve_request("b", np.ones(2), filter={"a": "x"})
    assert req.filter == engram_client.label_filter({"a": "x"})
    assert not engram_client.retrieve_request("b", np.ones(2)).HasField("filter")


# ---------------------------------------------------------------------------
# Bad input leaves the bank unchanged

def test_bad_values_and_labels_are_refused_and_store_nothing(client, bank_name):
    name, plain = bank_name(), bank_name()
    n, m = 4, 3
    client.create_bank(name, n, value_dim=m)
    client.create_bank(plain, n)
    rng = np.random.default_rng(36)
    client.store(name, rng.standard_normal((2, n)), values=rng.standard_normal((2, m)),
                 labels=[{"a": "x"}, {"a": 1}])
    client.store(plain, rng.standard_normal((2, n)))
    before = {b: client.get_patterns(b) for b in (name, plain)}

    xi = rng.standard_normal((2, n))
    nan = rng.standard_normal((2, m))
    nan[1, 2] = np.nan
    inf = np.ones((2, m))
    inf[0, 0] = np.inf
    refused = [
        (name, dict(values=np.ones((2, m + 1)))),         # wrong M
        (name, dict(values=np.ones((2, m - 1)))),
        (name, dict()),                                     # values required
        (name, dict(values=nan)),
        (name, dict(values=inf)),
        (plain, dict(values=np.ones((2, 1)))),            # bank without values
        (name, dict(values=np.ones((2, m)), labels=[{"a": "x"}])),   # one label set for two
        (name, dict(values=np.ones((2, m)), labels=[{"k" * 257: "x"}, {}])),
        (name, dict(values=np.ones((2, m)), labels=[{"a": "v" * 257}, {}])),
        (name, dict(values=np.ones((2, m)), ttl_seconds=101 * 366 * 86400)),
    ]
    for bank, kwargs in refused:
        with pytest.raises(engram_client.InvalidArgument):
            client.store(bank, xi, **kwargs)
    with pytest.raises(ValueError, match="rows"):
        client.store(name, xi, values=np.ones((3, m)))
    with pytest.raises(TypeError):
        client.store(name, xi, values=np.ones((2, m)), labels=[{"a": True}, {}])
    with pytest.raises(TypeError):
        client.store(name, xi, values=np.ones((2, m)), labels=[{"a": 1.0}, {}])

    for b, old in before.items():
        now = client.get_patterns(b)
        assert client.get_bank(b).patterns == 2
        assert now.ids.tolist() == old.ids.tolist()
        assert np.array_equal(now.patterns, old.patterns)
        assert now.labels == old.labels
        assert (now.values is None) == (old.values is None)
        if old.values is not None:
            assert np.array_equal(now.values, old.values)
