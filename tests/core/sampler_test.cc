// Sampling: schedules, survey Eq. 17, the score, closed-form probability-flow
// ODE, order of accuracy, generation as retrieval, spurious states,
// reproducibility.
#include "engram/core/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include <gtest/gtest.h>

#include "testing/random_banks.h"
#include "testing/status_matchers.h"

namespace engram::core {
namespace {

using engram::testing::MakeBank;
using engram::testing::RandomBipolar;
using engram::testing::RandomGaussian;
using engram::testing::StatusIs;

TEST(Schedule, KarrasMatchesFormulaAndEndsAtZero) {
  ScheduleConfig c{.kind = ScheduleKind::kKarras, .sigma_max = 80, .sigma_min = 0.002,
                   .rho = 7, .steps = 10};
  auto s = MakeSchedule(c);
  ASSERT_OK(s);
  ASSERT_EQ(s->size(), 11u);
  for (int i = 0; i < 10; ++i) {
    const double want = std::pow(std::pow(80.0, 1 / 7.0) +
                                     i / 9.0 * (std::pow(0.002, 1 / 7.0) - std::pow(80.0, 1 / 7.0)),
                                 7.0);
    EXPECT_NEAR((*s)[i], want, 1e-12 * want) << i;
  }
  EXPECT_EQ(s->back(), 0.0);
  c.stop_at_sigma_min = true;
  EXPECT_EQ(MakeSchedule(c)->back(), 0.002);
}

TEST(Schedule, GeometricAndLinear) {
  auto g = MakeSchedule({.kind = ScheduleKind::kGeometric, .sigma_max = 8, .sigma_min = 1,
                         .steps = 4, .stop_at_sigma_min = true});
  ASSERT_OK(g);
  EXPECT_NEAR((*g)[1], 4.0, 1e-12);
  EXPECT_NEAR((*g)[2], 2.0, 1e-12);
  auto l = MakeSchedule({.kind = ScheduleKind::kLinear, .sigma_max = 4, .sigma_min = 1,
                         .steps = 4, .stop_at_sigma_min = true});
  ASSERT_OK(l);
  EXPECT_NEAR((*l)[1], 3.0, 1e-12);
  EXPECT_THAT(MakeSchedule({.sigma_max = 1, .sigma_min = 2}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MakeSchedule({.steps = 0}), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Found by service_fuzz: rho = 1.3e-172 overflowed smax^(1/rho) to inf, the
// Karras levels became NaN and Sample read the "nearest memory" at row -1.
TEST(Schedule, ExtremeRhoIsRejectedInsteadOfGivingNonFiniteLevels) {
  EXPECT_THAT(MakeSchedule({.sigma_max = 10, .sigma_min = 0.01, .rho = 1.306450796487053e-172,
                            .steps = 8}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  for (double rho : {1e-3, 0.5, 7.0, 1e3, 1e300}) {
    auto s = MakeSchedule({.sigma_max = 10, .sigma_min = 0.01, .rho = rho, .steps = 8});
    if (!s.ok()) continue;  // rejected is fine; accepted must be finite and in range
    for (size_t i = 0; i + 1 < s->size(); ++i) {
      EXPECT_GE((*s)[i], 0.01) << "rho=" << rho << " level " << i;
      EXPECT_LE((*s)[i], 10.0) << "rho=" << rho << " level " << i;
    }
  }
}

// Survey Eq. 17: for patterns of equal norm |y|^2 = c,
//   E_DM(x) = -sigma^2 log(1/K sum exp(-|x-y|^2 / 2 sigma^2))
//           = E_MHN(x) + c/2 + sigma^2 log K,   beta = 1/sigma^2,
// with E_MHN = -1/beta log sum exp(beta x.y) + |x|^2/2. Engram's gaussian
// energy is E_DM without the 1/K (i.e. E_MHN + c/2).
TEST(Eq17, GaussianEnergyIsModernHopfieldPlusConstant) {
  std::mt19937_64 rng(71);
  for (int trial = 0; trial < 20; ++trial) {
    const int n = 4 + static_cast<int>(rng() % 60), k = 2 + static_cast<int>(rng() % 40);
    const double sigma = 0.5 + (rng() % 100) / 25.0;
    const double beta = 1.0 / (sigma * sigma);
    auto xi = RandomGaussian(k * n, rng);
    const double radius = 2.0;
    for (int mu = 0; mu < k; ++mu) {
      double s = 0;
      for (int i = 0; i < n; ++i) s += double{xi[mu * n + i]} * xi[mu * n + i];
      for (int i = 0; i < n; ++i) xi[mu * n + i] = static_cast<float>(xi[mu * n + i] * radius / std::sqrt(s));
    }
    auto x = RandomGaussian(n, rng);
    Bank bank = MakeBank(n, StateKind::kContinuous, xi);
    const double c = radius * radius;
    EnergyFunction gauss({.family = EnergyFamily::kGaussian, .beta = beta}, bank.view());
    EnergyFunction mhn({.family = EnergyFamily::kLse, .beta = beta}, bank.view());
    const double eg = gauss.Value(x.data()), em = mhn.Value(x.data());
    EXPECT_NEAR(eg, em + c / 2, 1e-5 * std::max(1.0, std::fabs(eg))) << trial;
    // The DM form, computed directly in double.
    std::vector<double> a(k);
    for (int mu = 0; mu < k; ++mu) {
      double d2 = 0;
      for (int i = 0; i < n; ++i) d2 += std::pow(double{x[i]} - xi[mu * n + i], 2);
      a[mu] = -d2 / (2 * sigma * sigma);
    }
    const double m = *std::max_element(a.begin(), a.end());
    double z = 0;
    for (double v : a) z += std::exp(v - m);
    const double e_dm = -sigma * sigma * (m + std::log(z) - std::log(double(k)));
    EXPECT_NEAR(e_dm, em + c / 2 + sigma * sigma * std::log(double(k)),
                1e-5 * std::max(1.0, std::fabs(e_dm))) << trial;
  }
}

TEST(Score, EqualsDenoiserResidualAndMinusGradientOfBetaE) {
  std::mt19937_64 rng(73);
  const int n = 12, k = 9;
  auto xi = RandomGaussian(k * n, rng);
  Bank bank = MakeBank(n, StateKind::kContinuous, xi);
  for (double sigma : {0.7, 1.5, 4.0}) {
    auto x = RandomGaussian(n, rng, 1.5f);
    // D(x; sigma) computed independently.
    std::vector<double> w(k);
    for (int mu = 0; mu < k; ++mu) {
      double d2 = 0;
      for (int i = 0; i < n; ++i) d2 += std::pow(double{x[i]} - xi[mu * n + i], 2);
      w[mu] = -d2 / (2 * sigma * sigma);
    }
    const double m = *std::max_element(w.begin(), w.end());
    double z = 0;
    for (double& v : w) { v = std::exp(v - m); z += v; }
    std::vector<float> score(n);
    Score(bank.view(), {.family = EnergyFamily::kGaussian}, x.data(), sigma, score.data());
    // -log p_sigma(x) up to a constant = beta E_beta(x), by central differences.
    auto neg_log_p = [&](const std::vector<double>& y) {
      std::vector<double> a(k);
      for (int mu = 0; mu < k; ++mu) {
        double d2 = 0;
        for (int i = 0; i < n; ++i) d2 += std::pow(y[i] - xi[mu * n + i], 2);
        a[mu] = -d2 / (2 * sigma * sigma);
      }
      return -LogSumExp(a);
    };
    for (int i = 0; i < n; ++i) {
      double d = 0;
      for (int mu = 0; mu < k; ++mu) d += w[mu] / z * xi[mu * n + i];
      const double want = (d - x[i]) / (sigma * sigma);
      EXPECT_NEAR(score[i], want, 1e-4 * std::max(1.0, std::fabs(want))) << sigma << " " << i;
      std::vector<double> yp(x.begin(), x.end()), ym(x.begin(), x.end());
      const double h = 1e-4;
      yp[i] += h;
      ym[i] -= h;
      const double fd = -(neg_log_p(yp) - neg_log_p(ym)) / (2 * h);
      EXPECT_NEAR(score[i], fd, 1e-3 * std::max(1.0, std::fabs(fd))) << sigma << " " << i;
    }
  }
}

// One stored pattern: D = xi, dx/dsigma = (x - xi)/sigma, so x - xi scales
// with sigma. Euler and Heun follow it exactly.
TEST(ProbabilityFlow, SinglePatternClosedForm) {
  std::mt19937_64 rng(79);
  const int n = 20;
  auto xi = RandomGaussian(n, rng);
  Bank bank = MakeBank(n, StateKind::kContinuous, xi);
  for (SamplerKind s : {SamplerKind::kEuler, SamplerKind::kHeun}) {
    for (ScheduleKind sk : {ScheduleKind::kKarras, ScheduleKind::kGeometric, ScheduleKind::kLinear}) {
      SampleOptions o;
      o.sampler = s;
      o.schedule = {.kind = sk, .sigma_max = 10, .sigma_min = 0.1, .steps = 13,
                    .stop_at_sigma_min = true};
      o.seed = 5;
      o.trajectory_every = 1;
      auto b = Sample(bank, {.family = EnergyFamily::kGaussian}, 3, {}, {}, o);
      ASSERT_OK(b);
      for (const auto& r : b->samples) {
        const auto& x0 = r.trajectory.front();
        for (size_t t = 0; t < r.trajectory.size(); ++t) {
          const double ratio = r.trajectory_sigmas[t] / 10.0;
          for (int i = 0; i < n; ++i) {
            const double want = xi[i] + ratio * (double{x0[i]} - xi[i]);
            ASSERT_NEAR(r.trajectory[t][i], want, 2e-5 * std::max(1.0, std::fabs(double{x0[i]})))
                << SamplerName(s) << " " << ScheduleName(sk) << " t=" << t;
          }
        }
      }
    }
  }
}

// A one-level schedule (steps = 1, stopping at sigma_min) takes one step
// that stays at that sigma; with a trajectory stride above 1 the final
// state is recorded after the loop, with the sigma of that step. (Found by
// the fuzzer: it read the schedule one past its end.)
TEST(Sample, OneLevelScheduleRecordsItsFinalStateAtThatSigma) {
  std::mt19937_64 rng(83);
  const int n = 12;
  Bank bank = MakeBank(n, StateKind::kContinuous, RandomGaussian(2 * n, rng));
  for (SamplerKind s : {SamplerKind::kEuler, SamplerKind::kHeun, SamplerKind::kStochastic,
                        SamplerKind::kLangevin}) {
    SampleOptions o;
    o.sampler = s;
    o.schedule = {.kind = ScheduleKind::kKarras, .sigma_max = 0.7, .sigma_min = 0.7, .steps = 1,
                  .stop_at_sigma_min = true};
    o.seed = 3;
    o.trajectory_every = 2;
    auto b = Sample(bank, {.family = EnergyFamily::kGaussian}, 2, {}, {}, o);
    ASSERT_OK(b);
    EXPECT_EQ(b->steps, 1) << SamplerName(s);
    for (const auto& r : b->samples) {
      ASSERT_EQ(r.trajectory_sigmas.size(), 2u) << SamplerName(s);
      EXPECT_EQ(r.trajectory_sigmas.front(), 0.7) << SamplerName(s);
      EXPECT_EQ(r.trajectory_sigmas.back(), 0.7) << SamplerName(s);
      EXPECT_EQ(r.trajectory.back(), r.state) << SamplerName(s);
    }
  }
}

// The denoiser of the Gaussian (or lse) energy at sigma in double: the
// softmax-weighted sum of the patterns, beta = 1/sigma^2.
std::vector<double> ReferenceDenoise(const std::vector<float>& xi, int n,
                                     const std::vector<double>& x, double sigma, bool gaussian) {
  const int64_t k = static_cast<int64_t>(xi.size()) / n;
  const double beta = 1.0 / (sigma * sigma);
  std::vector<double> s(k);
  for (int64_t mu = 0; mu < k; ++mu) {
    double dot = 0, sq = 0;
    for (int i = 0; i < n; ++i) {
      dot += xi[mu * n + i] * x[i];
      sq += double{xi[mu * n + i]} * xi[mu * n + i];
    }
    s[mu] = beta * (gaussian ? dot - 0.5 * sq : dot);
  }
  const double top = *std::max_element(s.begin(), s.end());
  std::vector<double> out(n, 0.0);
  double z = 0;
  for (int64_t mu = 0; mu < k; ++mu) {
    const double w = std::exp(s[mu] - top);
    z += w;
    for (int i = 0; i < n; ++i) out[i] += w * xi[mu * n + i];
  }
  for (double& v : out) v /= z;
  return out;
}

// The ODE samplers and continuous annealed AM step all samples of a level
// in one batched pass over the bank. Each sample must still follow its own
// trajectory: from the initial state the call recorded, a double-precision
// Heun / Euler / AM iteration per sample reaches the same final state, up to
// float rounding of the scores (relative 1e-4 after 12 levels).
TEST(ProbabilityFlow, BatchedLevelsFollowEachSamplesOwnTrajectory) {
  std::mt19937_64 rng(89);
  const int n = 24, k = 300, count = 12;
  auto xi = RandomGaussian(k * n, rng);
  Bank bank = MakeBank(n, StateKind::kContinuous, xi);
  for (SamplerKind s : {SamplerKind::kEuler, SamplerKind::kHeun, SamplerKind::kAnnealedAm}) {
    for (EnergyFamily family : {EnergyFamily::kGaussian, EnergyFamily::kLse}) {
      SampleOptions o;
      o.sampler = s;
      o.schedule = {.kind = ScheduleKind::kKarras, .sigma_max = 4, .sigma_min = 0.3, .steps = 12,
                    .stop_at_sigma_min = true};
      o.seed = 17;
      o.trajectory_every = 100;
      auto b = Sample(bank, {.family = family}, count, {}, {}, o);
      ASSERT_OK(b);
      const std::vector<double>& sig = b->sigmas;
      const bool gaussian = family == EnergyFamily::kGaussian;
      for (int q = 0; q < count; ++q) {
        const auto& x0 = b->samples[q].trajectory.front();
        std::vector<double> x(x0.begin(), x0.end());
        for (size_t i = 0; i + 1 < sig.size(); ++i) {
          if (s == SamplerKind::kAnnealedAm) {
            x = ReferenceDenoise(xi, n, x, sig[i], gaussian);
            continue;
          }
          const double h = sig[i + 1] - sig[i];
          const auto d0 = ReferenceDenoise(xi, n, x, sig[i], gaussian);
          std::vector<double> slope(n), next(n);
          for (int j = 0; j < n; ++j) {
            slope[j] = (x[j] - d0[j]) / sig[i];
            next[j] = x[j] + h * slope[j];
          }
          if (s == SamplerKind::kHeun) {
            const auto d1 = ReferenceDenoise(xi, n, next, sig[i + 1], gaussian);
            for (int j = 0; j < n; ++j) {
              next[j] = x[j] + 0.5 * h * (slope[j] + (next[j] - d1[j]) / sig[i + 1]);
            }
          }
          x = next;
        }
        double scale = 1.0;
        for (double v : x) scale = std::max(scale, std::fabs(v));
        for (int j = 0; j < n; ++j) {
          ASSERT_NEAR(b->samples[q].state[j], x[j], 1e-4 * scale)
              << SamplerName(s) << " family " << static_cast<int>(family) << " sample " << q
              << " coordinate " << j;
        }
      }
    }
  }
}

// Error at sigma_min against a fine reference, for a smooth mixture.
double FinalError(const Bank& bank, SamplerKind s, int intervals,
                  const std::vector<float>& reference) {
  SampleOptions o;
  o.sampler = s;
  o.schedule = {.kind = ScheduleKind::kLinear, .sigma_max = 3, .sigma_min = 0.5,
                .steps = intervals + 1, .stop_at_sigma_min = true};
  o.seed = 11;
  auto b = Sample(bank, {.family = EnergyFamily::kGaussian}, 1, {}, {}, o);
  double e = 0;
  for (size_t i = 0; i < reference.size(); ++i) {
    e = std::max(e, std::fabs(double{b->samples[0].state[i]} - reference[i]));
  }
  return e;
}

TEST(ProbabilityFlow, HeunIsSecondOrderEulerFirst) {
  std::mt19937_64 rng(83);
  const int n = 6, k = 4;
  auto xi = RandomGaussian(k * n, rng);
  Bank bank = MakeBank(n, StateKind::kContinuous, xi);
  SampleOptions ref;
  ref.sampler = SamplerKind::kHeun;
  ref.schedule = {.kind = ScheduleKind::kLinear, .sigma_max = 3, .sigma_min = 0.5,
                  .steps = 4097, .stop_at_sigma_min = true};
  ref.seed = 11;
  auto r = Sample(bank, {.family = EnergyFamily::kGaussian}, 1, {}, {}, ref);
  ASSERT_OK(r);
  const auto& reference = r->samples[0].state;
  const double h8 = FinalError(bank, SamplerKind::kHeun, 8, reference);
  const double h16 = FinalError(bank, SamplerKind::kHeun, 16, reference);
  const double h32 = FinalError(bank, SamplerKind::kHeun, 32, reference);
  const double e8 = FinalError(bank, SamplerKind::kEuler, 8, reference);
  const double e16 = FinalError(bank, SamplerKind::kEuler, 16, reference);
  const double e32 = FinalError(bank, SamplerKind::kEuler, 32, reference);
  EXPECT_GT(h8 / h16, 3.0) << h8 << " " << h16;
  EXPECT_LT(h8 / h16, 5.5);
  EXPECT_GT(h16 / h32, 3.0) << h16 << " " << h32;
  EXPECT_LT(h16 / h32, 5.5);
  EXPECT_GT(e8 / e16, 1.6) << e8 << " " << e16;
  EXPECT_LT(e8 / e16, 2.6);
  EXPECT_GT(e16 / e32, 1.6) << e16 << " " << e32;
  EXPECT_LT(e16 / e32, 2.6);
}

// K well-separated memories, sigma -> 0: every deterministic sample is a
// memory, and each is hit with frequency 1/K (chi-square, 3 dof).
TEST(GenerationIsRetrieval, SamplesAreMemoriesWithUniformFrequency) {
  const int n = 8, k = 4;
  std::vector<float> xi(k * n, 0.f);
  xi[0 * n + 0] = 4;
  xi[1 * n + 0] = -4;
  xi[2 * n + 1] = 4;
  xi[3 * n + 1] = -4;  // centred: mean zero
  Bank bank = MakeBank(n, StateKind::kContinuous, xi);
  for (SamplerKind s : {SamplerKind::kHeun, SamplerKind::kEuler}) {
    SampleOptions o;
    o.sampler = s;
    o.schedule = {.kind = ScheduleKind::kKarras, .sigma_max = 40, .sigma_min = 0.002, .steps = 64};
    o.seed = 2025;
    const int count = 400;
    auto b = Sample(bank, {.family = EnergyFamily::kGaussian}, count, {}, {}, o);
    ASSERT_OK(b);
    std::vector<int> hits(k, 0);
    for (const auto& r : b->samples) {
      EXPECT_EQ(r.sample_class, SampleClass::kMemorized) << r.relative_distance;
      EXPECT_LT(r.nearest.distance, 1e-3);
      ++hits[r.nearest.row];
    }
    double chi2 = 0;
    const double expected = double(count) / k;
    for (int h : hits) chi2 += (h - expected) * (h - expected) / expected;
    EXPECT_LT(chi2, 16.27) << SamplerName(s) << " hits " << hits[0] << " " << hits[1] << " "
                           << hits[2] << " " << hits[3];  // p = 0.001, 3 dof
  }
}

double SpuriousFraction(int n, int k, uint64_t seed, double smax = 30, double smin = 1,
                        int steps = 40, int iters = 1) {
  std::mt19937_64 rng(seed);
  auto xi = RandomBipolar(int64_t{k} * n, rng);
  Bank bank = MakeBank(n, StateKind::kBipolar, xi, {.family = EnergyFamily::kClassical});
  SampleOptions o;
  o.sampler = SamplerKind::kAnnealedAm;
  o.schedule = {.kind = ScheduleKind::kGeometric, .sigma_max = smax, .sigma_min = smin,
                .steps = steps};
  o.am_iterations = iters;
  o.seed = seed;
  auto b = Sample(bank, {.family = EnergyFamily::kClassical}, 40, {}, {}, o);
  EXPECT_TRUE(b.ok()) << b.status();
  int spurious = 0;
  for (const auto& r : b->samples) {
    EXPECT_TRUE(r.fixed_point);
    spurious += r.spurious_fixed_point;
  }
  return double(spurious) / b->samples.size();
}

TEST(SpuriousStates, OverloadedClassicalBankYieldsSpuriousFixedPoints) {
  const double above = SpuriousFraction(100, 40, 1);   // load 0.40 >> 0.138
  const double below = SpuriousFraction(100, 3, 2);    // load 0.03
  EXPECT_GT(above, 0.5) << "above capacity";
  EXPECT_LT(below, 0.1) << "below capacity";
}

TEST(Reproducibility, SameSeedSameBytesDifferentSeedDifferentSamples) {
  std::mt19937_64 rng(89);
  const int n = 16, k = 10;
  Bank bank = MakeBank(n, StateKind::kContinuous, RandomGaussian(k * n, rng));
  for (SamplerKind s : {SamplerKind::kEuler, SamplerKind::kHeun, SamplerKind::kStochastic,
                        SamplerKind::kLangevin, SamplerKind::kAnnealedAm}) {
    SampleOptions o;
    o.sampler = s;
    // Stop at a sigma_min above the memories' spread: as sigma -> 0 samples
    // land exactly on memories, and two seeds may pick the same one.
    o.schedule = {.sigma_max = 5, .sigma_min = 2, .steps = 16, .stop_at_sigma_min = true};
    o.seed = 123;
    auto a = Sample(bank, {.family = EnergyFamily::kGaussian}, 4, {}, {}, o);
    auto b = Sample(bank, {.family = EnergyFamily::kGaussian}, 4, {}, {}, o);
    o.seed = 124;
    auto c = Sample(bank, {.family = EnergyFamily::kGaussian}, 4, {}, {}, o);
    ASSERT_OK(a);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(std::memcmp(a->samples[i].state.data(), b->samples[i].state.data(), n * 4), 0)
          << SamplerName(s);
      EXPECT_NE(std::memcmp(a->samples[i].state.data(), c->samples[i].state.data(), n * 4), 0)
          << SamplerName(s);
    }
    // Samples within one call differ from each other.
    EXPECT_NE(std::memcmp(a->samples[0].state.data(), a->samples[1].state.data(), n * 4), 0);
  }
}

TEST(Inpainting, ClampedCoordinatesHoldAndTheRestIsCompleted) {
  std::mt19937_64 rng(97);
  const int n = 32, k = 5;
  auto xi = RandomGaussian(k * n, rng, 2.f);
  Bank bank = MakeBank(n, StateKind::kContinuous, xi);
  std::vector<float> query(n, 0.f);
  std::unique_ptr<bool[]> clamp(new bool[n]);
  for (int i = 0; i < n; ++i) {
    clamp[i] = i < n / 2;
    if (clamp[i]) query[i] = xi[3 * n + i];  // the known half of memory 3
  }
  SampleOptions o;
  o.sampler = SamplerKind::kHeun;
  // Start at sigma 3 (restart "at time t"): from sigma >> the spread of the
  // memories, replacing the clamped coordinates is not exact conditional
  // sampling and the free half can commit to another memory early.
  o.schedule = {.sigma_max = 3, .sigma_min = 0.01, .steps = 48};
  o.seed = 3;
  auto b = Sample(bank, {.family = EnergyFamily::kGaussian}, 8, query,
                  absl::MakeConstSpan(clamp.get(), n), o);
  ASSERT_OK(b);
  for (const auto& r : b->samples) {
    for (int i = 0; i < n / 2; ++i) ASSERT_EQ(r.state[i], query[i]);
    EXPECT_EQ(r.nearest.row, 3);
    EXPECT_EQ(r.sample_class, SampleClass::kMemorized);
  }
}

// Found by service_fuzz: a geometric schedule down to sigma_min = 3.2e-147
// overflowed the Euler step to NaN, and describing the sample read the
// "nearest memory" at row -1.
TEST(Validation, OverflowToNonFiniteStatesIsAnErrorNotAReadOutOfBounds) {
  std::mt19937_64 rng(3);
  const int n = 8, k = 6;
  Bank bank = MakeBank(n, StateKind::kContinuous, RandomGaussian(k * n, rng));
  SampleOptions o;
  o.sampler = SamplerKind::kEuler;
  o.schedule = {.kind = ScheduleKind::kGeometric, .sigma_max = 10,
                .sigma_min = 3.2033329522929615e-147, .steps = 8, .stop_at_sigma_min = true};
  o.seed = 2;
  auto b = Sample(bank, {.family = EnergyFamily::kLse}, 2, {}, {}, o);
  if (b.ok()) {
    for (const auto& r : b->samples) {
      for (float v : r.state) EXPECT_TRUE(std::isfinite(v));
      EXPECT_GE(r.nearest.row, 0);
    }
  } else {
    EXPECT_THAT(b, StatusIs(absl::StatusCode::kInvalidArgument));
  }
}

TEST(Validation, ContinuousSamplersNeedContinuousBanks) {
  SampleOptions o;
  o.sampler = SamplerKind::kHeun;
  EXPECT_THAT(ValidateSampleOptions(o, StateKind::kBipolar),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  o.sampler = SamplerKind::kAnnealedAm;
  EXPECT_OK(ValidateSampleOptions(o, StateKind::kBipolar));
}

}  // namespace
}  // namespace engram::core
