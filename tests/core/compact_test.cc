// The compact-support pass of the sparse (sparsemax, 1.5-entmax) and
// log-sum-ReLU separations against the plain reference implementation
// (all rows, full sort, Eigen), which it must equal to float tolerance, and
// the bound's pruning: a sharp separation weighs few rows exactly.
#include <cmath>
#include <random>
#include <vector>

#include "compact.h"
#include "engram/core/bank.h"
#include "engram/core/energy.h"
#include "gtest/gtest.h"

namespace engram::core {
namespace {

struct Case {
  SeparationKind separation;
  SimilarityKind similarity;
  double beta;
};

Bank RandomBank(int n, int64_t k, uint32_t seed) {
  BankSpec spec;
  spec.name = "b";
  spec.dim = n;
  Bank bank(spec);
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  std::vector<float> xi(static_cast<size_t>(n) * k);
  for (int64_t r = 0; r < k; ++r) {
    double sq = 0.0;
    for (int i = 0; i < n; ++i) sq += std::pow(xi[r * n + i] = nd(g), 2);
    for (int i = 0; i < n; ++i) xi[r * n + i] /= static_cast<float>(std::sqrt(sq));  // unit rows
  }
  bank.Append(xi, bank.AssignIds(k), {});
  return bank;
}

EnergyConfig General(const Case& c) {
  EnergyConfig config;
  config.family = EnergyFamily::kGeneral;
  config.separation = c.separation;
  config.similarity = c.similarity;
  config.beta = c.beta;
  return config;
}

class CompactTest : public ::testing::TestWithParam<Case> {};

TEST_P(CompactTest, EqualsTheReferenceOnEveryOutput) {
  const Case c = GetParam();
  const int n = 96;
  const int64_t k = 3000;
  Bank bank = RandomBank(n, k, 11);
  const EnergyFunction f(General(c), bank.view());
  std::mt19937 g(5);
  std::normal_distribution<float> nd;
  for (int trial = 0; trial < 6; ++trial) {
    // A stored pattern plus noise of growing size: sharp to diffuse.
    const int64_t src = static_cast<int64_t>(g() % k);
    std::vector<float> x(bank.pattern(src), bank.pattern(src) + n);
    for (float& v : x) v += 0.05f * trial * nd(g);
    std::vector<float> t(n), t_ref(n), grad(n), grad_ref(n);
    const double e = f.UpdateTarget(x.data(), t.data());
    const double e_ref = f.ReferenceUpdateTarget(x.data(), t_ref.data());
    EXPECT_NEAR(e, e_ref, 1e-5 * (1.0 + std::fabs(e_ref)));
    for (int i = 0; i < n; ++i) EXPECT_NEAR(t[i], t_ref[i], 1e-5f) << "target " << i;
    const double eg = f.ValueAndGradient(x.data(), grad.data());
    f.ReferenceValueAndGradient(x.data(), grad_ref.data());
    EXPECT_NEAR(eg, e_ref, 1e-5 * (1.0 + std::fabs(e_ref)));
    for (int i = 0; i < n; ++i) {
      EXPECT_NEAR(grad[i], grad_ref[i], 1e-5f * (1.0f + std::fabs(grad_ref[i]))) << "grad " << i;
    }
    EXPECT_NEAR(f.Value(x.data()), e_ref, 1e-5 * (1.0 + std::fabs(e_ref)));
    // The nearest row is Bank::Nearest's.
    int64_t nearest = -2;
    f.ValueAndNearest(x.data(), &nearest);
    EXPECT_EQ(nearest, bank.Nearest(x.data()).row);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Separations, CompactTest,
    ::testing::Values(Case{SeparationKind::kSparsemax, SimilarityKind::kDot, 4.0},
                      Case{SeparationKind::kSparsemax, SimilarityKind::kDot, 40.0},
                      Case{SeparationKind::kSparsemax, SimilarityKind::kNegHalfSqL2, 20.0},
                      Case{SeparationKind::kEntmax15, SimilarityKind::kDot, 4.0},
                      Case{SeparationKind::kEntmax15, SimilarityKind::kNegHalfSqL2, 40.0},
                      Case{SeparationKind::kLogSumRelu, SimilarityKind::kNegHalfSqL2, 2.0},
                      Case{SeparationKind::kLogSumRelu, SimilarityKind::kNegHalfSqL2, 20.0},
                      Case{SeparationKind::kLogSumRelu, SimilarityKind::kDot, 1.5}));

TEST(CompactPass, ASharpSeparationWeighsFewRows) {
  // Unit rows near a stored one at beta = 40: z_max - z of the other rows
  // is beta (1 - cos), far above the bound's 1 (sparsemax) or 2 (entmax).
  const int n = 64;
  const int64_t k = 20000;
  Bank bank = RandomBank(n, k, 3);
  for (SeparationKind sep : {SeparationKind::kSparsemax, SeparationKind::kEntmax15}) {
    const EnergyConfig config =
        General({sep, SimilarityKind::kDot, 40.0});
    internal::CompactSums sums;
    std::vector<float> acc(n);
    ASSERT_TRUE(internal::CompactPass(bank.view(), config, bank.pattern(7), acc.data(), &sums));
    EXPECT_GE(sums.support, 1);
    EXPECT_LE(sums.support, sums.candidates);
    EXPECT_LT(sums.candidates, k / 100) << "the bound left " << sums.candidates << " rows";
    EXPECT_EQ(sums.nearest_row, 7);
    // The weights sum to one: the target is a convex combination.
    EXPECT_NEAR(sums.wsum, 1.0, 1e-12);
  }
}

TEST(CompactPass, LogSumReluWithEmptySupportKeepsTheStateAndItsEnergyIsThatOfEpsilon) {
  const int n = 32;
  Bank bank = RandomBank(n, 200, 9);
  const EnergyConfig config = General({SeparationKind::kLogSumRelu, SimilarityKind::kNegHalfSqL2, 4.0});
  const EnergyFunction f(config, bank.view());
  std::vector<float> x(n, 10.f);  // |x - xi|^2 / 2 >> 1 / beta for every row
  std::vector<float> t(n);
  const double e = f.UpdateTarget(x.data(), t.data());
  EXPECT_EQ(t, x);
  EXPECT_DOUBLE_EQ(e, -std::log(kLogSumReluEpsilon) / 4.0);
}

TEST(CompactPass, NonFiniteStateIsLeftToTheReference) {
  const int n = 16;
  Bank bank = RandomBank(n, 50, 1);
  const EnergyConfig config = General({SeparationKind::kSparsemax, SimilarityKind::kDot, 2.0});
  std::vector<float> x(n, 0.1f), acc(n, 7.f);
  x[3] = NAN;
  internal::CompactSums sums;
  EXPECT_FALSE(internal::CompactPass(bank.view(), config, x.data(), acc.data(), &sums));
  EXPECT_EQ(acc, std::vector<float>(n, 7.f));  // nothing written
}

}  // namespace
}  // namespace engram::core
