// Key -> value banks, labels with filters, and time to live: the value
// readout against a plain double-precision attention computed here, a
// filtered bank against a bank built from the subset, the label index
// against a scan, expiry with an injected clock, decay with age against a
// softmax weighted by 2^(-age / half-life) computed here, and durability of
// values, labels, expiry and store times (also for a database written before
// they existed).
#include <sqlite3.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <tuple>

#include <gtest/gtest.h>

#include "engram/core/dynamics.h"
#include "engram/core/filter.h"
#include "engram/core/readout.h"
#include "engram/core/registry.h"
#include "engram/core/sampler.h"
#include "testing/decay_reference.h"
#include "testing/random_banks.h"
#include "testing/status_matchers.h"

namespace engram::core {
namespace {

using engram::testing::RandomBipolar;
using engram::testing::RandomGaussian;
using engram::testing::DecayReference;
using engram::testing::ReferenceDecay;
using engram::testing::StatusIs;

// sum_mu p_mu v_mu with p computed in double from the definitions.
std::vector<double> ReferenceReadout(const std::vector<float>& xi, const std::vector<float>& v,
                                     int n, int m, const std::vector<float>& x,
                                     const EnergyConfig& c) {
  const int64_t k = static_cast<int64_t>(xi.size()) / n;
  std::vector<double> s(k), p(k);
  for (int64_t mu = 0; mu < k; ++mu) {
    double dot = 0, l2 = 0;
    for (int i = 0; i < n; ++i) {
      dot += double{xi[mu * n + i]} * x[i];
      l2 += (double{xi[mu * n + i]} - x[i]) * (double{xi[mu * n + i]} - x[i]);
    }
    s[mu] = c.family == EnergyFamily::kGaussian ? -0.5 * l2 : dot;
  }
  if (c.family == EnergyFamily::kClassical) {
    p = s;  // F(s) = s^2 / 2, F'(s) = s
  } else if (c.family == EnergyFamily::kGeneral && c.separation == SeparationKind::kMax) {
    int64_t best = 0;
    for (int64_t mu = 1; mu < k; ++mu) best = s[mu] > s[best] ? mu : best;
    p[best] = 1.0;
  } else {
    double top = -INFINITY, z = 0;
    for (double t : s) top = std::max(top, c.beta * t);
    for (int64_t mu = 0; mu < k; ++mu) z += p[mu] = std::exp(c.beta * s[mu] - top);
    for (double& t : p) t /= z;
  }
  std::vector<double> out(m, 0.0);
  for (int64_t mu = 0; mu < k; ++mu) {
    for (int j = 0; j < m; ++j) out[j] += p[mu] * v[mu * m + j];
  }
  return out;
}

Bank ValueBank(int n, int m, const std::vector<float>& xi, const std::vector<float>& v,
               EnergyConfig c, StateKind kind = StateKind::kContinuous,
               Precision precision = Precision::kF32) {
  BankSpec spec{"kv", n, kind, c, precision, m};
  Bank bank(spec);
  const int64_t k = static_cast<int64_t>(xi.size()) / n;
  bank.Append(xi, bank.AssignIds(k), {}, PatternExtras{v, {}, {}});
  return bank;
}

TEST(ValueReadoutTest, EqualsAttentionComputedInDouble) {
  std::mt19937_64 rng(7);
  const int n = 24, m = 5, k = 300;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 0.3f);
  auto v = RandomGaussian(int64_t{k} * m, rng);
  auto x = RandomGaussian(n, rng, 0.3f);
  for (EnergyConfig c : {EnergyConfig{.family = EnergyFamily::kLse, .beta = 3.0},
                         EnergyConfig{.family = EnergyFamily::kGaussian, .beta = 2.0},
                         EnergyConfig{.family = EnergyFamily::kGeneral, .beta = 1.0,
                                      .similarity = SimilarityKind::kDot,
                                      .separation = SeparationKind::kMax}}) {
    Bank bank = ValueBank(n, m, xi, v, c);
    EnergyFunction energy(c, bank.view());
    std::vector<float> got(m);
    ValueReadout(energy, bank.value(0), m, x.data(), got.data());
    std::vector<double> want = ReferenceReadout(xi, v, n, m, x, c);
    for (int j = 0; j < m; ++j) {
      EXPECT_NEAR(got[j], want[j], 1e-5 * (1 + std::fabs(want[j])))
          << EnergyFamilyName(c.family) << " coordinate " << j;
    }
  }
}

TEST(ValueReadoutTest, LinearAssociatorOnABipolarBank) {
  std::mt19937_64 rng(8);
  const int n = 40, m = 3, k = 6;
  auto xi = RandomBipolar(int64_t{k} * n, rng);
  auto v = RandomGaussian(int64_t{k} * m, rng);
  EnergyConfig c{.family = EnergyFamily::kClassical};
  Bank bank = ValueBank(n, m, xi, v, c, StateKind::kBipolar, Precision::kBitPacked);
  EnergyFunction energy(c, bank.view());
  std::vector<float> x(xi.begin() + 2 * n, xi.begin() + 3 * n);
  std::vector<float> got(m);
  ValueReadout(energy, bank.value(0), m, x.data(), got.data());
  std::vector<double> want = ReferenceReadout(xi, v, n, m, x, c);
  for (int j = 0; j < m; ++j) EXPECT_NEAR(got[j], want[j], 1e-4 * (1 + std::fabs(want[j])));
}

// Polynomial weights F'(s) = n s^(n-1) pass the float range (12 * 4096^11 ~
// 6e40): the readout stays finite and equal to the sum in double.
TEST(ValueReadoutTest, HugeUnnormalisedWeightsStayFinite) {
  std::mt19937_64 rng(16);
  const int n = 4096, m = 2, k = 3;
  auto xi = RandomBipolar(int64_t{k} * n, rng);
  std::vector<float> v = {0.f, 1.f, 2.f, -1.f, 0.5f, 0.f};
  EnergyConfig c{.family = EnergyFamily::kPolynomial, .degree = 12};
  Bank bank = ValueBank(n, m, xi, v, c, StateKind::kBipolar);
  EnergyFunction energy(c, bank.view());
  std::vector<float> x(xi.begin(), xi.begin() + n);
  std::vector<float> got(m);
  ValueReadout(energy, bank.value(0), m, x.data(), got.data());
  std::vector<double> want(m, 0.0);
  for (int mu = 0; mu < k; ++mu) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += double{xi[mu * n + i]} * x[i];
    for (int j = 0; j < m; ++j) want[j] += 12 * std::pow(s, 11) * v[mu * m + j];
  }
  for (int j = 0; j < m; ++j) {
    ASSERT_TRUE(std::isfinite(got[j]) || std::fabs(want[j]) > 3.4e38) << j;
    if (std::fabs(want[j]) < 3.4e38) EXPECT_NEAR(got[j], want[j], 1e-5 * std::fabs(want[j]));
  }
}

// Rows split over the compute threads: the merged sum is the whole sum.
TEST(ValueReadoutTest, ManyRowsMergeAcrossThreads) {
  std::mt19937_64 rng(9);
  const int n = 16, m = 4, k = 40000;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 0.25f);
  auto v = RandomGaussian(int64_t{k} * m, rng);
  auto x = RandomGaussian(n, rng, 0.25f);
  EnergyConfig c{.family = EnergyFamily::kLse, .beta = 1.5};
  Bank bank = ValueBank(n, m, xi, v, c);
  EnergyFunction energy(c, bank.view());
  std::vector<float> got(m);
  ValueReadout(energy, bank.value(0), m, x.data(), got.data());
  std::vector<double> want = ReferenceReadout(xi, v, n, m, x, c);
  for (int j = 0; j < m; ++j) EXPECT_NEAR(got[j], want[j], 1e-5 * (1 + std::fabs(want[j])));
}

// At the fixed point of a sharp softmax the readout is the value of the
// memory found.
TEST(ValueReadoutTest, ConvergedRetrievalReadsTheFoundMemorysValue) {
  std::mt19937_64 rng(10);
  const int n = 64, m = 3, k = 20;
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  auto v = RandomGaussian(int64_t{k} * m, rng);
  EnergyConfig c{.family = EnergyFamily::kLse, .beta = 8.0};
  Bank bank = ValueBank(n, m, xi, v, c);
  EnergyFunction energy(c, bank.view());
  std::vector<float> q(xi.begin() + 5 * n, xi.begin() + 6 * n);
  for (int i = 0; i < n; i += 4) q[i] += 0.3f;
  RetrieveOptions opts;
  auto t = RunDynamics(energy, StateKind::kContinuous, q, {}, opts);
  ASSERT_OK(t);
  std::vector<float> got(m);
  ValueReadout(energy, bank.value(0), m, t->state.data(), got.data());
  for (int j = 0; j < m; ++j) EXPECT_NEAR(got[j], v[5 * m + j], 1e-4);
}

// Sparse separations with the L2 similarity: the sync step minimises
// sum_mu p_mu |x - xi_mu|^2 / 2 - H(p) / beta alternately in x and p, so the
// energy never rises; a query with a margin is retrieved exactly.
// Weights of the compact separations from their definitions, by bisection
// on the threshold: sparsemax p = [z - tau]_+ and 1.5-entmax
// p = [z / 2 - tau]_+^2 with sum p = 1; log-sum-ReLU: the mean over the
// rows with 1 + z > 0.
std::vector<double> CompactReferenceWeights(const std::vector<double>& z, SeparationKind sep) {
  const size_t k = z.size();
  std::vector<double> p(k, 0.0);
  if (sep == SeparationKind::kLogSumRelu) {
    double in = 0;
    for (double v : z) in += 1.0 + v > 0.0;
    for (size_t i = 0; i < k; ++i) p[i] = 1.0 + z[i] > 0.0 ? 1.0 / in : 0.0;
    return p;
  }
  const bool sparse = sep == SeparationKind::kSparsemax;
  auto weight = [&](double zi, double tau) {
    const double d = std::max((sparse ? zi : zi / 2) - tau, 0.0);
    return sparse ? d : d * d;
  };
  const double top = *std::max_element(z.begin(), z.end());
  double lo = (sparse ? top : top / 2) - 1.0, hi = sparse ? top : top / 2;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    double sum = 0;
    for (double v : z) sum += weight(v, mid);
    (sum > 1.0 ? lo : hi) = mid;
  }
  for (size_t i = 0; i < k; ++i) p[i] = weight(z[i], 0.5 * (lo + hi));
  return p;
}

// The value readout of sparsemax, 1.5-entmax and log-sum-ReLU banks (which
// sums the values of the support alone) against sum_mu p_mu v_mu with p
// from the definitions, near a pattern (a small support) and between
// patterns (a larger one).
TEST(ValueReadoutTest, CompactSeparationsReadTheirSupportsValues) {
  std::mt19937_64 rng(71);
  const int n = 8, m = 3, k = 300;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 0.4f);
  auto v = RandomGaussian(int64_t{k} * m, rng);
  for (auto [sep, sim, beta] :
       {std::tuple{SeparationKind::kSparsemax, SimilarityKind::kDot, 6.0},
        std::tuple{SeparationKind::kEntmax15, SimilarityKind::kDot, 6.0},
        std::tuple{SeparationKind::kLogSumRelu, SimilarityKind::kNegHalfSqL2, 1.5}}) {
    const EnergyConfig c{.family = EnergyFamily::kGeneral, .beta = beta, .similarity = sim,
                         .separation = sep};
    Bank bank = ValueBank(n, m, xi, v, c);
    EnergyFunction energy(c, bank.view());
    for (int trial = 0; trial < 4; ++trial) {
      std::vector<float> x = RandomGaussian(n, rng, trial < 2 ? 0.05f : 0.4f);
      if (trial < 2) {
        for (int i = 0; i < n; ++i) x[i] += xi[(17 + trial) * n + i];
      }
      std::vector<double> z(k);
      for (int mu = 0; mu < k; ++mu) {
        double dot = 0, l2 = 0;
        for (int i = 0; i < n; ++i) {
          dot += double{xi[mu * n + i]} * x[i];
          l2 += (double{xi[mu * n + i]} - x[i]) * (double{xi[mu * n + i]} - x[i]);
        }
        z[mu] = beta * (sim == SimilarityKind::kDot ? dot : -0.5 * l2);
      }
      const std::vector<double> p = CompactReferenceWeights(z, sep);
      int support = 0;
      for (double w : p) support += w > 0;
      std::vector<float> got(m);
      ValueReadout(energy, bank.value(0), m, x.data(), got.data());
      for (int j = 0; j < m; ++j) {
        double want = 0;
        for (int mu = 0; mu < k; ++mu) want += p[mu] * v[mu * m + j];
        EXPECT_NEAR(got[j], want, 1e-5) << static_cast<int>(sep) << " trial " << trial
                                        << " support " << support;
      }
    }
  }
}

TEST(SparseRetrievalTest, SyncDescendsAndRetrievesExactlyWithAMargin) {
  std::mt19937_64 rng(15);
  const int n = 64, k = 30;
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  for (SeparationKind sep : {SeparationKind::kSparsemax, SeparationKind::kEntmax15}) {
    EnergyConfig c{.family = EnergyFamily::kGeneral, .beta = 1.0,
                   .similarity = SimilarityKind::kNegHalfSqL2, .separation = sep};
    Bank bank = engram::testing::MakeBank(n, StateKind::kContinuous, xi, c);
    EnergyFunction energy(c, bank.view());
    std::vector<float> q(xi.begin() + 5 * n, xi.begin() + 6 * n);
    for (int i = 0; i < n; ++i) q[i] += 0.1f * ((i % 3) - 1);
    RetrieveOptions opts;
    opts.record_trace = true;
    auto t = RunDynamics(energy, StateKind::kContinuous, q, {}, opts);
    ASSERT_OK(t);
    EXPECT_EQ(t->stop_reason, StopReason::kConverged);
    EXPECT_EQ(std::vector<float>(xi.begin() + 5 * n, xi.begin() + 6 * n), t->state)
        << "separation " << static_cast<int>(sep);
    // Diffuse weights (small beta, many rows in the support): still descent.
    EnergyConfig soft = c;
    soft.beta = 0.02;
    EnergyFunction diffuse(soft, bank.view());
    for (int trial = 0; trial < 5; ++trial) {
      auto x = RandomGaussian(n, rng, 1.5f);
      RetrieveOptions o;
      o.record_trace = true;
      o.max_steps = 50;
      auto d = RunDynamics(diffuse, StateKind::kContinuous, x, {}, o);
      ASSERT_OK(d);
      ASSERT_GE(d->energy_trace.size(), 2u);
      // Up to EnergyTolerance, the rounding of f32 similarities (as the
      // Lyapunov tests): near a fixed point the energy moves only by it.
      for (size_t i = 1; i < d->energy_trace.size(); ++i) {
        EXPECT_LE(d->energy_trace[i],
                  d->energy_trace[i - 1] +
                      EnergyTolerance(d->energy_trace[i - 1], d->energy_trace[i]))
            << "separation " << static_cast<int>(sep) << " step " << i;
      }
    }
  }
}

// The log-sum-ReLU energy's sync step is the mean shift over the patterns
// whose support holds x: exact retrieval inside one support, a new minimum
// at the mean where two supports overlap, descent throughout, and a state
// in no support stays.
TEST(LogSumReluTest, MeanShiftRetrievesExactlyAndFindsEmergentMinima) {
  const int n = 4;
  // Two patterns 1 apart and one far away; beta = 1: support radius sqrt(2).
  std::vector<float> xi = {0, 0, 0, 0, 1, 0, 0, 0, 10, 10, 10, 10};
  EnergyConfig c{.family = EnergyFamily::kGeneral, .beta = 1.0,
                 .similarity = SimilarityKind::kNegHalfSqL2,
                 .separation = SeparationKind::kLogSumRelu};
  Bank bank = engram::testing::MakeBank(n, StateKind::kContinuous, xi, c);
  EnergyFunction energy(c, bank.view());
  RetrieveOptions opts;
  opts.record_trace = true;
  auto run = [&](std::vector<float> q) {
    auto t = RunDynamics(energy, StateKind::kContinuous, q, {}, opts);
    EXPECT_OK(t);
    for (size_t i = 1; i < t->energy_trace.size(); ++i) {
      EXPECT_LE(t->energy_trace[i], t->energy_trace[i - 1] + 1e-12);
    }
    return t->state;
  };
  // Inside the far pattern's support only: exactly that pattern.
  EXPECT_EQ(run({10.3f, 9.8f, 10.2f, 10.1f}), (std::vector<float>{10, 10, 10, 10}));
  // Inside both near supports: their mean, a minimum that is no stored pattern.
  EXPECT_EQ(run({0.5f, 0.3f, -0.2f, 0.1f}), (std::vector<float>{0.5f, 0, 0, 0}));
  // Far from every support: a fixed point where it is.
  EXPECT_EQ(run({5, -5, 5, -5}), (std::vector<float>{5, -5, 5, -5}));
  // Energies: -(1/beta) log(eps + sum max(0, 1 - beta |x - xi|^2 / 2)).
  std::vector<float> mid = {0.5f, 0, 0, 0};
  EXPECT_NEAR(energy.Value(mid.data()), -std::log(1e-12 + 2 * (1 - 0.125)), 1e-9);
  // The value readout is the Epanechnikov kernel regression: the mean.
  std::vector<float> v = {1, 3, 100};
  Bank kv(BankSpec{"kv", n, StateKind::kContinuous, c, Precision::kF32, 1});
  kv.Append(xi, kv.AssignIds(3), {}, PatternExtras{v, {}, {}});
  EnergyFunction e2(c, kv.view());
  float out = 0;
  ValueReadout(e2, kv.value(0), 1, mid.data(), &out);
  EXPECT_FLOAT_EQ(out, 2.0f);
}

// Labels for row r: parity, a bucket, and a year.
Labels RowLabels(int r) {
  Labels l;
  l.strings = {{"kind", r % 2 == 0 ? "even" : "odd"}, {"bucket", "b" + std::to_string(r % 5)}};
  l.ints = {{"year", 1990 + r % 37}};
  if (r % 7 == 0) l.ints.emplace_back("lucky", 1);
  EXPECT_OK(l.Normalize());
  return l;
}

bool Passes(int r, const Filter& f) {
  const Labels l = RowLabels(r);
  for (const Condition& c : f.conditions) {
    bool ok = false;
    for (const auto& [key, value] : l.strings) {
      if (key != c.key) continue;
      if (c.op == Condition::kEquals || c.op == Condition::kAnyOf) {
        ok = std::find(c.strings.begin(), c.strings.end(), value) != c.strings.end();
      }
    }
    for (const auto& [key, value] : l.ints) {
      if (key != c.key) continue;
      if (c.op == Condition::kIntEquals || c.op == Condition::kIntAnyOf) {
        ok = std::find(c.ints.begin(), c.ints.end(), value) != c.ints.end();
      } else if (c.op == Condition::kIntRange) {
        ok = value >= c.lo && value <= c.hi;
      }
    }
    if (!ok) return false;
  }
  return true;
}

TEST(FilterTest, IndexAnswersEqualAScanOfTheLabels) {
  const int n = 4, k = 500;
  std::mt19937_64 rng(11);
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  Bank bank(BankSpec{"f", n, StateKind::kContinuous, {}, Precision::kF32});
  std::vector<Labels> labels;
  for (int r = 0; r < k; ++r) labels.push_back(RowLabels(r));
  bank.Append(xi, bank.AssignIds(k), {}, PatternExtras{{}, labels, {}});
  std::vector<Filter> filters = {
      {{{.key = "kind", .op = Condition::kEquals, .strings = {"odd"}}}},
      {{{.key = "bucket", .op = Condition::kAnyOf, .strings = {"b1", "b3", "b9", "b1"}}}},
      {{{.key = "year", .op = Condition::kIntRange, .lo = 2000, .hi = 2005}}},
      {{{.key = "year", .op = Condition::kIntAnyOf, .ints = {1990, 2026, 1}},
        {.key = "kind", .op = Condition::kEquals, .strings = {"even"}}}},
      {{{.key = "lucky", .op = Condition::kIntEquals, .ints = {1}},
        {.key = "bucket", .op = Condition::kAnyOf, .strings = {"b0", "b2"}},
        {.key = "year", .op = Condition::kIntRange, .lo = 1995, .hi = 2020}}},
      {{{.key = "missing", .op = Condition::kEquals, .strings = {"x"}}}},
      {{{.key = "year", .op = Condition::kEquals, .strings = {"1990"}}}},  // an int key
  };
  for (size_t i = 0; i < filters.size(); ++i) {
    ASSERT_OK(ValidateFilter(filters[i]));
    std::vector<int64_t> want;
    for (int r = 0; r < k; ++r) {
      if (Passes(r, filters[i])) want.push_back(r);
    }
    EXPECT_EQ(MatchingRows(bank, filters[i]), want) << "filter " << i;
  }
  // Removing rows renumbers them; the index follows.
  std::vector<uint64_t> gone;
  for (int r = 0; r < k; r += 3) gone.push_back(bank.id(r));
  bank.Remove(gone);
  Filter odd{{{.key = "kind", .op = Condition::kEquals, .strings = {"odd"}}}};
  for (int64_t row : MatchingRows(bank, odd)) EXPECT_EQ(bank.labels(row).strings[1].second, "odd");
  int odd_left = 0;
  for (int r = 0; r < k; ++r) odd_left += (r % 3 != 0 && r % 2 == 1);
  EXPECT_EQ(static_cast<int>(MatchingRows(bank, odd).size()), odd_left);
}

TEST(FilterTest, BadFiltersAreRejectedWithTheConditionNamed) {
  EXPECT_THAT(ValidateFilter({{{.key = "", .op = Condition::kEquals, .strings = {"a"}}}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateFilter({{{.key = "a", .op = Condition::kAnyOf}}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateFilter({{{.key = "y", .op = Condition::kIntRange, .lo = 5, .hi = 4}}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  Filter many;
  for (int i = 0; i <= kMaxConditions; ++i) {
    many.conditions.push_back({.key = "k", .op = Condition::kIntEquals, .ints = {i}});
  }
  EXPECT_THAT(ValidateFilter(many), StatusIs(absl::StatusCode::kInvalidArgument));
}

// A filtered bank computes exactly as a bank that holds only those patterns,
// at every precision.
TEST(FilterTest, SubsetComputesAsABankOfThoseOnly) {
  std::mt19937_64 rng(12);
  const int n = 48, k = 400;
  for (Precision precision : {Precision::kF32, Precision::kBf16, Precision::kF32Screened,
                              Precision::kBitPacked}) {
    const bool bipolar = precision == Precision::kBitPacked;
    const StateKind kind = bipolar ? StateKind::kBipolar : StateKind::kContinuous;
    EnergyConfig c = bipolar ? EnergyConfig{.family = EnergyFamily::kPolynomial, .degree = 3}
                             : EnergyConfig{.family = EnergyFamily::kLse, .beta = 6.0};
    auto xi = bipolar ? RandomBipolar(int64_t{k} * n, rng) : RandomGaussian(int64_t{k} * n, rng);
    BankSpec spec{"s", n, kind, c, precision};
    Bank whole(spec);
    std::vector<Labels> labels;
    for (int r = 0; r < k; ++r) labels.push_back(RowLabels(r));
    whole.Append(xi, whole.AssignIds(k), {}, PatternExtras{{}, labels, {}});
    Filter f{{{.key = "year", .op = Condition::kIntRange, .lo = 1995, .hi = 2010}}};
    std::vector<int64_t> rows = MatchingRows(whole, f);
    ASSERT_GT(rows.size(), 50u);
    Bank sub = whole.Subset(rows);
    Bank direct(spec);
    std::vector<float> data;
    std::vector<uint64_t> ids;
    for (int64_t r : rows) {
      data.insert(data.end(), whole.pattern(r), whole.pattern(r) + n);
      ids.push_back(whole.id(r));
    }
    direct.Append(data, ids, {});
    ASSERT_EQ(sub.size(), direct.size());
    EnergyFunction e_sub(c, sub.view()), e_direct(c, direct.view());
    for (int t = 0; t < 5; ++t) {
      const int64_t pick = rows[t * 7];
      std::vector<float> q(whole.pattern(pick), whole.pattern(pick) + n);
      if (bipolar) {
        q = engram::testing::FlipBits(q.data(), n, 6, rng);
      } else {
        for (float& z : q) z += 0.2f;
      }
      EXPECT_EQ(e_sub.Value(q.data()), e_direct.Value(q.data()));
      auto a = RunDynamics(e_sub, kind, q, {}, {});
      auto b = RunDynamics(e_direct, kind, q, {}, {});
      ASSERT_OK(a);
      ASSERT_OK(b);
      EXPECT_EQ(a->state, b->state);
      EXPECT_EQ(a->energy_end, b->energy_end);
      EXPECT_EQ(sub.id(sub.Nearest(a->state.data()).row),
                direct.id(direct.Nearest(b->state.data()).row));
    }
  }
}

// Decay with age: a bank whose rows were stored at the given times, with
// half-life h, and the prior of a computation at `now`.
Bank DecayBank(int n, const std::vector<float>& xi, const std::vector<int64_t>& stored,
               EnergyConfig c, int64_t h) {
  BankSpec spec{"d", n, StateKind::kContinuous, c, Precision::kF32, 0, 0, h};
  EXPECT_OK(ValidateBankSpec(spec));
  Bank bank(spec);
  const int64_t k = static_cast<int64_t>(xi.size()) / n;
  bank.Append(xi, bank.AssignIds(k), {}, PatternExtras{{}, {}, {}, stored});
  return bank;
}

TEST(DecayTest, EnergyGradientAndTargetWeighEachRowByItsAge) {
  std::mt19937_64 rng(61);
  const int n = 8, k = 40;
  const int64_t h = 3'600'000, now = 1'700'000'000'000;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 0.5f);
  std::vector<int64_t> stored(k);
  std::vector<double> ages(k);
  std::uniform_int_distribution<int64_t> age(0, 3 * h);
  for (int mu = 0; mu < k; ++mu) {
    stored[mu] = now - age(rng);
    ages[mu] = static_cast<double>(now - stored[mu]) / static_cast<double>(h);
  }
  stored[3] = now + 5'000;  // stored after `now` (a clock step back): age 0
  ages[3] = 0.0;
  for (EnergyConfig c :
       {EnergyConfig{.family = EnergyFamily::kLse, .beta = 3.0},
        EnergyConfig{.family = EnergyFamily::kGaussian, .beta = 2.0},
        EnergyConfig{.family = EnergyFamily::kGeneral, .beta = 1.5,
                     .similarity = SimilarityKind::kNegHalfSqL2}}) {
    SCOPED_TRACE(EnergyFamilyName(c.family));
    Bank bank = DecayBank(n, xi, stored, c, h);
    const std::vector<double> prior = bank.LogPrior(now);
    ASSERT_EQ(prior.size(), static_cast<size_t>(k));
    PatternView view = bank.view();
    view.log_prior = prior.data();
    EnergyFunction energy(c, view);
    for (int trial = 0; trial < 4; ++trial) {
      auto x = RandomGaussian(n, rng, 0.6f);
      const DecayReference ref = ReferenceDecay(xi, n, x, ages, c);
      std::vector<float> target(n), grad(n);
      const double e = energy.UpdateTarget(x.data(), target.data());
      EXPECT_NEAR(e, static_cast<double>(ref.energy), 1e-5 * (1 + std::fabs(e)));
      EXPECT_NEAR(energy.Value(x.data()), e, 1e-12 * (1 + std::fabs(e)));
      for (int i = 0; i < n; ++i) {
        EXPECT_NEAR(target[i], static_cast<double>(ref.target[i]), 1e-5) << i;
      }
      // The gradient against central differences of the value.
      energy.ValueAndGradient(x.data(), grad.data());
      for (int i = 0; i < n; ++i) {
        std::vector<float> up = x, down = x;
        const float step = 1e-2f;
        up[i] += step;
        down[i] -= step;
        const double fd = (energy.Value(up.data()) - energy.Value(down.data())) /
                          (double{up[i]} - double{down[i]});
        EXPECT_NEAR(grad[i], fd, 2e-3 * (1 + std::fabs(fd))) << i;
      }
    }
    // Batched states take the same evaluation as single ones.
    const int b = 9;
    auto states = RandomGaussian(int64_t{b} * n, rng, 0.6f);
    std::vector<float> targets(b * n), one(n);
    std::vector<double> energies(b);
    energy.UpdateTargetBatch(states.data(), b, targets.data(), energies.data());
    for (int q = 0; q < b; ++q) {
      EXPECT_EQ(energies[q], energy.UpdateTarget(states.data() + q * n, one.data()));
      for (int i = 0; i < n; ++i) EXPECT_EQ(targets[q * n + i], one[i]);
    }
  }
}

// Two equally good matches, one stored a half-life before the other: the
// older one has exactly half the weight, so one step gives (2 b + a) / 3,
// and retrieval ends at the newer one.
TEST(DecayTest, AnEqualMatchStoredOneHalfLifeEarlierWeighsHalf) {
  const int n = 2;
  const int64_t h = 60'000, t0 = 1'700'000'000'000;
  const std::vector<float> xi = {1, 0, 0, 1};
  const std::vector<float> x = {0.5f, 0.5f};
  for (EnergyFamily f : {EnergyFamily::kLse, EnergyFamily::kGaussian}) {
    SCOPED_TRACE(EnergyFamilyName(f));
    const EnergyConfig c{.family = f, .beta = 5.0};
    Bank bank = DecayBank(n, xi, {t0, t0 + h}, c, h);
    const std::vector<double> prior = bank.LogPrior(t0 + h);
    EXPECT_DOUBLE_EQ(prior[0], -std::log(2.0));
    EXPECT_EQ(prior[1], 0.0);
    PatternView view = bank.view();
    view.log_prior = prior.data();
    EnergyFunction energy(c, view);
    std::vector<float> target(n);
    energy.UpdateTarget(x.data(), target.data());
    EXPECT_NEAR(target[0], 1.0 / 3, 1e-6);
    EXPECT_NEAR(target[1], 2.0 / 3, 1e-6);
    const EnergyFunction sharp({.family = f, .beta = 40.0}, view);
    auto t = RunDynamics(sharp, StateKind::kContinuous, x, {}, RetrieveOptions{});
    ASSERT_OK(t);
    EXPECT_NEAR(t->state[1], 1.0, 1e-3);
    EXPECT_NEAR(t->state[0], 0.0, 1e-3);
    // Without the prior the two stay tied.
    const EnergyFunction plain(c, bank.view());
    plain.UpdateTarget(x.data(), target.data());
    EXPECT_NEAR(target[0], target[1], 1e-7);
  }
}

// Sampling with a prior: a memory many half-lives old has no weight left in
// the denoiser, so every sample is the recent memory; without the prior
// both memories are drawn.
TEST(DecayTest, SamplesForgetAMemoryLongPast) {
  const int n = 4;
  const int64_t h = 1'000, now = 1'700'000'000'000;
  const std::vector<float> xi = {1, 0, 0, 0, 0, 1, 0, 0};
  const EnergyConfig c{.family = EnergyFamily::kGaussian};
  Bank bank = DecayBank(n, xi, {now - 200 * h, now}, c, h);
  const std::vector<double> prior = bank.LogPrior(now);
  SampleOptions o;
  o.schedule = {.sigma_max = 3, .sigma_min = 0.01, .steps = 24};
  o.seed = 4;
  auto plain = Sample(bank, c, 24, {}, {}, o);
  ASSERT_OK(plain);
  int old_found = 0;
  for (const auto& r : plain->samples) old_found += r.nearest.row == 0;
  EXPECT_GT(old_found, 0);
  EXPECT_LT(old_found, 24);
  o.log_prior = prior;
  auto decayed = Sample(bank, c, 24, {}, {}, o);
  ASSERT_OK(decayed);
  for (const auto& r : decayed->samples) {
    EXPECT_EQ(r.nearest.row, 1);
    EXPECT_EQ(r.sample_class, SampleClass::kMemorized);
  }
  o.log_prior = absl::MakeConstSpan(prior.data(), 1);
  EXPECT_THAT(Sample(bank, c, 2, {}, {}, o), StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<double> positive = {0.5, 0.0};
  o.log_prior = positive;
  EXPECT_THAT(Sample(bank, c, 2, {}, {}, o), StatusIs(absl::StatusCode::kInvalidArgument));
  // A prior needs softmax weights.
  o.log_prior = prior;
  const EnergyConfig sparse{.family = EnergyFamily::kGeneral,
                            .separation = SeparationKind::kSparsemax};
  EXPECT_THAT(Sample(bank, sparse, 2, {}, {}, o),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

// The value readout of a decaying key -> value bank: attention whose
// weights carry 2^(-age / h), computed here in double. A row whose store
// time is unknown (0) keeps its full weight.
TEST(DecayTest, ValueReadoutWeighsValuesByAge) {
  std::mt19937_64 rng(67);
  const int n = 6, m = 2, k = 12;
  const int64_t h = 10'000, now = 1'700'000'000'000;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 0.5f);
  auto v = RandomGaussian(int64_t{k} * m, rng);
  std::vector<int64_t> stored(k);
  for (int mu = 0; mu < k; ++mu) stored[mu] = now - mu * 4'000;
  stored[5] = 0;
  const EnergyConfig c{.family = EnergyFamily::kLse, .beta = 2.0};
  BankSpec spec{"kv", n, StateKind::kContinuous, c, Precision::kF32, m, 0, h};
  Bank bank(spec);
  bank.Append(xi, bank.AssignIds(k), {}, PatternExtras{v, {}, {}, stored});
  const std::vector<double> prior = bank.LogPrior(now);
  EXPECT_EQ(prior[5], 0.0);
  PatternView view = bank.view();
  view.log_prior = prior.data();
  EnergyFunction energy(c, view);
  auto x = RandomGaussian(n, rng, 0.5f);
  std::vector<double> w(k);
  double z = 0;
  for (int mu = 0; mu < k; ++mu) {
    double dot = 0;
    for (int i = 0; i < n; ++i) dot += double{xi[mu * n + i]} * x[i];
    const double age = mu == 5 ? 0.0 : mu * 4'000.0;
    z += w[mu] = std::exp(c.beta * dot) * std::pow(2.0, -age / h);
  }
  std::vector<float> got(m);
  ValueReadout(energy, bank.value(0), m, x.data(), got.data());
  for (int j = 0; j < m; ++j) {
    double want = 0;
    for (int mu = 0; mu < k; ++mu) want += w[mu] / z * v[mu * m + j];
    EXPECT_NEAR(got[j], want, 1e-5) << j;
  }
}

TEST(DecayTest, OnlySoftmaxEnergiesOnContinuousBanksDecay) {
  const int64_t h = 1'000;
  EXPECT_OK(ValidateDecay(h, {.family = EnergyFamily::kLse}, StateKind::kContinuous));
  EXPECT_OK(ValidateDecay(h, {.family = EnergyFamily::kGaussian}, StateKind::kContinuous));
  EXPECT_OK(ValidateDecay(0, {.family = EnergyFamily::kClassical}, StateKind::kBipolar));
  EXPECT_THAT(ValidateDecay(h, {.family = EnergyFamily::kExponential}, StateKind::kBipolar),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(ValidateDecay(h, {.family = EnergyFamily::kGeneral,
                                .separation = SeparationKind::kSparsemax},
                            StateKind::kContinuous),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(ValidateDecay(h, {.family = EnergyFamily::kGeneral,
                                .similarity = SimilarityKind::kNegL1},
                            StateKind::kContinuous),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(ValidateDecay(-1, {}, StateKind::kContinuous),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateDecay(kMaxTtlMs + 1, {}, StateKind::kContinuous),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateBankSpec({"b", 4, StateKind::kBipolar, {.family = EnergyFamily::kClassical},
                                Precision::kF32, 0, 0, h}),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  // A computation that has no way to weigh rows by age says so.
  Bank bank = DecayBank(2, {1, 0, 0, 1}, {0, 0}, {}, h);
  const std::vector<double> prior = bank.LogPrior(5);
  PatternView view = bank.view();
  view.log_prior = prior.data();
  EnergyFunction energy({}, view);
  const std::vector<float> x = {1, 0};
  RetrieveOptions tiny;
  tiny.dynamics = Dynamics::kTinyBrain;
  EXPECT_THAT(RunDynamics(energy, StateKind::kContinuous, x, {}, tiny),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  // A softmax energy's step partial takes the prior (partials_test checks
  // it); a linear-domain rule has no way to weigh rows by age in one.
  EXPECT_TRUE(energy.Partial(x.data(), true, true, 0).ok());
  EXPECT_THAT(EnergyFunction({.family = EnergyFamily::kPolynomial, .degree = 3}, view)
                  .Partial(x.data(), true, false),
              StatusIs(absl::StatusCode::kUnimplemented));
  EXPECT_TRUE(Bank(BankSpec{"p", 2}).LogPrior(5).empty());
}

class FeaturesRegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_features_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<BankRegistry> Open() {
    auto storage = OpenSqliteStorage((dir_ / "engram.db").string());
    EXPECT_OK(storage);
    RegistryOptions o;
    o.clock_ms = [this] { return now_ms_; };
    auto r = BankRegistry::Open(std::move(*storage), o);
    EXPECT_OK(r);
    return std::move(*r);
  }

  std::filesystem::path dir_;
  int64_t now_ms_ = 1'700'000'000'000;
};

TEST_F(FeaturesRegistryTest, ValuesLabelsAndExpiriesSurviveReopenBitForBit) {
  std::mt19937_64 rng(13);
  const int n = 6, m = 3, k = 20;
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  auto v = RandomGaussian(int64_t{k} * m, rng);
  v[1] = -0.0f;
  v[2] = 1e-45f;
  std::vector<Labels> labels;
  for (int r = 0; r < k; ++r) labels.push_back(RowLabels(r));
  labels[4].strings.emplace_back(std::string("bin\0ary", 7), std::string("\xff\x00", 2));
  std::sort(labels[4].strings.begin(), labels[4].strings.end());
  BankSpec spec{"kv", n, StateKind::kContinuous, {}, Precision::kF32, m, 60'000, 7'200'000};
  {
    auto r = Open();
    ASSERT_OK(r->CreateBank(spec));
    ASSERT_OK(r->Store("kv", xi, {}, {}, StoreExtras{v, labels, 0}));
    now_ms_ += 10;
    auto more = RandomGaussian(n, rng);
    auto more_v = RandomGaussian(m, rng);
    ASSERT_OK(r->Store("kv", more, {}, {}, StoreExtras{more_v, {}, 5'000}));
  }
  auto r = Open();
  auto bank = r->Snapshot("kv");
  ASSERT_OK(bank);
  const Bank& b = **bank;
  EXPECT_EQ(b.spec().value_dim, m);
  EXPECT_EQ(b.spec().ttl_ms, 60'000);
  ASSERT_EQ(b.size(), k + 1);
  for (int row = 0; row < k; ++row) {
    EXPECT_EQ(std::memcmp(b.value(row), v.data() + row * m, m * sizeof(float)), 0);
    EXPECT_EQ(b.labels(row), labels[row]) << row;
    EXPECT_EQ(b.expires_ms(row), 1'700'000'000'000 + 60'000);
  }
  EXPECT_EQ(b.spec().decay_half_life_ms, 7'200'000);
  for (int row = 0; row < k; ++row) EXPECT_EQ(b.stored_ms(row), 1'700'000'000'000);
  EXPECT_EQ(b.stored_ms(k), 1'700'000'000'010);
  // The prior of a read 2 h 10 ms later: the first rows one half-life old.
  const std::vector<double> prior = b.LogPrior(1'700'000'000'010 + 7'200'000);
  EXPECT_DOUBLE_EQ(prior[0], -std::log(2.0) * (7'200'010.0 / 7'200'000.0));
  EXPECT_DOUBLE_EQ(prior[k], -std::log(2.0));
  EXPECT_EQ(b.expires_ms(k), 1'700'000'000'010 + 5'000);
  EXPECT_EQ(b.min_expires_ms(), 1'700'000'000'010 + 5'000);
}

TEST_F(FeaturesRegistryTest, ExpiredPatternsLeaveMemoryAndDisk) {
  std::mt19937_64 rng(14);
  const int n = 5;
  auto r = Open();
  ASSERT_OK(r->CreateBank({"t", n, StateKind::kContinuous, {}, Precision::kF32}));
  auto a = r->Store("t", RandomGaussian(3 * n, rng), {}, {}, StoreExtras{{}, {}, 1'000});
  auto b = r->Store("t", RandomGaussian(2 * n, rng), {}, {}, StoreExtras{{}, {}, 0});
  ASSERT_OK(a);
  ASSERT_OK(b);
  now_ms_ += 999;
  EXPECT_TRUE(r->ExpireDue().empty());
  {
    auto snap = *r->Snapshot("t");
    Filter alive;
    alive.now_ms = now_ms_ + 1;  // a reader one millisecond later no longer sees them
    EXPECT_EQ(MatchingRows(*snap, alive), (std::vector<int64_t>{3, 4}));
    EXPECT_TRUE(FilterMayExclude(*snap, alive));
  }
  now_ms_ += 1;
  EXPECT_EQ(r->ExpireDue(), (std::vector<std::pair<std::string, int64_t>>{{"t", 3}}));
  EXPECT_EQ((*r->Snapshot("t"))->size(), 2);
  EXPECT_TRUE(r->ExpireDue().empty());
  EXPECT_EQ(*r->ExpireBank("t"), 0);
  r.reset();
  auto again = Open();
  auto snap = again->Snapshot("t");
  ASSERT_OK(snap);
  ASSERT_EQ((*snap)->size(), 2);
  EXPECT_EQ((*snap)->id(0), b->ids[0]);
  EXPECT_EQ((*snap)->min_expires_ms(), 0);
}

TEST_F(FeaturesRegistryTest, BadValuesLabelsAndTtlChangeNothing) {
  auto r = Open();
  ASSERT_OK(r->CreateBank({"kv", 2, StateKind::kContinuous, {}, Precision::kF32, 2}));
  ASSERT_OK(r->CreateBank({"plain", 2, StateKind::kContinuous, {}, Precision::kF32}));
  std::vector<float> x = {1, 2, 3, 4};
  std::vector<float> v3 = {1, 2, 3};
  std::vector<float> vnan = {1, 2, NAN, 4};
  EXPECT_THAT(r->Store("kv", x, {}, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->Store("kv", x, {}, {}, StoreExtras{v3}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->Store("kv", x, {}, {}, StoreExtras{vnan}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->Store("plain", x, {}, {}, StoreExtras{x}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  Labels dup;
  dup.strings = {{"a", "1"}};
  dup.ints = {{"a", 1}};
  std::vector<Labels> two = {dup, Labels()};
  EXPECT_THAT(r->Store("plain", x, {}, {}, StoreExtras{{}, two}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->Store("plain", x, {}, {}, StoreExtras{{}, {}, kMaxTtlMs + 1}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->CreateBank({"neg", 2, StateKind::kContinuous, {}, Precision::kF32, -1}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ((*r->Snapshot("kv"))->size(), 0);
  EXPECT_EQ((*r->Snapshot("plain"))->size(), 0);
}

// A database written before values, labels and expiry existed opens, with
// its patterns unchanged, and takes the new fields from then on.
TEST_F(FeaturesRegistryTest, DatabaseWithTheFirstSchemaOpens) {
  const std::string path = (dir_ / "engram.db").string();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  const char* old_schema = R"sql(
    CREATE TABLE banks (name TEXT PRIMARY KEY, dim INTEGER NOT NULL, kind INTEGER NOT NULL,
      precision INTEGER NOT NULL, family INTEGER NOT NULL, degree INTEGER NOT NULL,
      rectified INTEGER NOT NULL, beta REAL NOT NULL, similarity INTEGER NOT NULL,
      separation INTEGER NOT NULL);
    CREATE TABLE patterns (seq INTEGER PRIMARY KEY AUTOINCREMENT,
      bank TEXT NOT NULL REFERENCES banks(name) ON DELETE CASCADE, id INTEGER NOT NULL,
      vec BLOB NOT NULL, payload BLOB NOT NULL, UNIQUE (bank, id));
    INSERT INTO banks VALUES ('old', 2, 0, 0, 3, 3, 0, 1.0, 0, 3);
    INSERT INTO patterns (bank, id, vec, payload) VALUES ('old', 9, x'0000803f00000040', x'7061');
  )sql";
  ASSERT_EQ(sqlite3_exec(db, old_schema, nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  auto r = Open();
  auto snap = r->Snapshot("old");
  ASSERT_OK(snap);
  ASSERT_EQ((*snap)->size(), 1);
  EXPECT_EQ((*snap)->id(0), 9u);
  EXPECT_EQ((*snap)->pattern(0)[0], 1.0f);
  EXPECT_EQ((*snap)->pattern(0)[1], 2.0f);
  EXPECT_EQ((*snap)->payload(0), "pa");
  EXPECT_EQ((*snap)->spec().value_dim, 0);
  EXPECT_EQ((*snap)->spec().decay_half_life_ms, 0);
  EXPECT_EQ((*snap)->stored_ms(0), 0);
  EXPECT_TRUE((*snap)->labels(0).empty());
  std::vector<Labels> l = {RowLabels(1)};
  std::vector<float> x = {3, 4};
  ASSERT_OK(r->Store("old", x, {}, {}, StoreExtras{{}, l, 0}));
  r.reset();
  auto again = Open();
  EXPECT_EQ((*again->Snapshot("old"))->labels(1), RowLabels(1));
}

}  // namespace
}  // namespace engram::core
