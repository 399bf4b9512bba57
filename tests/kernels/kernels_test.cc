// Every kernel level against a double-precision reference, on shapes that
// hit the SIMD tails, and the fused single-pass energy evaluations against
// the two-pass reference implementations.
#include <cmath>
#include <random>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engram/core/bank.h"
#include "engram/core/dynamics.h"
#include "engram/core/energy.h"
#include "fused.h"
#include "kernels/kernels.h"
#include "testing/random_banks.h"

namespace engram::core {
namespace {

using kernels::KernelTable;
using kernels::SimdLevel;
using testing::RandomBipolar;
using testing::RandomGaussian;

const int kDims[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 784, 1000};
const int kCounts[] = {1, 3, 4, 5, 17};

std::vector<const KernelTable*> Levels() {
  std::vector<const KernelTable*> out;
  for (SimdLevel l : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    if (const KernelTable* t = kernels::KernelsFor(l)) out.push_back(t);
  }
  return out;
}

TEST(KernelDispatch, ScalarAlwaysAvailableAndChosenLevelIsSupported) {
  ASSERT_NE(kernels::KernelsFor(SimdLevel::kScalar), nullptr);
  const KernelTable& k = kernels::Kernels();
  EXPECT_LE(static_cast<int>(k.level), static_cast<int>(kernels::DetectedSimdLevel()));
  EXPECT_NE(kernels::KernelsFor(k.level), nullptr);
  std::printf("detected SIMD level: %s\n",
              kernels::SimdLevelName(kernels::DetectedSimdLevel()).c_str());
}

TEST(Bf16, RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(kernels::Bf16ToFloat(kernels::FloatToBf16(1.0f)), 1.0f);
  EXPECT_EQ(kernels::Bf16ToFloat(kernels::FloatToBf16(-2.5f)), -2.5f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
  EXPECT_EQ(kernels::Bf16ToFloat(kernels::FloatToBf16(1.0f + 0x1p-8f)), 1.0f);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even.
  EXPECT_EQ(kernels::Bf16ToFloat(kernels::FloatToBf16(1.0f + 3 * 0x1p-8f)), 1.0f + 0x1p-6f);
  EXPECT_TRUE(std::isnan(kernels::Bf16ToFloat(kernels::FloatToBf16(NAN))));
  EXPECT_TRUE(std::isinf(kernels::Bf16ToFloat(kernels::FloatToBf16(INFINITY))));
  std::mt19937_64 rng(5);
  for (float v : RandomGaussian(1000, rng, 100.f)) {
    const float r = kernels::Bf16ToFloat(kernels::FloatToBf16(v));
    EXPECT_LE(std::fabs(r - v), std::fabs(v) * 0x1p-8f) << v;
  }
}

// Reference dot products and weighted sums in double.
std::vector<double> RefDots(const std::vector<float>& rows, int count, int n,
                            const std::vector<float>& x) {
  std::vector<double> out(count);
  for (int r = 0; r < count; ++r) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += double{rows[r * n + i]} * x[i];
    out[r] = s;
  }
  return out;
}

double Tolerance(int n) { return 1e-6 * (4.0 + n); }

TEST(Kernels, DotAndAxpyMatchDoubleReferenceAtEveryLevel) {
  std::mt19937_64 rng(1);
  for (const KernelTable* k : Levels()) {
    for (int n : kDims) {
      for (int count : kCounts) {
        auto rows = RandomGaussian(int64_t{count} * n, rng);
        auto x = RandomGaussian(n, rng);
        auto w = RandomGaussian(count, rng);
        if (count > 2) w[1] = 0.f;  // zero weights are skipped
        const auto want = RefDots(rows, count, n, x);
        std::vector<float> got(count + 1, 123.f);
        k->dot_rows(rows.data(), count, n, x.data(), got.data());
        for (int r = 0; r < count; ++r) {
          EXPECT_NEAR(got[r], want[r], Tolerance(n) * std::sqrt(double(n)))
              << kernels::SimdLevelName(k->level) << " n=" << n << " r=" << r;
        }
        EXPECT_EQ(got[count], 123.f) << "wrote past the output";
        std::vector<float> acc(n + 1, 0.5f);
        acc[n] = 77.f;
        k->axpy_rows(rows.data(), count, n, w.data(), acc.data());
        for (int i = 0; i < n; ++i) {
          double s = 0.5;
          for (int r = 0; r < count; ++r) s += double{w[r]} * rows[r * n + i];
          EXPECT_NEAR(acc[i], s, Tolerance(count) * 4)
              << kernels::SimdLevelName(k->level) << " n=" << n << " i=" << i;
        }
        EXPECT_EQ(acc[n], 77.f) << "wrote past the accumulator";
      }
    }
  }
}

TEST(Kernels, Bf16KernelsMatchReferenceOnRoundedRows) {
  std::mt19937_64 rng(2);
  for (const KernelTable* k : Levels()) {
    for (int n : kDims) {
      for (int count : kCounts) {
        auto rows = RandomGaussian(int64_t{count} * n, rng);
        std::vector<uint16_t> half(rows.size());
        for (size_t i = 0; i < rows.size(); ++i) {
          half[i] = kernels::FloatToBf16(rows[i]);
          rows[i] = kernels::Bf16ToFloat(half[i]);  // the values the kernel sees
        }
        auto x = RandomGaussian(n, rng);
        auto w = RandomGaussian(count, rng);
        const auto want = RefDots(rows, count, n, x);
        std::vector<float> got(count);
        k->dot_rows_bf16(half.data(), count, n, x.data(), got.data());
        for (int r = 0; r < count; ++r) {
          EXPECT_NEAR(got[r], want[r], Tolerance(n) * std::sqrt(double(n)))
              << kernels::SimdLevelName(k->level) << " n=" << n;
        }
        std::vector<float> acc(n, 0.f);
        k->axpy_rows_bf16(half.data(), count, n, w.data(), acc.data());
        for (int i = 0; i < n; ++i) {
          double s = 0;
          for (int r = 0; r < count; ++r) s += double{w[r]} * rows[r * n + i];
          EXPECT_NEAR(acc[i], s, Tolerance(count) * 4) << kernels::SimdLevelName(k->level);
        }
      }
    }
  }
}

std::vector<uint64_t> Pack(const float* v, int n) {
  std::vector<uint64_t> b(kernels::BitWords(n), 0);
  for (int i = 0; i < n; ++i) {
    if (v[i] > 0) b[i >> 6] |= uint64_t{1} << (i & 63);
  }
  return b;
}

TEST(Kernels, BitKernelsAreExact) {
  std::mt19937_64 rng(3);
  for (const KernelTable* k : Levels()) {
    for (int n : {1, 7, 63, 64, 65, 100, 127, 128, 129, 511, 512, 513, 784, 1000}) {
      for (int count : kCounts) {
        auto rows = RandomBipolar(int64_t{count} * n, rng);
        auto x = RandomBipolar(n, rng);
        std::vector<uint64_t> bits;
        for (int r = 0; r < count; ++r) {
          auto b = Pack(rows.data() + int64_t{r} * n, n);
          bits.insert(bits.end(), b.begin(), b.end());
        }
        const auto xb = Pack(x.data(), n);
        const auto want = RefDots(rows, count, n, x);
        std::vector<float> got(count);
        k->dot_rows_bits(bits.data(), count, n, xb.data(), got.data());
        for (int r = 0; r < count; ++r) {
          EXPECT_EQ(got[r], want[r]) << kernels::SimdLevelName(k->level) << " n=" << n;
        }
        // Small integer weights: the indicator sums are exact in float.
        std::vector<float> w(count);
        for (int r = 0; r < count; ++r) w[r] = static_cast<float>(int(rng() % 7) - 3);
        std::vector<float> acc(n + 1, 1.f);
        acc[n] = 9.f;
        k->axpy_rows_bits(bits.data(), count, n, w.data(), acc.data());
        for (int i = 0; i < n; ++i) {
          float s = 1.f;
          for (int r = 0; r < count; ++r) s += rows[r * n + i] > 0 ? w[r] : 0.f;
          EXPECT_EQ(acc[i], s) << kernels::SimdLevelName(k->level) << " n=" << n << " i=" << i;
        }
        EXPECT_EQ(acc[n], 9.f);
      }
    }
  }
}

// ---- Fused passes against the reference implementations -------------------

struct FusedCase {
  std::string name;
  EnergyConfig config;
  StateKind kind;
  Precision precision;
};

std::vector<FusedCase> FusedCases() {
  const auto B = StateKind::kBipolar;
  const auto C = StateKind::kContinuous;
  std::vector<FusedCase> c = {
      {"classical", {.family = EnergyFamily::kClassical}, B, Precision::kF32},
      {"classical_bits", {.family = EnergyFamily::kClassical}, B, Precision::kBitPacked},
      {"poly3", {.family = EnergyFamily::kPolynomial, .degree = 3}, B, Precision::kF32},
      {"poly3_bits", {.family = EnergyFamily::kPolynomial, .degree = 3}, B, Precision::kBitPacked},
      {"poly4_rect", {.family = EnergyFamily::kPolynomial, .degree = 4, .rectified = true}, B,
       Precision::kF32},
      {"exponential", {.family = EnergyFamily::kExponential, .beta = 0.05}, B, Precision::kF32},
      {"exponential_bits", {.family = EnergyFamily::kExponential, .beta = 0.05}, B,
       Precision::kBitPacked},
      {"lse", {.family = EnergyFamily::kLse, .beta = 0.5}, C, Precision::kF32},
      {"lse_bf16", {.family = EnergyFamily::kLse, .beta = 0.5}, C, Precision::kBf16},
      {"lse_sharp", {.family = EnergyFamily::kLse, .beta = 20.0}, C, Precision::kF32},
      {"gaussian", {.family = EnergyFamily::kGaussian, .beta = 0.3}, C, Precision::kF32},
      {"uhn_dot_poly",
       {.family = EnergyFamily::kGeneral, .degree = 3, .separation = SeparationKind::kPolynomial},
       C, Precision::kF32},
      {"uhn_l2_softmax",
       {.family = EnergyFamily::kGeneral, .beta = 0.7, .similarity = SimilarityKind::kNegHalfSqL2,
        .separation = SeparationKind::kSoftmax},
       C, Precision::kF32},
      {"uhn_dot_identity",
       {.family = EnergyFamily::kGeneral, .separation = SeparationKind::kIdentity}, C,
       Precision::kF32},
  };
  return c;
}

class FusedTest : public ::testing::TestWithParam<FusedCase> {};

// Relative distance |a - b|_inf / max(|b|_inf, tiny).
double RelInf(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, m = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, std::fabs(double{a[i]} - b[i]));
    m = std::max(m, std::fabs(double{b[i]}));
  }
  return d / m;
}

TEST_P(FusedTest, MatchesReferenceOnShapesThatSplitIntoBlocksAndThreads) {
  const FusedCase& c = GetParam();
  std::mt19937_64 rng(11);
  // Small shapes (one block, one thread) and large ones (many blocks, split
  // over threads: K * N * 4 bytes above the parallel threshold).
  const std::pair<int, int> shapes[] = {{3, 1}, {17, 5}, {64, 33}, {784, 300}, {257, 4200}};
  for (auto [n, k] : shapes) {
    const bool bipolar = c.kind == StateKind::kBipolar;
    // Continuous patterns scaled so that beta * s stays moderate.
    auto xi = bipolar ? RandomBipolar(int64_t{k} * n, rng)
                      : RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
    BankSpec spec{"f", n, c.kind, c.config, c.precision};
    ASSERT_TRUE(ValidateBankSpec(spec).ok()) << c.name;
    Bank bank(spec);
    bank.Append(xi, bank.AssignIds(k), {});
    Bank ref_bank(BankSpec{"r", n, c.kind, c.config, Precision::kF32});
    std::vector<float> ref_xi = xi;
    if (c.precision == Precision::kBf16) {
      for (auto& v : ref_xi) v = kernels::Bf16ToFloat(kernels::FloatToBf16(v));
    }
    ref_bank.Append(ref_xi, ref_bank.AssignIds(k), {});
    EnergyFunction fast(c.config, bank.view());
    EnergyFunction ref(c.config, ref_bank.view());
    for (int trial = 0; trial < 3; ++trial) {
      // A state near a stored pattern (the regime retrieval runs in).
      std::vector<float> x(xi.begin() + int64_t{trial} * n % (int64_t{k} * n),
                           xi.begin() + int64_t{trial} * n % (int64_t{k} * n) + n);
      if (bipolar) {
        x = testing::FlipBits(x.data(), n, n / 10, rng);
      } else {
        auto noise = RandomGaussian(n, rng, 0.3f / std::sqrt(float(n)));
        for (int i = 0; i < n; ++i) x[i] += noise[i];
      }
      const double e_ref = ref.ReferenceValue(x.data());
      const double tol = 2e-5 * std::max(1.0, std::fabs(e_ref));
      EXPECT_NEAR(fast.Value(x.data()), e_ref, tol) << c.name << " n=" << n << " k=" << k;

      std::vector<float> t_fast(n), t_ref(n);
      const double et = fast.UpdateTarget(x.data(), t_fast.data());
      ref.ReferenceUpdateTarget(x.data(), t_ref.data());
      EXPECT_NEAR(et, e_ref, tol) << c.name;
      EXPECT_LT(RelInf(t_fast, t_ref), 1e-4) << c.name << " n=" << n << " k=" << k;

      if (!bipolar || c.config.family == EnergyFamily::kClassical) {
        std::vector<float> g_fast(n), g_ref(n);
        const double eg = fast.ValueAndGradient(x.data(), g_fast.data());
        ref.ReferenceValueAndGradient(x.data(), g_ref.data());
        EXPECT_NEAR(eg, e_ref, tol) << c.name;
        EXPECT_LT(RelInf(g_fast, g_ref), 1e-4) << c.name << " n=" << n << " k=" << k;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, FusedTest, ::testing::ValuesIn(FusedCases()),
                         [](const auto& info) { return info.param.name; });

// The fused online log-sum-exp against a direct two-pass one, with scores so
// spread that exp overflows without the running max.
TEST(FusedPass, OnlineLogSumExpSurvivesHugeBetaAcrossThreads) {
  std::mt19937_64 rng(4);
  const int n = 64, k = 20000;  // 5 MB: split over threads
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, {}, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  auto x = RandomGaussian(n, rng);
  const double beta = 500.0;  // beta * s ~ 1e4: exp overflows double
  internal::LogSoftmaxWeights rule(beta);
  std::vector<float> acc(n);
  const internal::FusedSums sums =
      internal::FusedPass(bank.view(), SimilarityKind::kDot, x.data(), rule, acc.data());
  std::vector<double> s(k);
  double m = -INFINITY;
  for (int mu = 0; mu < k; ++mu) {
    double d = 0;
    for (int i = 0; i < n; ++i) d += double{xi[int64_t{mu} * n + i]} * x[i];
    s[mu] = beta * d;
    m = std::max(m, s[mu]);
  }
  double l = 0;
  std::vector<double> want(n, 0.0);
  for (int mu = 0; mu < k; ++mu) {
    const double w = std::exp(s[mu] - m);
    l += w;
    for (int i = 0; i < n; ++i) want[i] += w * xi[int64_t{mu} * n + i];
  }
  const double lse_want = m + std::log(l);
  const double lse_got = sums.log_scale + std::log(sums.wsum);
  EXPECT_NEAR(lse_got, lse_want, 1e-5 * std::fabs(lse_want));
  for (int i = 0; i < n; ++i) {
    EXPECT_NEAR(acc[i] / sums.wsum, want[i] / l, 1e-3) << i;
  }
}

// Retrieval on a bit-packed bank takes the same path as on the f32 bank.
TEST(FusedPass, BitPackedRetrievalEqualsF32Retrieval) {
  std::mt19937_64 rng(9);
  const int n = 200, k = 12;
  auto xi = RandomBipolar(int64_t{k} * n, rng);
  EnergyConfig cfg{.family = EnergyFamily::kPolynomial, .degree = 3};
  Bank f32(BankSpec{"a", n, StateKind::kBipolar, cfg, Precision::kF32});
  Bank bits(BankSpec{"b", n, StateKind::kBipolar, cfg, Precision::kBitPacked});
  f32.Append(xi, f32.AssignIds(k), {});
  bits.Append(xi, bits.AssignIds(k), {});
  EXPECT_LT(bits.bytes(), f32.bytes() * 1.05);
  for (int q = 0; q < k; ++q) {
    auto query = testing::FlipBits(xi.data() + int64_t{q} * n, n, 30, rng);
    RetrieveOptions o;
    auto a = RunDynamics(EnergyFunction(cfg, f32.view()), StateKind::kBipolar, query, {}, o);
    auto b = RunDynamics(EnergyFunction(cfg, bits.view()), StateKind::kBipolar, query, {}, o);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->state, b->state) << q;
    EXPECT_EQ(a->steps, b->steps);
    EXPECT_EQ(f32.Nearest(a->state.data()).id, bits.Nearest(b->state.data()).id);
  }
}

}  // namespace
}  // namespace engram::core

namespace engram::core {
namespace {

// Batched sync retrieval (sgemm) equals one-at-a-time retrieval: same final
// states, steps, stop reasons and energies to float tolerance, with
// per-query options.
TEST(SyncBatch, EqualsSequentialRetrievalForEveryFamily) {
  std::mt19937_64 rng(21);
  for (const FusedCase& c : FusedCases()) {
    // UHN dot-product separations without normalisation grow |x| without
    // bound under sync; float differences then grow with it.
    if (c.name == "uhn_dot_poly" || c.name == "uhn_dot_identity") continue;
    const bool bipolar = c.kind == StateKind::kBipolar;
    const int n = bipolar ? 129 : 65, k = bipolar ? 9 : 300;
    auto xi = bipolar ? RandomBipolar(int64_t{k} * n, rng)
                      : RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
    Bank bank(BankSpec{"b", n, c.kind, c.config, c.precision});
    bank.Append(xi, bank.AssignIds(k), {});
    EnergyFunction energy(c.config, bank.view());
    const int b = 12;  // above the sgemm threshold, falling below it as queries converge
    std::vector<std::vector<float>> qs;
    std::vector<RetrieveOptions> opts(b);
    std::vector<std::vector<bool>> clamps(b);
    std::unique_ptr<bool[]> clamp_mem(new bool[n]);
    for (int i = 0; i < n; ++i) clamp_mem[i] = i < n / 4;
    for (int q = 0; q < b; ++q) {
      std::vector<float> x(xi.begin() + int64_t{q % k} * n, xi.begin() + int64_t{q % k + 1} * n);
      if (bipolar) {
        x = testing::FlipBits(x.data(), n, n / 8, rng);
      } else {
        auto noise = RandomGaussian(n, rng, 0.5f / std::sqrt(float(n)));
        for (int i = 0; i < n; ++i) x[i] += noise[i];
      }
      qs.push_back(x);
      opts[q].max_steps = q == 3 ? 1 : 50;  // one query stops early
      opts[q].record_trace = true;
    }
    std::vector<BatchQuery> batch;
    for (int q = 0; q < b; ++q) {
      absl::Span<const bool> cl;
      if (q == 2) cl = absl::MakeConstSpan(clamp_mem.get(), n);
      batch.push_back({qs[q], cl, &opts[q]});
    }
    auto got = RunSyncBatch(energy, c.kind, batch);
    ASSERT_EQ(got.size(), static_cast<size_t>(b));
    for (int q = 0; q < b; ++q) {
      auto want = RunDynamics(energy, c.kind, qs[q], batch[q].clamp, opts[q]);
      ASSERT_TRUE(want.ok() && got[q].ok()) << c.name;
      EXPECT_EQ(got[q]->stop_reason, want->stop_reason) << c.name << " q=" << q;
      EXPECT_EQ(got[q]->steps, want->steps) << c.name << " q=" << q;
      EXPECT_LT(RelInf(got[q]->state, want->state), 1e-4) << c.name << " q=" << q;
      EXPECT_NEAR(got[q]->energy_end, want->energy_end,
                  2e-5 * std::max(1.0, std::fabs(want->energy_end))) << c.name;
      EXPECT_EQ(got[q]->energy_trace.size(), want->energy_trace.size()) << c.name;
      EXPECT_EQ(got[q]->lyapunov_violations, 0) << c.name;
      if (q == 2) {
        for (int i = 0; i < n / 4; ++i) EXPECT_EQ(got[q]->state[i], qs[q][i]);
      }
    }
  }
}

TEST(SyncBatch, ReportsBadQueriesInTheirSlotAndRunsTheRest) {
  std::mt19937_64 rng(5);
  const int n = 16, k = 4;
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, {}, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  EnergyFunction energy(EnergyConfig{.family = EnergyFamily::kLse, .beta = 4.0}, bank.view());
  RetrieveOptions good, gradient;
  gradient.dynamics = Dynamics::kGradient;
  std::vector<float> short_query(n - 1, 0.f);
  std::vector<BatchQuery> batch = {{absl::MakeConstSpan(xi.data(), n), {}, &good},
                                   {short_query, {}, &good},
                                   {absl::MakeConstSpan(xi.data(), n), {}, &gradient}};
  auto got = RunSyncBatch(energy, StateKind::kContinuous, batch);
  EXPECT_TRUE(got[0].ok());
  EXPECT_EQ(got[1].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(got[2].status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace engram::core
