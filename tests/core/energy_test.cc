// Energies against direct formulas written independently here, gradients
// against central finite differences, on seeded random inputs.
#include "engram/core/energy.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "testing/random_banks.h"

namespace engram::core {
namespace {

using engram::testing::MakeBank;
using engram::testing::RandomBipolar;
using engram::testing::RandomGaussian;

struct Case {
  std::string name;
  EnergyConfig config;
  StateKind kind;
};

// Psi(z) = max over the simplex of p.z + H(p), H the Tsallis alpha-entropy
// (alpha = 2: sparsemax, 1.5: entmax), with p = [(alpha-1) z - tau]_+^(1/(alpha-1))
// and tau found by bisection on sum p = 1 (not the sort-based thresholds).
double TsallisPsi(const std::vector<double>& z, double alpha) {
  const double a1 = alpha - 1;
  auto mass = [&](double tau) {
    double m = 0;
    for (double v : z) m += std::pow(std::max(a1 * v - tau, 0.0), 1 / a1);
    return m;
  };
  double hi = a1 * *std::max_element(z.begin(), z.end()), lo = hi - 1.0;
  while (mass(lo) < 1) lo -= 1.0;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    (mass(mid) > 1 ? lo : hi) = mid;
  }
  double psi = 0, ent = 0;
  for (double v : z) {
    const double p = std::pow(std::max(a1 * v - 0.5 * (lo + hi), 0.0), 1 / a1);
    psi += p * v;
    ent += p - std::pow(p, alpha);
  }
  return psi + ent / (alpha * a1);
}

// Direct, loop-by-loop evaluation in double of SPEC section 2's table.
double DirectEnergy(const EnergyConfig& c, const std::vector<float>& xi, int n,
                    const std::vector<float>& x) {
  const int k = static_cast<int>(xi.size()) / n;
  auto dot = [&](int mu) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += double{xi[mu * n + i]} * x[i];
    return s;
  };
  auto sq_dist = [&](int mu) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += std::pow(double{xi[mu * n + i]} - x[i], 2);
    return s;
  };
  auto l1 = [&](int mu) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += std::fabs(double{xi[mu * n + i]} - x[i]);
    return s;
  };
  double sq_x = 0;
  for (float v : x) sq_x += double{v} * v;
  auto poly = [&](double s) {
    if (c.rectified && s < 0) return 0.0;
    return std::pow(s, c.degree);
  };
  double e = 0;
  switch (c.family) {
    case EnergyFamily::kClassical:
      for (int mu = 0; mu < k; ++mu) e -= 0.5 * dot(mu) * dot(mu);
      return e;
    case EnergyFamily::kPolynomial:
      for (int mu = 0; mu < k; ++mu) e -= poly(dot(mu));
      return e;
    case EnergyFamily::kExponential:
      for (int mu = 0; mu < k; ++mu) e -= std::exp(c.beta * dot(mu));
      return e;
    case EnergyFamily::kLse: {
      double z = 0;
      for (int mu = 0; mu < k; ++mu) z += std::exp(c.beta * dot(mu));
      return -std::log(z) / c.beta + 0.5 * sq_x;
    }
    case EnergyFamily::kGaussian: {
      double z = 0;
      for (int mu = 0; mu < k; ++mu) z += std::exp(-c.beta * sq_dist(mu) / 2);
      return -std::log(z) / c.beta;
    }
    case EnergyFamily::kGeneral: {
      std::vector<double> s(k);
      for (int mu = 0; mu < k; ++mu) {
        switch (c.similarity) {
          case SimilarityKind::kDot: s[mu] = dot(mu); break;
          case SimilarityKind::kNegHalfSqL2: s[mu] = -0.5 * sq_dist(mu); break;
          case SimilarityKind::kNegL1: s[mu] = -l1(mu); break;
        }
      }
      switch (c.separation) {
        case SeparationKind::kIdentity:
          for (double v : s) e -= v;
          return e;
        case SeparationKind::kPolynomial:
          for (double v : s) e -= poly(v);
          return e;
        case SeparationKind::kSoftmax: {
          double z = 0;
          for (double v : s) z += std::exp(c.beta * v);
          return -std::log(z) / c.beta;
        }
        case SeparationKind::kMax:
          return -*std::max_element(s.begin(), s.end());
        case SeparationKind::kLogSumRelu: {
          double z = 1e-12;
          for (double v : s) z += std::max(0.0, 1.0 + c.beta * v);
          return -std::log(z) / c.beta;
        }
        case SeparationKind::kSparsemax:
        case SeparationKind::kEntmax15: {
          std::vector<double> z(s);
          for (double& v : z) v *= c.beta;
          const double alpha = c.separation == SeparationKind::kSparsemax ? 2.0 : 1.5;
          return -TsallisPsi(z, alpha) / c.beta;
        }
      }
    }
  }
  return NAN;
}

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  auto add = [&](std::string name, EnergyConfig c, StateKind kind) {
    cases.push_back({std::move(name), c, kind});
  };
  const auto B = StateKind::kBipolar;
  const auto C = StateKind::kContinuous;
  add("classical", {.family = EnergyFamily::kClassical}, B);
  add("poly2", {.family = EnergyFamily::kPolynomial, .degree = 2}, B);
  add("poly3", {.family = EnergyFamily::kPolynomial, .degree = 3}, B);
  add("poly4_rect", {.family = EnergyFamily::kPolynomial, .degree = 4, .rectified = true}, B);
  add("exponential", {.family = EnergyFamily::kExponential, .beta = 0.5}, B);
  add("lse_b1", {.family = EnergyFamily::kLse, .beta = 1.0}, C);
  add("lse_b4", {.family = EnergyFamily::kLse, .beta = 4.0}, C);
  add("gaussian", {.family = EnergyFamily::kGaussian, .beta = 2.0}, C);
  for (auto sim : {SimilarityKind::kDot, SimilarityKind::kNegHalfSqL2,
                   SimilarityKind::kNegL1}) {
    for (auto sep : {SeparationKind::kIdentity, SeparationKind::kPolynomial,
                     SeparationKind::kSoftmax, SeparationKind::kMax,
                     SeparationKind::kSparsemax, SeparationKind::kEntmax15,
                     SeparationKind::kLogSumRelu}) {
      EnergyConfig c{.family = EnergyFamily::kGeneral, .degree = 3, .beta = 1.5,
                     .similarity = sim, .separation = sep};
      add("general_" + std::to_string(static_cast<int>(sim)) + "_" +
              std::to_string(static_cast<int>(sep)),
          c, C);
    }
  }
  return cases;
}

class EnergyFamilyTest : public ::testing::TestWithParam<Case> {};

std::vector<float> Patterns(const Case& c, int k, int n, std::mt19937_64& rng) {
  return c.kind == StateKind::kBipolar ? RandomBipolar(k * n, rng)
                                       : RandomGaussian(k * n, rng);
}

TEST_P(EnergyFamilyTest, ValueMatchesDirectFormula) {
  const Case& c = GetParam();
  std::mt19937_64 rng(17);
  for (int trial = 0; trial < 20; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 24);
    const int k = 1 + static_cast<int>(rng() % 12);
    auto xi = Patterns(c, k, n, rng);
    auto x = RandomGaussian(n, rng, c.kind == StateKind::kBipolar ? 0.4f : 1.f);
    Bank bank = MakeBank(n, c.kind, xi, c.config);
    EnergyFunction energy(c.config, bank.view());
    const double want = DirectEnergy(c.config, xi, n, x);
    const double got = energy.Value(x.data());
    // Similarities are float sums: odd polynomial terms of both signs cancel,
    // so the bound is relative to the largest term, not to the total.
    EXPECT_NEAR(got, want, 5e-5 * std::max(1.0, std::fabs(want)))
        << c.name << " n=" << n << " k=" << k;
  }
}

TEST_P(EnergyFamilyTest, GradientMatchesCentralDifferences) {
  const Case& c = GetParam();
  std::mt19937_64 rng(29);
  const bool l1 = EffectiveSimilarity(c.config) == SimilarityKind::kNegL1;
  const double h = 1e-2;
  for (int trial = 0; trial < 10; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 16);
    const int k = 1 + static_cast<int>(rng() % 8);
    auto xi = Patterns(c, k, n, rng);
    auto x = RandomGaussian(n, rng, c.kind == StateKind::kBipolar ? 0.3f : 1.f);
    Bank bank = MakeBank(n, c.kind, xi, c.config);
    EnergyFunction energy(c.config, bank.view());
    std::vector<float> grad(n);
    energy.ValueAndGradient(x.data(), grad.data());
    // Kinks (max, rectification, |.|) are skipped: FD is undefined there.
    std::vector<double> s(k);
    energy.Similarities(x.data(), s.data());
    for (int i = 0; i < n; ++i) {
      if (l1) {
        bool near_kink = false;
        for (int mu = 0; mu < k; ++mu) {
          near_kink |= std::fabs(xi[mu * n + i] - x[i]) < 4 * h;
        }
        if (near_kink) continue;
      }
      std::vector<double> xp(x.begin(), x.end()), xm(x.begin(), x.end());
      std::vector<float> fp(x), fm(x);
      fp[i] += h;
      fm[i] -= h;
      // The step actually taken in float.
      const double step = double{fp[i]} - double{fm[i]};
      const double ep = DirectEnergy(c.config, xi, n, fp);
      const double em = DirectEnergy(c.config, xi, n, fm);
      if (c.config.separation == SeparationKind::kMax &&
          c.config.family == EnergyFamily::kGeneral) {
        // Skip when the arg max changes inside the stencil.
        EnergyFunction ep_f(c.config, bank.view()), em_f(c.config, bank.view());
        std::vector<double> sp(k), sm(k);
        ep_f.Similarities(fp.data(), sp.data());
        em_f.Similarities(fm.data(), sm.data());
        if (std::max_element(sp.begin(), sp.end()) - sp.begin() !=
            std::max_element(sm.begin(), sm.end()) - sm.begin()) {
          continue;
        }
      }
      if (c.config.family == EnergyFamily::kGeneral &&
          (c.config.separation == SeparationKind::kSparsemax ||
           c.config.separation == SeparationKind::kEntmax15 ||
           c.config.separation == SeparationKind::kLogSumRelu)) {
        // Skip when the support changes inside the stencil: the weights are
        // continuous there but not differentiable.
        EnergyFunction probe(c.config, bank.view());
        std::vector<double> zp(k), zm(k), pp(k), pm(k);
        probe.Similarities(fp.data(), zp.data());
        probe.Similarities(fm.data(), zm.data());
        for (int mu = 0; mu < k; ++mu) {
          zp[mu] *= c.config.beta;
          zm[mu] *= c.config.beta;
        }
        const bool sparse = c.config.separation == SeparationKind::kSparsemax;
        sparse ? Sparsemax(zp.data(), k, pp.data()) : Entmax15(zp.data(), k, pp.data());
        sparse ? Sparsemax(zm.data(), k, pm.data()) : Entmax15(zm.data(), k, pm.data());
        if (c.config.separation == SeparationKind::kLogSumRelu) {
          for (int mu = 0; mu < k; ++mu) {
            pp[mu] = 1.0 + zp[mu] > 0 ? 1.0 : 0.0;
            pm[mu] = 1.0 + zm[mu] > 0 ? 1.0 : 0.0;
          }
        }
        bool same = true;
        for (int mu = 0; mu < k; ++mu) same &= (pp[mu] > 0) == (pm[mu] > 0);
        if (!same) continue;
        if (c.config.separation == SeparationKind::kLogSumRelu) {
          // Near an empty support the log's curvature (1 / sum^2) makes the
          // stencil's O(h^2) error large: check where the sum is not small.
          double sum = 0;
          for (double v : s) sum += std::max(0.0, 1.0 + c.config.beta * v);
          if (sum < 0.5) continue;
        }
      }
      if (c.config.rectified) {
        bool near_kink = false;
        for (double v : s) near_kink |= std::fabs(v) < 0.05;
        if (near_kink) continue;
      }
      const double fd = (ep - em) / step;
      const double scale = std::max(1.0, std::fabs(fd));
      EXPECT_NEAR(grad[i], fd, 2e-3 * scale) << c.name << " coord " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllFamilies, EnergyFamilyTest,
                         ::testing::ValuesIn(AllCases()),
                         [](const auto& info) { return info.param.name; });

// The sort-based thresholds against bisection: weights on the simplex, zero
// outside a support, and Psi equal to the variational value.
TEST(SparseSeparations, ThresholdsMatchBisection) {
  std::mt19937_64 rng(5);
  std::normal_distribution<double> g(0.0, 2.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int k = 1 + static_cast<int>(rng() % 40);
    std::vector<double> z(k), p(k);
    for (double& v : z) v = g(rng);
    if (trial % 7 == 0) z.assign(k, 1.5);  // all tied
    for (double alpha : {2.0, 1.5}) {
      const double psi = alpha == 2.0 ? Sparsemax(z.data(), k, p.data())
                                      : Entmax15(z.data(), k, p.data());
      double sum = 0;
      for (double v : p) {
        EXPECT_GE(v, 0.0);
        sum += v;
      }
      EXPECT_NEAR(sum, 1.0, 1e-12);
      EXPECT_NEAR(psi, TsallisPsi(z, alpha), 1e-9 * std::max(1.0, std::fabs(psi)));
      // Zero exactly below the threshold: the largest score always weighs.
      const int best = static_cast<int>(std::max_element(z.begin(), z.end()) - z.begin());
      EXPECT_GT(p[best], 0.0);
    }
  }
  // A margin of more than 1 (sparsemax) puts all the weight on the winner.
  std::vector<double> z = {5.0, 3.9, 0.0}, p(3);
  Sparsemax(z.data(), 3, p.data());
  EXPECT_EQ(p[0], 1.0);
  EXPECT_EQ(p[1], 0.0);
}

// v rounded to bf16, to nearest even (v finite).
float Bf16Rounded(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// A bf16 bank's batched pass (40 states: the sgemm form over widened bf16
// rows) gives each state the per-state pass's target and energy, and both
// are the softmax average of the bank's bf16 rows computed here in double.
// Tolerances: the per-state kernel keeps the state to 2^-16 (hi + lo), the
// batched one exactly; each score may differ by 2^-16 sum |xi_i x_i| plus
// f32 summation, so a weight by beta times that, relatively. Diffuse (beta
// 0.5), sharp (beta 60: few rows left per state, added row by row) and L2
// (gaussian) cases, over 1 000 rows (several widened blocks, the last
// partial).
TEST(Bf16Bank, BatchedPassAgreesWithOneStateAtATimeAndTheReference) {
  std::mt19937_64 rng(12);
  const int n = 48, k = 1000, b = 40;
  const auto xi = RandomGaussian(k * n, rng, 1.f / std::sqrt(48.f));
  for (EnergyConfig cfg : {EnergyConfig{.family = EnergyFamily::kLse, .beta = 0.5},
                           EnergyConfig{.family = EnergyFamily::kLse, .beta = 60.0},
                           EnergyConfig{.family = EnergyFamily::kGaussian, .beta = 4.0}}) {
    SCOPED_TRACE(cfg.beta);
    Bank bank(BankSpec{"b", n, StateKind::kContinuous, cfg, Precision::kBf16});
    bank.Append(xi, bank.AssignIds(k), {});
    EnergyFunction energy(cfg, bank.view());
    std::vector<float> x(b * n);
    for (int q = 0; q < b; ++q) {  // near a stored row, so the sharp case is sharp
      for (int i = 0; i < n; ++i) x[q * n + i] = xi[(q * 17) * n + i] + 0.05f * (rng() % 7 - 3.f);
    }
    std::vector<float> batched(b * n);
    std::vector<double> batched_e(b);
    energy.UpdateTargetBatch(x.data(), b, batched.data(), batched_e.data());
    for (int q = 0; q < b; ++q) {
      const float* xq = x.data() + q * n;
      std::vector<float> one(n);
      int64_t nearest = -1;
      const double e = energy.UpdateTarget(xq, one.data(), &nearest);
      EXPECT_NEAR(batched_e[q], e, 4e-5 * (1.0 + std::abs(e))) << q;
      // The reference: softmax over s_mu = <xi~_mu, x> (lse) or
      // -|x - xi|^2 / 2 with |xi|^2 of the f32 row (gaussian), of the
      // bf16 rows xi~.
      std::vector<double> s(k);
      double sqx = 0.0;
      for (int i = 0; i < n; ++i) sqx += double{xq[i]} * xq[i];
      for (int r = 0; r < k; ++r) {
        double dot = 0.0, sq = 0.0;
        for (int i = 0; i < n; ++i) {
          dot += double{Bf16Rounded(xi[r * n + i])} * xq[i];
          sq += double{xi[r * n + i]} * xi[r * n + i];
        }
        s[r] = cfg.family == EnergyFamily::kGaussian ? dot - 0.5 * sq - 0.5 * sqx : dot;
      }
      const double m = *std::max_element(s.begin(), s.end());
      // The paths' score difference delta, and what it can move a weighted
      // average of rows whose entries are at most max_abs.
      double largest = 0.0, max_abs = 0.0;
      for (int r = 0; r < k; ++r) {
        double a = 0.0;
        for (int i = 0; i < n; ++i) {
          a += std::abs(double{xi[r * n + i]} * xq[i]);
          max_abs = std::max(max_abs, double{std::abs(xi[r * n + i])});
        }
        largest = std::max(largest, a);
      }
      const double delta = 0x1p-15 * largest;
      const double tol = 4.0 * cfg.beta * delta * max_abs + 2e-6;
      std::vector<double> ref(n, 0.0);
      double z = 0.0;
      for (int r = 0; r < k; ++r) {
        const double w = std::exp(cfg.beta * (s[r] - m));
        z += w;
        for (int i = 0; i < n; ++i) ref[i] += w * Bf16Rounded(xi[r * n + i]);
      }
      for (int i = 0; i < n; ++i) {
        EXPECT_NEAR(batched[q * n + i], one[i], tol) << q << " " << i;
        EXPECT_NEAR(batched[q * n + i], ref[i] / z, 1e-4) << q << " " << i;
      }
    }
  }
}

TEST(LogSumExp, StableForLargeArguments) {
  std::vector<double> v = {1000.0, 1000.0, -5.0};
  EXPECT_NEAR(LogSumExp(v), 1000.0 + std::log(2.0), 1e-12);
  std::vector<double> w = {-1e5, -1e5 + std::log(3.0)};
  EXPECT_NEAR(LogSumExp(w), -1e5 + std::log(4.0), 1e-9);
  EXPECT_EQ(LogSumExp({}), -INFINITY);
}

TEST(LseEnergy, NoOverflowAtHighBeta) {
  // beta * s reaches ~1e5: the direct formula overflows, ours must not.
  std::mt19937_64 rng(3);
  const int n = 64, k = 50;
  auto xi = RandomGaussian(k * n, rng);
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 1000.0};
  Bank bank = MakeBank(n, StateKind::kContinuous, xi, cfg);
  EnergyFunction energy(cfg, bank.view());
  std::vector<float> x(xi.begin() + 7 * n, xi.begin() + 8 * n);  // pattern 7
  std::vector<float> grad(n);
  const double e = energy.ValueAndGradient(x.data(), grad.data());
  ASSERT_TRUE(std::isfinite(e));
  // At high beta, E -> -max_mu xi_mu.x + |x|^2/2 = -|x|^2/2 (x is pattern 7,
  // far from the others), and the gradient -> x - xi_7 = 0.
  double sq = 0;
  for (float v : x) sq += double{v} * v;
  EXPECT_NEAR(e, -0.5 * sq, 1e-3 * sq);
  for (float g : grad) EXPECT_NEAR(g, 0.f, 1e-3f);
}

TEST(ExponentialEnergy, UpdateTargetFiniteWhenValueOverflows) {
  std::mt19937_64 rng(5);
  const int n = 2048, k = 4;
  auto xi = RandomBipolar(k * n, rng);
  EnergyConfig cfg{.family = EnergyFamily::kExponential, .beta = 1.0};
  Bank bank = MakeBank(n, StateKind::kBipolar, xi, cfg);
  EnergyFunction energy(cfg, bank.view());
  std::vector<float> target(n);
  energy.UpdateTarget(xi.data(), target.data());
  for (int i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(target[i]));
    EXPECT_EQ(target[i] > 0, xi[i] > 0) << i;
  }
}

TEST(ValidateEnergyConfig, RejectsBadFields) {
  EXPECT_FALSE(ValidateEnergyConfig({.beta = 0.0}, StateKind::kContinuous).ok());
  EXPECT_FALSE(ValidateEnergyConfig({.beta = NAN}, StateKind::kContinuous).ok());
  EXPECT_FALSE(ValidateEnergyConfig(
      {.family = EnergyFamily::kPolynomial, .degree = 0}, StateKind::kBipolar).ok());
  EXPECT_EQ(ValidateEnergyConfig({.family = EnergyFamily::kClassical},
                                 StateKind::kContinuous).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(ValidateEnergyConfig({.family = EnergyFamily::kClassical},
                                   StateKind::kBipolar).ok());
}

// beta's documented range [1e-12, 1e6]: a subnormal beta (whose 1/beta is
// infinite) is refused, and at the floor the lse energy of a bank is finite
// and equals its closed form -(log K)/beta - mean_mu(xi_mu . x) + |x|^2/2
// to first order in beta.
TEST(ValidateEnergyConfig, BetaRangeKeepsEnergiesFinite) {
  for (double beta : {5e-324, 1e-300, 9.9e-13, 1.0000001e6, double{INFINITY}}) {
    EXPECT_EQ(ValidateEnergyConfig({.family = EnergyFamily::kLse, .beta = beta},
                                   StateKind::kContinuous).code(),
              absl::StatusCode::kInvalidArgument) << beta;
  }
  EXPECT_TRUE(ValidateEnergyConfig({.family = EnergyFamily::kLse, .beta = 1e-12},
                                   StateKind::kContinuous).ok());
  EXPECT_TRUE(ValidateEnergyConfig({.family = EnergyFamily::kLse, .beta = 1e6},
                                   StateKind::kContinuous).ok());
  std::mt19937_64 rng(3);
  const int n = 8, k = 100;
  const std::vector<float> xi = RandomGaussian(k * n, rng);
  const std::vector<float> x = RandomGaussian(n, rng);
  const double beta = 1e-12;
  const EnergyConfig config{.family = EnergyFamily::kLse, .beta = beta};
  Bank bank = MakeBank(n, StateKind::kContinuous, xi, config);
  EnergyFunction f(config, bank.view());
  double mean = 0, sq = 0;
  for (int mu = 0; mu < k; ++mu) {
    double d = 0;
    for (int i = 0; i < n; ++i) d += double{xi[mu * n + i]} * x[i];
    mean += d / k;
  }
  for (int i = 0; i < n; ++i) sq += double{x[i]} * x[i];
  const double e = f.Value(x.data());
  ASSERT_TRUE(std::isfinite(e));
  const double want = -std::log(double{k}) / beta - mean + 0.5 * sq;
  EXPECT_NEAR(e, want, 1e-6 * std::abs(want));
}

}  // namespace
}  // namespace engram::core
