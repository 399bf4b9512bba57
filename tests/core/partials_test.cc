// A bank split into shards answers as the whole bank: each shard's step
// partial (EnergyFunction::Partial on a bank of its rows), merged in row
// order (MergeStepPartials) and finished (FinishPartial), gives the whole
// bank's energy, update target, gradient, nearest row and value readout, up
// to float reassociation (the shards' rounding of the rescaled sums), for
// random banks cut into 1..8 shards at random, for every family with a
// partial form and every precision; filtered calls (each shard's rows that
// pass) answer as the filtered whole bank. Retrieval follows: sync steps
// taken from merged partials stay with the whole bank's and end on the same
// memory.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engram/core/bank.h"
#include "engram/core/dynamics.h"
#include "engram/core/energy.h"
#include "engram/core/filter.h"
#include "engram/core/novelty.h"
#include "engram/core/partials.h"
#include "engram/core/readout.h"
#include "engram/core/status_macros.h"
#include "testing/decay_reference.h"
#include "testing/random_banks.h"

namespace engram::core {
namespace {

struct Case {
  std::string name;
  StateKind kind;
  EnergyConfig energy;
  Precision precision;
};

constexpr int kValueDim = 5;

// A key -> value bank of `data`'s rows, values and labels g = row % 3.
Bank Build(const Case& c, int n, const std::vector<float>& data, std::mt19937_64& rng) {
  const int64_t k = static_cast<int64_t>(data.size()) / n;
  Bank bank(BankSpec{"whole", n, c.kind, c.energy, c.precision, kValueDim});
  const std::vector<float> values = testing::RandomGaussian(k * kValueDim, rng);
  std::vector<Labels> labels(k);
  for (int64_t r = 0; r < k; ++r) labels[r].ints = {{"g", r % 3}};
  bank.Append(data, bank.AssignIds(k), {}, PatternExtras{values, labels, {}});
  return bank;
}

// Cut points 0 = c_0 < c_1 < ... < c_S = k, S random in [1, 8].
std::vector<int64_t> RandomCuts(int64_t k, std::mt19937_64& rng) {
  const int shards = std::uniform_int_distribution<int>(1, 8)(rng);
  std::vector<int64_t> cuts{0, k};
  while (static_cast<int>(cuts.size()) < shards + 1) {
    const int64_t c = std::uniform_int_distribution<int64_t>(1, k - 1)(rng);
    if (std::find(cuts.begin(), cuts.end(), c) == cuts.end()) cuts.push_back(c);
  }
  std::sort(cuts.begin(), cuts.end());
  return cuts;
}

// The banks of rows [cuts[s], cuts[s + 1]) of `whole`.
std::vector<Bank> Shards(const Bank& whole, const std::vector<int64_t>& cuts) {
  std::vector<Bank> shards;
  for (size_t s = 0; s + 1 < cuts.size(); ++s) {
    std::vector<int64_t> rows;
    for (int64_t r = cuts[s]; r < cuts[s + 1]; ++r) rows.push_back(r);
    shards.push_back(whole.Subset(rows));
  }
  return shards;
}

// The shards' merged partial at x (with their value readouts). A sparse
// separation takes its second round: the candidates merged, the whole
// bank's threshold, each shard's sums at it, merged.
StepPartial Sharded(const std::vector<Bank>& shards, const std::vector<int64_t>& cuts,
                    const EnergyConfig& cfg, const float* x, bool with_sum) {
  std::vector<StepPartial> parts;
  for (size_t s = 0; s < shards.size(); ++s) {
    const EnergyFunction f(cfg, shards[s].view());
    auto p = f.Partial(x, with_sum, true, cuts[s]);
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return StepPartial{};
    const bool candidates = p->form == PartialForm::kSparsemax || p->form == PartialForm::kEntmax15;
    if (shards[s].size() > 0 && !candidates) {
      ValueReadoutPartial(f, shards[s].value(0), kValueDim, x, &*p);
    }
    parts.push_back(*p);
  }
  absl::StatusOr<StepPartial> merged = MergeStepPartials(parts);
  EXPECT_TRUE(merged.ok()) << merged.status();
  if (!merged.ok()) return StepPartial{};
  if (merged->form != PartialForm::kSparsemax && merged->form != PartialForm::kEntmax15) {
    return *merged;
  }
  const absl::StatusOr<SparseThreshold> t = ThresholdOf(*merged);
  EXPECT_TRUE(t.ok()) << t.status();
  const int64_t nearest_row = merged->nearest_row;
  parts.clear();
  for (const Bank& shard : shards) {
    const EnergyFunction f(cfg, shard.view());
    auto p = f.ThresholdPartial(x, *t, with_sum, shard.size() > 0 ? shard.value(0) : nullptr,
                                kValueDim);
    EXPECT_TRUE(p.ok()) << p.status();
    parts.push_back(*p);
  }
  merged = MergeStepPartials(parts);
  EXPECT_TRUE(merged.ok()) << merged.status();
  merged->psi = t->psi;
  merged->nearest_row = nearest_row;
  return *merged;
}

double Norm(const std::vector<float>& v) {
  double s = 0.0;
  for (float f : v) s += double{f} * f;
  return std::sqrt(s);
}

class ShardTest : public ::testing::TestWithParam<Case> {};

TEST_P(ShardTest, MergedShardPartialsAnswerAsTheWholeBank) {
  const Case& c = GetParam();
  std::mt19937_64 rng(std::hash<std::string>{}(c.name));
  for (int trial = 0; trial < 4; ++trial) {
    const int n = trial % 2 == 0 ? 48 : 100;
    const int64_t k = std::uniform_int_distribution<int64_t>(20, 2500)(rng);
    const bool bipolar = c.kind == StateKind::kBipolar;
    std::vector<float> data = bipolar ? testing::RandomBipolar(k * n, rng)
                                      : testing::RandomGaussian(k * n, rng, 1.f / std::sqrt(n));
    const Bank whole = Build(c, n, data, rng);
    const std::vector<int64_t> cuts = RandomCuts(k, rng);
    const std::vector<Bank> shards = Shards(whole, cuts);
    const EnergyFunction f(c.energy, whole.view());
    const int64_t src = std::uniform_int_distribution<int64_t>(0, k - 1)(rng);
    std::vector<float> x = bipolar ? testing::FlipBits(whole.pattern(src), n, n / 10, rng)
                                   : std::vector<float>(whole.pattern(src), whole.pattern(src) + n);
    if (!bipolar) {
      for (float& v : x) v += std::normal_distribution<float>(0.f, 0.3f / std::sqrt(n))(rng);
    }
    SCOPED_TRACE(c.name + " K=" + std::to_string(k) + " shards=" +
                 std::to_string(cuts.size() - 1));

    const StepPartial all = Sharded(shards, cuts, c.energy, x.data(), true);
    EXPECT_EQ(all.rows, k);
    std::vector<float> t(n), t_ref(n), g(n), g_ref(n);
    const double e_ref = f.UpdateTarget(x.data(), t_ref.data());
    auto e = f.FinishPartial(all, x.data(), t.data(), nullptr);
    ASSERT_TRUE(e.ok()) << e.status();
    const double tol_e = 1e-5 * std::max(1.0, std::fabs(e_ref));
    EXPECT_NEAR(*e, e_ref, tol_e);
    const double tol_t = 1e-5 * std::max(1.0, Norm(t_ref));
    for (int i = 0; i < n; ++i) EXPECT_NEAR(t[i], t_ref[i], tol_t) << "target " << i;
    if (!bipolar) {
      f.ValueAndGradient(x.data(), g_ref.data());
      ASSERT_TRUE(f.FinishPartial(all, x.data(), nullptr, g.data()).ok());
      const double tol_g = 1e-5 * std::max(1.0, Norm(g_ref));
      for (int i = 0; i < n; ++i) EXPECT_NEAR(g[i], g_ref[i], tol_g) << "gradient " << i;
    }
    // The value readout of a key -> value bank.
    std::vector<float> r_ref(kValueDim);
    ValueReadout(f, whole.value(0), kValueDim, x.data(), r_ref.data());
    ASSERT_EQ(all.value.size(), static_cast<size_t>(kValueDim));
    const double tol_r = 1e-5 * std::max(1.0, Norm(r_ref));
    for (int j = 0; j < kValueDim; ++j) EXPECT_NEAR(all.value[j], r_ref[j], tol_r) << "value " << j;

    // Filtered calls: each shard's rows that pass, merged, answer as the
    // whole bank's rows that pass.
    const Filter filter{{{.key = "g", .op = Condition::kIntEquals, .ints = {1}}}};
    const Bank whole_f = whole.Subset(MatchingRows(whole, filter));
    std::vector<Bank> shards_f;
    std::vector<int64_t> offsets_f{0};
    for (const Bank& shard : shards) {
      shards_f.push_back(shard.Subset(MatchingRows(shard, filter)));
      offsets_f.push_back(offsets_f.back() + shards_f.back().size());
    }
    if (whole_f.size() > 0) {
      const EnergyFunction ff(c.energy, whole_f.view());
      std::vector<float> tf(n), tf_ref(n);
      const double ef_ref = ff.UpdateTarget(x.data(), tf_ref.data());
      const StepPartial pf = Sharded(shards_f, offsets_f, c.energy, x.data(), true);
      EXPECT_EQ(pf.rows, whole_f.size());
      EXPECT_NEAR(*ff.FinishPartial(pf, x.data(), tf.data(), nullptr), ef_ref,
                  1e-5 * std::max(1.0, std::fabs(ef_ref)));
      const double tol_f = 1e-5 * std::max(1.0, Norm(tf_ref));
      for (int i = 0; i < n; ++i) EXPECT_NEAR(tf[i], tf_ref[i], tol_f) << "filtered target " << i;
    }

    // Scores only: the same energy, and the nearest row of the whole bank
    // (not tracked on bf16 rows, whose scores are approximate).
    const StepPartial scores = Sharded(shards, cuts, c.energy, x.data(), false);
    int64_t nearest_ref = -2;
    const double v_ref = f.ValueAndNearest(x.data(), &nearest_ref);
    EXPECT_NEAR(*f.FinishPartial(scores, x.data(), nullptr, nullptr), v_ref, tol_e);
    if (c.precision != Precision::kBf16) {
      EXPECT_EQ(scores.nearest_row, whole.Nearest(x.data()).row);
    }
  }
}

TEST_P(ShardTest, SyncRetrievalFromMergedPartialsEndsOnTheSameMemory) {
  const Case& c = GetParam();
  if (c.kind == StateKind::kBipolar || c.energy.family != EnergyFamily::kLse) {
    GTEST_SKIP() << "continuous fixed-point retrieval: the lse family";
  }
  std::mt19937_64 rng(99);
  const int n = 64;
  const int64_t k = 600;
  const Bank whole = Build(c, n, testing::RandomGaussian(k * n, rng, 1.f / std::sqrt(n)), rng);
  const std::vector<int64_t> cuts = RandomCuts(k, rng);
  const std::vector<Bank> shards = Shards(whole, cuts);
  const EnergyFunction f(c.energy, whole.view());
  for (int q = 0; q < 5; ++q) {
    const int64_t src = std::uniform_int_distribution<int64_t>(0, k - 1)(rng);
    std::vector<float> a(whole.pattern(src), whole.pattern(src) + n);
    for (float& v : a) v += std::normal_distribution<float>(0.f, 0.3f / std::sqrt(n))(rng);
    std::vector<float> b = a, next(n);
    for (int step = 0; step < 8; ++step) {
      f.UpdateTarget(a.data(), next.data());
      a = next;
      const StepPartial p = Sharded(shards, cuts, c.energy, b.data(), true);
      ASSERT_TRUE(f.FinishPartial(p, b.data(), next.data(), nullptr).ok());
      b = next;
    }
    for (int i = 0; i < n; ++i) EXPECT_NEAR(a[i], b[i], 1e-4) << "query " << q << " value " << i;
    EXPECT_EQ(whole.Nearest(a.data()).row, whole.Nearest(b.data()).row);
  }
}

std::vector<Case> Cases() {
  auto general = [](SimilarityKind sim, SeparationKind sep, double beta) {
    EnergyConfig e;
    e.family = EnergyFamily::kGeneral;
    e.similarity = sim;
    e.separation = sep;
    e.beta = beta;
    e.degree = 3;
    return e;
  };
  std::vector<Case> cases;
  for (Precision p : {Precision::kF32, Precision::kBf16, Precision::kF32Screened}) {
    const std::string suffix = p == Precision::kF32 ? "f32" : p == Precision::kBf16 ? "bf16" : "screened";
    cases.push_back({"lse_b2_" + suffix, StateKind::kContinuous,
                     EnergyConfig{.family = EnergyFamily::kLse, .beta = 2.0}, p});
    cases.push_back({"lse_b40_" + suffix, StateKind::kContinuous,
                     EnergyConfig{.family = EnergyFamily::kLse, .beta = 40.0}, p});
    cases.push_back({"gaussian_" + suffix, StateKind::kContinuous,
                     EnergyConfig{.family = EnergyFamily::kGaussian, .beta = 4.0}, p});
    cases.push_back({"softmax_l2_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegHalfSqL2, SeparationKind::kSoftmax, 8.0), p});
    cases.push_back({"poly3_dot_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kDot, SeparationKind::kPolynomial, 1.0), p});
    // The separations whose weights need every row (their own forms).
    cases.push_back({"max_l2_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegHalfSqL2, SeparationKind::kMax, 1.0), p});
    cases.push_back({"max_dot_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kDot, SeparationKind::kMax, 1.0), p});
    cases.push_back({"sparsemax_dot_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kDot, SeparationKind::kSparsemax, 8.0), p});
    cases.push_back({"sparsemax_l2_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegHalfSqL2, SeparationKind::kSparsemax, 3.0), p});
    cases.push_back({"entmax15_l2_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegHalfSqL2, SeparationKind::kEntmax15, 6.0), p});
    cases.push_back({"entmax15_dot_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kDot, SeparationKind::kEntmax15, 4.0), p});
    cases.push_back({"lsr_l2_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegHalfSqL2, SeparationKind::kLogSumRelu, 1.5), p});
    cases.push_back({"lsr_dot_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kDot, SeparationKind::kLogSumRelu, 2.0), p});
    // The L1 similarity: the gradient sums the rows' signs relative to x.
    cases.push_back({"softmax_l1_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegL1, SeparationKind::kSoftmax, 1.0), p});
    cases.push_back({"poly3_l1_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegL1, SeparationKind::kPolynomial, 1.0), p});
    cases.push_back({"max_l1_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegL1, SeparationKind::kMax, 1.0), p});
    cases.push_back({"sparsemax_l1_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegL1, SeparationKind::kSparsemax, 0.5), p});
    cases.push_back({"lsr_l1_" + suffix, StateKind::kContinuous,
                     general(SimilarityKind::kNegL1, SeparationKind::kLogSumRelu, 0.3), p});
  }
  for (Precision p : {Precision::kF32, Precision::kBitPacked}) {
    const std::string suffix = p == Precision::kF32 ? "f32" : "bits";
    cases.push_back({"classical_" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kClassical}, p});
    cases.push_back({"poly4_" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kPolynomial, .degree = 4}, p});
    cases.push_back({"exponential_" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kExponential, .beta = 0.1}, p});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Families, ShardTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

// The batched partials (PartialBatch, the batched pass) are the one-state
// partials up to float reassociation: finished, the same energies and
// update targets.
TEST_P(ShardTest, BatchedPartialsFinishAsOneStatePartials) {
  const Case& c = GetParam();
  std::mt19937_64 rng(5);
  const int n = 48;
  const int64_t k = 300;
  const std::vector<float> data =
      c.kind == StateKind::kBipolar ? testing::RandomBipolar(k * n, rng)
                                    : testing::RandomGaussian(k * n, rng, 1.f / std::sqrt(n));
  const Bank bank = Build(c, n, data, rng);
  const EnergyFunction f(c.energy, bank.view());
  const int b = 20;
  const std::vector<float> x = c.kind == StateKind::kBipolar
                                   ? testing::RandomBipolar(b * n, rng)
                                   : testing::RandomGaussian(b * n, rng, 1.f / std::sqrt(n));
  std::vector<StepPartial> batched;
  ASSERT_TRUE(f.PartialBatch(x.data(), b, true, &batched).ok());
  ASSERT_EQ(batched.size(), size_t{b});
  std::vector<float> t1(n), t2(n);
  for (int q = 0; q < b; ++q) {
    auto one = f.Partial(x.data() + q * n, true, false);
    ASSERT_TRUE(one.ok());
    if (one->form == PartialForm::kSparsemax || one->form == PartialForm::kEntmax15) {
      // One part: its candidates give the bank's threshold; the same as the batch's.
      ASSERT_EQ(batched[q].candidates, one->candidates) << "state " << q;
      const SparseThreshold t = *ThresholdOf(*one);
      one = f.ThresholdPartial(x.data() + q * n, t, true);
      ASSERT_TRUE(one.ok());
      one->psi = t.psi;
      batched[q] = *one;
    }
    const double e1 = *f.FinishPartial(*one, x.data() + q * n, t1.data(), nullptr);
    const double e2 = *f.FinishPartial(batched[q], x.data() + q * n, t2.data(), nullptr);
    EXPECT_NEAR(e2, e1, 1e-4 * std::max(1.0, std::abs(e1))) << "state " << q;
    const double scale = std::max(1.0, Norm(t1));
    for (int i = 0; i < n; ++i) EXPECT_NEAR(t2[i], t1[i], 1e-4 * scale) << q << "," << i;
  }
}

// E(x) of a bipolar state in double, from the definitions (SPEC section 2):
// the reference for the sign each neuron's drive must give.
double BipolarEnergy(const EnergyConfig& cfg, const Bank& bank, const std::vector<float>& x) {
  const int n = bank.dim();
  std::vector<double> d(bank.size());
  for (int64_t r = 0; r < bank.size(); ++r) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += double{bank.pattern(r)[i]} * x[i];
    d[r] = s;
  }
  double e = 0.0, m = -INFINITY;
  switch (cfg.family) {
    case EnergyFamily::kClassical:
      for (double v : d) e -= 0.5 * v * v;
      return e;
    case EnergyFamily::kPolynomial:
      for (double v : d) e -= std::pow(v, cfg.degree);
      return e;
    case EnergyFamily::kExponential:
      for (double v : d) e -= std::exp(cfg.beta * v);
      return e;
    case EnergyFamily::kLse:
    case EnergyFamily::kGaussian: {
      // -1/beta log sum exp(beta S), S = d (lse) or -|xi - x|^2 / 2 (gaussian).
      std::vector<double> s(d.size());
      for (size_t r = 0; r < d.size(); ++r) {
        if (cfg.family == EnergyFamily::kLse) {
          s[r] = d[r];
        } else {
          double sq = 0.0;
          for (int i = 0; i < n; ++i) sq += std::pow(bank.pattern(r)[i] - x[i], 2);
          s[r] = -0.5 * sq;
        }
        m = std::max(m, cfg.beta * s[r]);
      }
      for (double v : s) e += std::exp(cfg.beta * v - m);
      return -(m + std::log(e)) / cfg.beta;
    }
    default:
      ADD_FAILURE() << "no reference";
      return 0.0;
  }
}

// A bipolar bank's drive merged from random shards gives every neuron the
// sign of the lower energy with the other neurons fixed (the exact
// energy-difference rule), and zero exactly where the classical energy
// difference is zero; for every non-general family, f32 and bit-packed rows,
// one state and a batch.
TEST(DrivePartial, MergedShardDrivesGiveEachNeuronTheLowerEnergySign) {
  std::mt19937_64 rng(17);
  const int n = 32;
  const int64_t k = 60;
  std::vector<Case> cases;
  for (Precision p : {Precision::kF32, Precision::kBitPacked}) {
    const std::string suffix = p == Precision::kF32 ? "_f32" : "_bits";
    cases.push_back({"classical" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kClassical}, p});
    cases.push_back({"poly3" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kPolynomial, .degree = 3}, p});
    cases.push_back({"poly4" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kPolynomial, .degree = 4}, p});
    cases.push_back({"exponential" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kExponential, .beta = 0.1}, p});
    cases.push_back({"lse" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kLse, .beta = 0.5}, p});
    cases.push_back({"gaussian" + suffix, StateKind::kBipolar,
                     EnergyConfig{.family = EnergyFamily::kGaussian, .beta = 0.5}, p});
  }
  int64_t checked = 0, zeros = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    ASSERT_TRUE(UsesBipolarDrive(c.energy, StateKind::kBipolar));
    const Bank whole = Build(c, n, testing::RandomBipolar(k * n, rng), rng);
    const std::vector<int64_t> cuts = RandomCuts(k, rng);
    const std::vector<Bank> shards = Shards(whole, cuts);
    for (int b : {1, 9}) {
      const std::vector<float> x = testing::RandomBipolar(int64_t{b} * n, rng);
      std::vector<std::vector<StepPartial>> parts(shards.size());
      for (size_t s = 0; s < shards.size(); ++s) {
        const EnergyFunction f(c.energy, shards[s].view());
        ASSERT_TRUE(DrivePartialBatch(f, x.data(), b, &parts[s]).ok());
        ASSERT_EQ(parts[s].size(), size_t(b));
      }
      std::vector<float> drive(n);
      for (int q = 0; q < b; ++q) {
        std::vector<StepPartial> of_q;
        for (const auto& p : parts) of_q.push_back(p[q]);
        absl::StatusOr<StepPartial> merged = MergeStepPartials(of_q);
        ASSERT_TRUE(merged.ok()) << merged.status();
        FinishDrive(c.energy, *merged, x.data() + q * n, drive.data());
        std::vector<float> state(x.begin() + q * n, x.begin() + (q + 1) * n);
        for (int i = 0; i < n; ++i) {
          state[i] = 1.f;
          const double up = BipolarEnergy(c.energy, whole, state);
          state[i] = -1.f;
          const double down = BipolarEnergy(c.energy, whole, state);
          state[i] = x[q * n + i];
          const double gap = down - up;  // > 0: +1 is the lower energy
          if (c.energy.family == EnergyFamily::kClassical && gap == 0.0) {
            EXPECT_EQ(drive[i], 0.f) << "state " << q << " neuron " << i;
            ++zeros;
            continue;
          }
          if (std::abs(gap) <= 1e-9 * (std::abs(up) + std::abs(down))) continue;
          EXPECT_EQ(drive[i] > 0.f, gap > 0.0)
              << "state " << q << " neuron " << i << " drive " << drive[i] << " gap " << gap;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 1000);
  {
    // A pair of patterns differing in neuron 0 alone leaves that neuron's
    // classical energy difference at exactly zero for every state: split
    // over two shards, its drive is exactly zero (the neuron keeps its sign).
    std::vector<float> pair = testing::RandomBipolar(n, rng);
    pair.insert(pair.end(), pair.begin(), pair.end());
    pair[n] = -pair[0];
    const Case c{"classical_pair", StateKind::kBipolar,
                 EnergyConfig{.family = EnergyFamily::kClassical}, Precision::kF32};
    const Bank whole = Build(c, n, pair, rng);
    const std::vector<Bank> halves = Shards(whole, {0, 1, 2});
    const std::vector<float> x = testing::RandomBipolar(n, rng);
    std::vector<StepPartial> a, b;
    ASSERT_TRUE(DrivePartialBatch(EnergyFunction(c.energy, halves[0].view()), x.data(), 1, &a).ok());
    ASSERT_TRUE(DrivePartialBatch(EnergyFunction(c.energy, halves[1].view()), x.data(), 1, &b).ok());
    absl::StatusOr<StepPartial> merged = MergeStepPartials({a[0], b[0]});
    ASSERT_TRUE(merged.ok());
    std::vector<float> drive(n);
    FinishDrive(c.energy, *merged, x.data(), drive.data());
    EXPECT_EQ(drive[0], 0.f);
    std::vector<float> state = x;
    state[0] = 1.f;
    const double up = BipolarEnergy(c.energy, whole, state);
    state[0] = -1.f;
    EXPECT_EQ(BipolarEnergy(c.energy, whole, state), up);
  }
  // The empty partial keeps every neuron.
  std::vector<float> x(n, 1.f), drive(n, 7.f);
  StepPartial empty;
  empty.sum.assign(n, 0.f);
  FinishDrive(EnergyConfig{.family = EnergyFamily::kClassical}, empty, x.data(), drive.data());
  for (float v : drive) EXPECT_EQ(v, 0.f);
  // General families step on an update target: no drive.
  const Bank bank = testing::MakeBank(n, StateKind::kBipolar, testing::RandomBipolar(4 * n, rng));
  std::vector<StepPartial> none;
  EnergyConfig general{.family = EnergyFamily::kGeneral, .beta = 1.0};
  EXPECT_EQ(DrivePartialBatch(EnergyFunction(general, bank.view()), x.data(), 1, &none).code(),
            absl::StatusCode::kUnimplemented);
  std::printf("drive signs checked %lld, exact classical ties %lld\n",
              static_cast<long long>(checked), static_cast<long long>(zeros));
}

// A bank that decays with age, cut into shards: each shard's partial over
// its rows with their priors (Bank::LogPrior at one time), merged, gives
// the energy and update target of the definitions (2^(-age / h) weights,
// long double) and of the whole bank's reference evaluation.
TEST(StepPartial, DecayingBankShardsMergeAsTheDefinitions) {
  std::mt19937_64 rng(83);
  const int n = 24;
  const int64_t h = 3'600'000, now = 1'700'000'000'000;
  for (EnergyConfig c :
       {EnergyConfig{.family = EnergyFamily::kLse, .beta = 4.0},
        EnergyConfig{.family = EnergyFamily::kGaussian, .beta = 2.0},
        EnergyConfig{.family = EnergyFamily::kGeneral, .beta = 1.5,
                     .similarity = SimilarityKind::kNegHalfSqL2}}) {
    for (int trial = 0; trial < 3; ++trial) {
      const int64_t k = std::uniform_int_distribution<int64_t>(20, 900)(rng);
      const std::vector<float> xi = testing::RandomGaussian(k * n, rng, 0.4f);
      std::vector<int64_t> stored(k);
      std::vector<double> ages(k);
      for (int64_t mu = 0; mu < k; ++mu) {
        stored[mu] = now - std::uniform_int_distribution<int64_t>(0, 4 * h)(rng);
        ages[mu] = static_cast<double>(now - stored[mu]) / static_cast<double>(h);
      }
      Bank whole(BankSpec{"d", n, StateKind::kContinuous, c, Precision::kF32, 0, 0, h});
      whole.Append(xi, whole.AssignIds(k), {}, PatternExtras{{}, {}, {}, stored});
      const std::vector<int64_t> cuts = RandomCuts(k, rng);
      const std::vector<Bank> shards = Shards(whole, cuts);
      SCOPED_TRACE(std::string(EnergyFamilyName(c.family)) + " K=" + std::to_string(k) +
                   " shards=" + std::to_string(shards.size()));
      std::vector<float> x(whole.pattern(k / 2), whole.pattern(k / 2) + n);
      for (float& v : x) v += std::normal_distribution<float>(0.f, 0.2f)(rng);

      std::vector<StepPartial> parts;
      std::vector<std::vector<double>> priors;
      for (const Bank& shard : shards) {
        priors.push_back(shard.LogPrior(now));
        PatternView view = shard.view();
        view.log_prior = priors.back().data();
        auto p = EnergyFunction(c, view).Partial(x.data(), true, false);
        ASSERT_TRUE(p.ok()) << p.status();
        parts.push_back(*std::move(p));
      }
      auto merged = MergeStepPartials(parts);
      ASSERT_TRUE(merged.ok()) << merged.status();
      const std::vector<double> prior = whole.LogPrior(now);
      PatternView view = whole.view();
      view.log_prior = prior.data();
      const EnergyFunction f(c, view);
      std::vector<float> t(n), t_whole(n);
      auto e = f.FinishPartial(*merged, x.data(), t.data(), nullptr);
      ASSERT_TRUE(e.ok()) << e.status();
      const testing::DecayReference ref = testing::ReferenceDecay(xi, n, x, ages, c);
      EXPECT_NEAR(*e, static_cast<double>(ref.energy), 1e-5 * (1 + std::fabs(*e)));
      const double e_whole = f.UpdateTarget(x.data(), t_whole.data());
      EXPECT_NEAR(*e, e_whole, 1e-6 * (1 + std::fabs(e_whole)));
      for (int i = 0; i < n; ++i) {
        EXPECT_NEAR(t[i], static_cast<double>(ref.target[i]), 1e-5) << i;
        EXPECT_NEAR(t[i], t_whole[i], 1e-5) << i;
      }
      // The batched partials are the one-state ones.
      std::vector<StepPartial> batch;
      PatternView v0 = shards[0].view();
      v0.log_prior = priors[0].data();
      std::vector<float> xs = x;
      xs.insert(xs.end(), x.begin(), x.end());
      ASSERT_TRUE(EnergyFunction(c, v0).PartialBatch(xs.data(), 2, true, &batch).ok());
      EXPECT_EQ(batch[1].wsum, parts[0].wsum);
      EXPECT_EQ(batch[1].sum, parts[0].sum);
    }
  }
}

// TINYBRAIN's memory layer split over random shards (each keeping its
// rows' memory state) runs the whole bank's trajectory: the merged layer
// sums give the same system energies and states, step by step, for
// softmax memories (lse), polynomial and classical ones, continuous and
// bipolar.
TEST(TinyBrain, ShardedMemoryLayersRunTheWholeBanksTrajectory) {
  std::mt19937_64 rng(29);
  const int n = 32;
  const int64_t k = 300;
  struct TinyCase {
    StateKind kind;
    EnergyConfig energy;
  };
  for (const TinyCase& c :
       {TinyCase{StateKind::kContinuous, {.family = EnergyFamily::kLse, .beta = 4.0}},
        TinyCase{StateKind::kBipolar, {.family = EnergyFamily::kLse, .beta = 0.3}},
        TinyCase{StateKind::kBipolar, {.family = EnergyFamily::kPolynomial, .degree = 3}},
        TinyCase{StateKind::kContinuous, {.family = EnergyFamily::kClassical}}}) {
    SCOPED_TRACE(EnergyFamilyName(c.energy.family));
    const bool bipolar = c.kind == StateKind::kBipolar;
    const std::vector<float> data = bipolar ? testing::RandomBipolar(k * n, rng)
                                            : testing::RandomGaussian(k * n, rng, 0.18f);
    const Bank whole = testing::MakeBank(n, c.kind, data);
    const std::vector<int64_t> cuts = RandomCuts(k, rng);
    const std::vector<Bank> shards = Shards(whole, cuts);
    std::vector<float> query(whole.pattern(5), whole.pattern(5) + n);
    if (bipolar) {
      query = testing::FlipBits(query.data(), n, 4, rng);
    } else {
      for (float& v : query) v += std::normal_distribution<float>(0.f, 0.05f)(rng);
    }
    RetrieveOptions o;
    o.dynamics = Dynamics::kTinyBrain;
    o.max_steps = 25;
    o.dt = 0.2;
    o.record_trace = true;
    const EnergyFunction f(c.energy, whole.view());
    const absl::StatusOr<Trajectory> ref = RunDynamics(f, c.kind, query, {}, o);
    ASSERT_TRUE(ref.ok()) << ref.status();
    std::vector<EnergyFunction> parts_f;
    for (const Bank& shard : shards) parts_f.emplace_back(c.energy, shard.view());
    std::vector<std::unique_ptr<TinyBrainMemory>> memories;
    for (const EnergyFunction& pf : parts_f) {
      memories.push_back(std::make_unique<TinyBrainMemory>(pf, c.kind, o.dt / o.tau_h));
    }
    auto oracle = [&](const float* v, bool, StepPartial* merged, double* step_max) {
      std::vector<StepPartial> parts;
      *step_max = 0.0;
      for (auto& m : memories) {
        double s = 0.0;
        parts.push_back(m->At(v, &s));
        *step_max = std::max(*step_max, s);
      }
      ENGRAM_ASSIGN_OR_RETURN(*merged, MergeStepPartials(parts));
      return absl::OkStatus();
    };
    const absl::StatusOr<Trajectory> got =
        RunTinyBrainDynamics(n, c.kind, c.energy, query, {}, o, oracle);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->steps, ref->steps);
    EXPECT_EQ(got->stop_reason, ref->stop_reason);
    ASSERT_EQ(got->energy_trace.size(), ref->energy_trace.size());
    for (size_t i = 0; i < ref->energy_trace.size(); ++i) {
      EXPECT_NEAR(got->energy_trace[i], ref->energy_trace[i],
                  1e-4 * std::max(1.0, std::abs(ref->energy_trace[i])))
          << "step " << i;
    }
    for (int i = 0; i < n; ++i) {
      EXPECT_NEAR(got->state[i], ref->state[i], 1e-4 * std::max(1.f, std::abs(ref->state[i])));
    }
    // The layer moved: the trajectory is not its start.
    EXPECT_GT(ref->steps, 1);
  }
}

// A sparse separation's candidates finish only through their threshold; a
// partial of one form does not finish as another's.
TEST(StepPartial, SparseCandidatesNeedTheirThreshold) {
  std::mt19937_64 rng(2);
  const int n = 8;
  const Bank bank = testing::MakeBank(n, StateKind::kContinuous, testing::RandomGaussian(80, rng));
  EnergyConfig e;
  e.family = EnergyFamily::kGeneral;
  e.separation = SeparationKind::kSparsemax;
  e.beta = 4.0;
  const EnergyFunction f(e, bank.view());
  const float* x = bank.pattern(3);
  auto c = f.Partial(x, true, false);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->form, PartialForm::kSparsemax);
  std::vector<float> t(n);
  EXPECT_EQ(f.FinishPartial(*c, x, t.data(), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Without psi the second round does not finish either.
  auto sums = f.ThresholdPartial(x, *ThresholdOf(*c), true);
  ASSERT_TRUE(sums.ok());
  EXPECT_EQ(f.FinishPartial(*sums, x, t.data(), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Merging a max partial with a sparse one is refused.
  EnergyConfig m = e;
  m.separation = SeparationKind::kMax;
  auto top = EnergyFunction(m, bank.view()).Partial(x, true, false);
  ASSERT_TRUE(top.ok());
  EXPECT_EQ(MergeStepPartials({*top, *c}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ThresholdOf(*top).status().code(), absl::StatusCode::kInvalidArgument);
}

// Sparsemax's threshold from the closed form on a small case: z = (1, 0.5,
// -2) has support {0, 1}, tau = (1 + 0.5 - 1) / 2 = 0.25, p = (0.75, 0.25, 0);
// two parts' candidates merged give that threshold and those weights.
TEST(StepPartial, SparsemaxThresholdOfMergedCandidatesIsTheClosedForm) {
  StepPartial a, b;
  a.form = b.form = PartialForm::kSparsemax;
  a.rows = 2;
  a.candidates = {1.0, -2.0};
  b.rows = 1;
  b.candidates = {0.5};
  const StepPartial merged = *MergeStepPartials({a, b});
  EXPECT_EQ(merged.rows, 3);
  const SparseThreshold t = *ThresholdOf(merged);
  EXPECT_DOUBLE_EQ(t.tau, 0.25);
  // Psi = p.z + (1 - |p|^2) / 2 = 0.875 + (1 - 0.625) / 2.
  EXPECT_DOUBLE_EQ(t.psi, 0.75 * 1.0 + 0.25 * 0.5 + 0.5 * (1.0 - 0.625));
}

// The novelty reference is chosen by id, not by row order: a bank's rows in
// another order, or cut into shards whose chosen rows are pooled, give the
// same sample of kNoveltySamples patterns (the smallest keys, ascending)
// and the same reference energies.
TEST(Novelty, ReferenceSampleIsChosenByIdNotRowOrder) {
  std::mt19937_64 rng(23);
  const int n = 16;
  const int64_t k = 900;
  const Bank bank = testing::MakeBank(n, StateKind::kContinuous,
                                      testing::RandomGaussian(k * n, rng, 0.25f));
  std::vector<int64_t> order(k);
  for (int64_t r = 0; r < k; ++r) order[r] = r;
  std::shuffle(order.begin(), order.end(), rng);
  const Bank shuffled = bank.Subset(order);
  auto chosen_ids = [](const Bank& b, const std::vector<int64_t>& rows) {
    std::vector<uint64_t> ids;
    for (int64_t r : rows) ids.push_back(b.id(r));
    return ids;
  };
  const std::vector<int64_t> rows = NoveltyRows(bank.ids());
  ASSERT_EQ(rows.size(), static_cast<size_t>(kNoveltySamples));
  const std::vector<uint64_t> ids = chosen_ids(bank, rows);
  EXPECT_EQ(chosen_ids(shuffled, NoveltyRows(shuffled.ids())), ids);
  // Ascending keys, and no row left out has a smaller key than the largest taken.
  for (size_t i = 1; i < ids.size(); ++i) EXPECT_LT(NoveltyKey(ids[i - 1]), NoveltyKey(ids[i]));
  for (int64_t r = 0; r < k; ++r) {
    if (std::find(ids.begin(), ids.end(), bank.id(r)) == ids.end()) {
      EXPECT_GT(NoveltyKey(bank.id(r)), NoveltyKey(ids.back())) << "row " << r;
    }
  }
  // Shards' own samples, pooled, hold the whole bank's.
  const std::vector<Bank> shards = Shards(bank, {0, 300, 610, k});
  std::vector<std::pair<uint64_t, uint64_t>> pooled;
  for (const Bank& shard : shards) {
    for (uint64_t id : chosen_ids(shard, NoveltyRows(shard.ids()))) {
      pooled.emplace_back(NoveltyKey(id), id);
    }
  }
  std::sort(pooled.begin(), pooled.end());
  pooled.resize(kNoveltySamples);
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(pooled[i].second, ids[i]);
  // The same energies (each row's Value over the whole bank, summed in
  // another row order: float reassociation).
  EnergyConfig e{.family = EnergyFamily::kLse, .beta = 4.0};
  const StoredEnergies a = StoredPatternEnergies(EnergyFunction(e, bank.view()), bank.ids());
  const StoredEnergies b =
      StoredPatternEnergies(EnergyFunction(e, shuffled.view()), shuffled.ids());
  ASSERT_EQ(a.sorted.size(), b.sorted.size());
  for (size_t i = 0; i < a.sorted.size(); ++i) {
    EXPECT_NEAR(a.sorted[i], b.sorted[i], 1e-6 * std::max(1.0, std::abs(a.sorted[i])));
  }
}

TEST(StepPartial, TargetAndGradientTogetherAsEachAlone) {
  std::mt19937_64 rng(3);
  const int n = 16;
  const Bank bank = testing::MakeBank(n, StateKind::kContinuous, testing::RandomGaussian(40 * n, rng));
  const EnergyFunction f(EnergyConfig{.family = EnergyFamily::kLse, .beta = 3.0}, bank.view());
  const float* x = bank.pattern(4);
  auto p = f.Partial(x, true, false);
  ASSERT_TRUE(p.ok());
  std::vector<float> t(n), g(n), t_ref(n), g_ref(n);
  ASSERT_TRUE(f.FinishPartial(*p, x, t.data(), g.data()).ok());
  f.UpdateTarget(x, t_ref.data());
  f.ValueAndGradient(x, g_ref.data());
  for (int i = 0; i < n; ++i) {
    EXPECT_NEAR(t[i], t_ref[i], 1e-5f);
    EXPECT_NEAR(g[i], g_ref[i], 1e-5f);
  }
}

TEST(StepPartial, NoRowsGiveTheEmptyBanksAnswers) {
  const int n = 6;
  const std::vector<float> x = {0.5f, -1.f, 2.f, 0.f, 1.f, -0.25f};
  double sq = 0.0;
  for (float v : x) sq += double{v} * v;
  const Bank empty = testing::MakeBank(n, StateKind::kContinuous, {});
  for (EnergyFamily family : {EnergyFamily::kLse, EnergyFamily::kGaussian}) {
    const EnergyFunction f(EnergyConfig{.family = family, .beta = 2.0}, empty.view());
    auto p = f.Partial(x.data(), true, true);
    ASSERT_TRUE(p.ok());
    auto merged = MergeStepPartials({*p, *p});
    ASSERT_TRUE(merged.ok());
    std::vector<float> t(n), g(n);
    auto e = f.FinishPartial(*merged, x.data(), t.data(), g.data());
    ASSERT_TRUE(e.ok());
    const bool lse = family == EnergyFamily::kLse;
    EXPECT_DOUBLE_EQ(*e, lse ? 0.5 * sq : 0.0);  // R(x) for lse, nothing else
    EXPECT_EQ(t, x);                             // the state stays
    for (int i = 0; i < n; ++i) EXPECT_EQ(g[i], lse ? x[i] : 0.f);
  }
}

TEST(StepPartial, MismatchedPartsAreInvalidArgument) {
  StepPartial a, b;
  a.rows = b.rows = 3;
  a.log_scale = b.log_scale = 0.0;
  a.wsum = b.wsum = 1.0;
  a.sum.assign(4, 1.f);
  b.sum.assign(5, 1.f);
  EXPECT_EQ(MergeStepPartials({a, b}).status().code(), absl::StatusCode::kInvalidArgument);
  b.sum.clear();  // a part of rows without the sum the other has
  EXPECT_EQ(MergeStepPartials({a, b}).status().code(), absl::StatusCode::kInvalidArgument);
  b.sum.assign(4, 1.f);
  b.log_domain = false;
  EXPECT_EQ(MergeStepPartials({a, b}).status().code(), absl::StatusCode::kInvalidArgument);
  b.log_domain = true;
  EXPECT_TRUE(MergeStepPartials({a, b}).ok());
}

TEST(StepPartial, ATargetNeedsTheWeightedSum) {
  std::mt19937_64 rng(2);
  const Bank bank = testing::MakeBank(8, StateKind::kContinuous, testing::RandomGaussian(80, rng));
  const EnergyFunction f(EnergyConfig{}, bank.view());
  auto p = f.Partial(bank.pattern(0), /*with_sum=*/false, true);
  ASSERT_TRUE(p.ok());
  std::vector<float> t(8);
  EXPECT_EQ(f.FinishPartial(*p, bank.pattern(0), t.data(), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace engram::core
