// Dynamics: Lyapunov descent, retrieval below capacity, one-step MHN
// retrieval, pattern completion, stopping rules.
#include "engram/core/dynamics.h"

#include <atomic>
#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "engram/core/bank.h"
#include "engram/core/status_macros.h"
#include "testing/random_banks.h"
#include "testing/status_matchers.h"

namespace engram::core {
namespace {

using engram::testing::FlipBits;
using engram::testing::MakeBank;
using engram::testing::RandomBipolar;
using engram::testing::RandomGaussian;
using engram::testing::StatusIs;

// Counts rises of an energy trace beyond float tolerance.
int Rises(const std::vector<double>& trace) {
  int rises = 0;
  for (size_t t = 1; t < trace.size(); ++t) {
    if (trace[t] - trace[t - 1] > EnergyTolerance(trace[t - 1], trace[t])) ++rises;
  }
  return rises;
}

struct DescentCase {
  std::string name;
  StateKind kind;
  EnergyConfig config;
  RetrieveOptions options;
};

class LyapunovTest : public ::testing::TestWithParam<DescentCase> {};

TEST_P(LyapunovTest, EnergyNeverRises) {
  const DescentCase& c = GetParam();
  std::mt19937_64 rng(101);
  int total_steps = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int n = 8 + static_cast<int>(rng() % 56);
    const int k = 2 + static_cast<int>(rng() % 30);
    auto xi = c.kind == StateKind::kBipolar ? RandomBipolar(k * n, rng)
                                            : RandomGaussian(k * n, rng);
    auto q = c.kind == StateKind::kBipolar ? RandomBipolar(n, rng)
                                           : RandomGaussian(n, rng, 1.5f);
    Bank bank = MakeBank(n, c.kind, xi, c.config);
    EnergyFunction energy(c.config, bank.view());
    RetrieveOptions o = c.options;
    o.record_trace = true;
    o.seed = trial;
    auto t = RunDynamics(energy, c.kind, q, {}, o);
    ASSERT_OK(t);
    ASSERT_EQ(t->energy_trace.size(), static_cast<size_t>(t->steps) + 1);
    EXPECT_EQ(Rises(t->energy_trace), 0) << c.name << " trial " << trial;
    EXPECT_EQ(t->lyapunov_violations, 0);
    // The reported end energy is the energy of the returned state (except
    // TinyBrain, whose energy lives on (v, h)).
    if (o.dynamics != Dynamics::kTinyBrain) {
      EXPECT_NEAR(t->energy_end, energy.Value(t->state.data()),
                  1e-5 * std::max(1.0, std::fabs(t->energy_end)));
    }
    EXPECT_LE(t->energy_end, t->energy_start + EnergyTolerance(t->energy_start, t->energy_end));
    total_steps += t->steps;
  }
  EXPECT_GT(total_steps, 40) << "trajectories too short to test descent";
}

std::vector<DescentCase> DescentCases() {
  std::vector<DescentCase> v;
  RetrieveOptions sync;
  sync.dynamics = Dynamics::kSync;
  RetrieveOptions async;
  async.dynamics = Dynamics::kAsync;
  RetrieveOptions grad;
  grad.dynamics = Dynamics::kGradient;
  // Gradient descent descends when alpha < 2 / L, L the largest curvature
  // |1 - beta lambda_max(Cov_p(xi))| <= beta max|xi|^2 ~ beta N here.
  grad.alpha = 0.005;
  grad.max_steps = 300;
  RetrieveOptions tiny;
  tiny.dynamics = Dynamics::kTinyBrain;
  tiny.dt = 0.02;
  tiny.max_steps = 300;
  const auto B = StateKind::kBipolar;
  const auto C = StateKind::kContinuous;
  v.push_back({"sync_lse_b1", C, {.family = EnergyFamily::kLse, .beta = 1}, sync});
  v.push_back({"sync_lse_b8", C, {.family = EnergyFamily::kLse, .beta = 8}, sync});
  v.push_back({"sync_gaussian", C, {.family = EnergyFamily::kGaussian, .beta = 0.5}, sync});
  v.push_back({"async_classical", B, {.family = EnergyFamily::kClassical}, async});
  v.push_back({"async_poly3", B, {.family = EnergyFamily::kPolynomial, .degree = 3}, async});
  v.push_back({"async_poly4_rect", B,
               {.family = EnergyFamily::kPolynomial, .degree = 4, .rectified = true}, async});
  v.push_back({"async_exponential", B, {.family = EnergyFamily::kExponential}, async});
  v.push_back({"async_lse", B, {.family = EnergyFamily::kLse, .beta = 0.2}, async});
  v.push_back({"gradient_lse", C, {.family = EnergyFamily::kLse, .beta = 2}, grad});
  v.push_back({"gradient_gaussian", C, {.family = EnergyFamily::kGaussian, .beta = 1}, grad});
  v.push_back({"tinybrain_lse", C, {.family = EnergyFamily::kLse, .beta = 2}, tiny});
  RetrieveOptions tiny_b = tiny;
  tiny_b.dt = 0.002;
  v.push_back({"tinybrain_lse_bipolar", B, {.family = EnergyFamily::kLse, .beta = 0.5}, tiny_b});
  v.push_back({"tinybrain_poly3_bipolar", B,
               {.family = EnergyFamily::kPolynomial, .degree = 3}, tiny_b});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Descent, LyapunovTest, ::testing::ValuesIn(DescentCases()),
                         [](const auto& info) { return info.param.name; });

// Random bipolar patterns well below capacity, 10-20 % of bits flipped, come
// back exactly.
struct RecallCase {
  std::string name;
  EnergyConfig config;
  Dynamics dynamics;
  int n;
  int k;
};

class BipolarRecallTest : public ::testing::TestWithParam<RecallCase> {};

TEST_P(BipolarRecallTest, FlippedBitsComeBackExactly) {
  const RecallCase& c = GetParam();
  std::mt19937_64 rng(7);
  auto xi = RandomBipolar(int64_t{c.k} * c.n, rng);
  Bank bank = MakeBank(c.n, StateKind::kBipolar, xi, c.config);
  EnergyFunction energy(c.config, bank.view());
  RetrieveOptions o;
  o.dynamics = c.dynamics;
  for (int q = 0; q < 30; ++q) {
    const int mu = static_cast<int>(rng() % c.k);
    const double frac = 0.10 + 0.10 * (q % 3) / 2.0;  // 10 %, 15 %, 20 %
    auto query = FlipBits(xi.data() + int64_t{mu} * c.n, c.n,
                          static_cast<int>(frac * c.n), rng);
    o.seed = q;
    auto t = RunDynamics(energy, StateKind::kBipolar, query, {}, o);
    ASSERT_OK(t);
    EXPECT_TRUE(t->converged());
    std::vector<float> want(xi.begin() + int64_t{mu} * c.n,
                            xi.begin() + int64_t{mu + 1} * c.n);
    EXPECT_EQ(t->state, want) << c.name << " query " << q << " flips " << frac;
    EXPECT_EQ(bank.Nearest(t->state.data()).row, mu);
  }
}

INSTANTIATE_TEST_SUITE_P(
    BelowCapacity, BipolarRecallTest,
    ::testing::Values(
        // load 0.03 << 0.138
        RecallCase{"classical_sync", {.family = EnergyFamily::kClassical}, Dynamics::kSync, 256, 8},
        RecallCase{"classical_async", {.family = EnergyFamily::kClassical}, Dynamics::kAsync, 256, 8},
        // n = 3: capacity N^2 / (6 ln N) ~ 2300 at N = 128; K = 60
        RecallCase{"poly3_sync", {.family = EnergyFamily::kPolynomial, .degree = 3},
                   Dynamics::kSync, 128, 60},
        RecallCase{"poly3_async", {.family = EnergyFamily::kPolynomial, .degree = 3},
                   Dynamics::kAsync, 128, 60},
        RecallCase{"exponential_sync", {.family = EnergyFamily::kExponential},
                   Dynamics::kSync, 64, 200}),
    [](const auto& info) { return info.param.name; });

TEST(ContinuousRecall, HighBetaLandsOnPatternInOneStep) {
  std::mt19937_64 rng(11);
  const int n = 64, k = 100;
  auto xi = RandomGaussian(k * n, rng);
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 20.0};
  Bank bank = MakeBank(n, StateKind::kContinuous, xi, cfg);
  EnergyFunction energy(cfg, bank.view());
  RetrieveOptions o;
  o.max_steps = 1;
  for (int q = 0; q < 20; ++q) {
    const int mu = static_cast<int>(rng() % k);
    auto noise = RandomGaussian(n, rng, 0.3f);
    std::vector<float> query(n);
    for (int i = 0; i < n; ++i) query[i] = xi[mu * n + i] + noise[i];
    auto t = RunDynamics(energy, StateKind::kContinuous, query, {}, o);
    ASSERT_OK(t);
    EXPECT_EQ(t->steps, 1);
    for (int i = 0; i < n; ++i) {
      EXPECT_NEAR(t->state[i], xi[mu * n + i], 1e-4) << "query " << q << " coord " << i;
    }
  }
}

TEST(PatternCompletion, HalfClampedRecoversTheRestBipolar) {
  std::mt19937_64 rng(13);
  const int n = 200, k = 10;
  auto xi = RandomBipolar(k * n, rng);
  EnergyConfig cfg{.family = EnergyFamily::kClassical};
  Bank bank = MakeBank(n, StateKind::kBipolar, xi, cfg);
  EnergyFunction energy(cfg, bank.view());
  for (Dynamics d : {Dynamics::kSync, Dynamics::kAsync}) {
    RetrieveOptions o;
    o.dynamics = d;
    for (int mu = 0; mu < k; ++mu) {
      std::vector<float> query = RandomBipolar(n, rng);
      std::vector<char> mask(n, 0);
      for (int i = 0; i < n / 2; ++i) {
        query[i] = xi[mu * n + i];
        mask[i] = 1;
      }
      std::vector<bool> clamp_vec(mask.begin(), mask.end());
      std::unique_ptr<bool[]> clamp(new bool[n]);
      for (int i = 0; i < n; ++i) clamp[i] = mask[i];
      auto t = RunDynamics(energy, StateKind::kBipolar, query,
                           absl::MakeConstSpan(clamp.get(), n), o);
      ASSERT_OK(t);
      for (int i = 0; i < n; ++i) {
        ASSERT_EQ(t->state[i], xi[mu * n + i]) << DynamicsName(d) << " mu " << mu << " i " << i;
      }
    }
  }
}

TEST(PatternCompletion, HalfClampedRecoversTheRestContinuous) {
  std::mt19937_64 rng(17);
  const int n = 64, k = 30;
  auto xi = RandomGaussian(k * n, rng);
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 10.0};
  Bank bank = MakeBank(n, StateKind::kContinuous, xi, cfg);
  EnergyFunction energy(cfg, bank.view());
  std::unique_ptr<bool[]> clamp(new bool[n]);
  for (int i = 0; i < n; ++i) clamp[i] = i % 2 == 0;
  for (int mu = 0; mu < k; ++mu) {
    std::vector<float> query(n, 0.f);
    for (int i = 0; i < n; i += 2) query[i] = xi[mu * n + i];
    RetrieveOptions o;
    auto t = RunDynamics(energy, StateKind::kContinuous, query,
                         absl::MakeConstSpan(clamp.get(), n), o);
    ASSERT_OK(t);
    EXPECT_TRUE(t->converged());
    for (int i = 0; i < n; ++i) {
      EXPECT_NEAR(t->state[i], xi[mu * n + i], 1e-3) << "mu " << mu << " i " << i;
    }
  }
}

TEST(Stopping, ShouldStopEndsWithDeadlineBetweenSteps) {
  std::mt19937_64 rng(19);
  const int n = 32, k = 5;
  auto xi = RandomGaussian(k * n, rng);
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 0.1};
  Bank bank = MakeBank(n, StateKind::kContinuous, xi, cfg);
  EnergyFunction energy(cfg, bank.view());
  RetrieveOptions o;
  o.dynamics = Dynamics::kGradient;
  o.alpha = 1e-4;  // far from converging in 3 steps
  int polls = 0;
  o.should_stop = [&] { return ++polls > 3; };
  auto q = RandomGaussian(n, rng);
  auto t = RunDynamics(energy, StateKind::kContinuous, q, {}, o);
  ASSERT_OK(t);
  EXPECT_EQ(t->stop_reason, StopReason::kDeadline);
  EXPECT_EQ(t->steps, 3);
}

TEST(Stopping, MaxStepsReported) {
  std::mt19937_64 rng(23);
  const int n = 16, k = 4;
  auto xi = RandomGaussian(k * n, rng);
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 0.5};
  Bank bank = MakeBank(n, StateKind::kContinuous, xi, cfg);
  EnergyFunction energy(cfg, bank.view());
  RetrieveOptions o;
  o.dynamics = Dynamics::kGradient;
  o.alpha = 1e-3;
  o.max_steps = 5;
  auto t = RunDynamics(energy, StateKind::kContinuous, RandomGaussian(n, rng), {}, o);
  ASSERT_OK(t);
  EXPECT_EQ(t->steps, 5);
  EXPECT_EQ(t->stop_reason, StopReason::kMaxSteps);
}

// Regression: gradient descent with a huge alpha overflowed to inf/NaN and the
// nearest-memory lookup then read out of bounds.
TEST(Divergence, HugeStepStopsWithDivergedAndAFiniteState) {
  std::mt19937_64 rng(29);
  const int n = 16, k = 6;
  auto xi = RandomGaussian(k * n, rng);
  Bank bank = MakeBank(n, StateKind::kContinuous, xi);
  for (Dynamics d : {Dynamics::kGradient, Dynamics::kTinyBrain}) {
    EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 5.0};
    EnergyFunction energy(cfg, bank.view());
    RetrieveOptions o;
    o.dynamics = d;
    o.alpha = 1e30;
    o.dt = 1e30;
    o.max_steps = 1000;
    auto t = RunDynamics(energy, StateKind::kContinuous, RandomGaussian(n, rng), {}, o);
    ASSERT_OK(t);
    EXPECT_EQ(t->stop_reason, StopReason::kDiverged) << DynamicsName(d);
    for (float v : t->state) ASSERT_TRUE(std::isfinite(v)) << DynamicsName(d);
    EXPECT_GE(bank.Nearest(t->state.data()).row, 0);
  }
  std::vector<float> bad(n, NAN);
  EXPECT_EQ(bank.Nearest(bad.data()).row, -1);
}

// The tie rule of the bipolar sync step: a neuron whose flip leaves the
// energy unchanged (drive exactly 0, common for an even number of patterns)
// keeps its value, on the one-query path and on the batched path alike.
// Reference: the exact drive in integers, sum_mu (F(d_mu + 2 xi) - F(d_mu -
// 2 xi)) / 2 over r = d - xi x_i, which is what the energy difference of
// flipping neuron i is.
TEST(TieRule, ZeroEnergyChangeKeepsTheBitOnBothPaths) {
  std::mt19937_64 rng(77);
  const int n = 33, k = 6, states = 24;
  struct Family {
    const char* name;
    EnergyConfig cfg;
    int degree;  // 2 for classical (F = s^2 / 2 up to the factor)
  };
  for (const Family& f : {Family{"classical", {.family = EnergyFamily::kClassical}, 2},
                          Family{"polynomial2", {.family = EnergyFamily::kPolynomial, .degree = 2}, 2},
                          Family{"polynomial4", {.family = EnergyFamily::kPolynomial, .degree = 4}, 4}}) {
    auto xi = RandomBipolar(int64_t{k} * n, rng);
    for (Precision precision : {Precision::kF32, Precision::kBitPacked}) {
      Bank bank(BankSpec{"t", n, StateKind::kBipolar, f.cfg, precision});
      bank.Append(xi, bank.AssignIds(k), {});
      EnergyFunction energy(f.cfg, bank.view());
      RetrieveOptions o;
      o.max_steps = 1;
      std::vector<std::vector<float>> qs;
      for (int q = 0; q < states; ++q) qs.push_back(RandomBipolar(n, rng));
      std::vector<BatchQuery> batch;
      for (const auto& q : qs) batch.push_back({q, {}, &o});
      auto batched = RunSyncBatch(energy, StateKind::kBipolar, batch);
      int ties = 0;
      for (int q = 0; q < states; ++q) {
        const std::vector<float>& x = qs[q];
        auto F = [&](int64_t s) -> int64_t {
          int64_t r = 1;
          for (int i = 0; i < f.degree; ++i) r *= s;
          return r;
        };
        std::vector<float> want(n);
        for (int i = 0; i < n; ++i) {
          int64_t diff = 0;  // E(x_i = -1) - E(x_i = +1), times a positive constant
          for (int mu = 0; mu < k; ++mu) {
            int64_t d = 0;
            for (int j = 0; j < n; ++j) {
              if (j != i) d += static_cast<int64_t>(xi[mu * n + j] * x[j]);
            }
            const int64_t e = static_cast<int64_t>(xi[mu * n + i]);
            diff += F(d + e) - F(d - e);
          }
          want[i] = diff > 0 ? 1.f : (diff < 0 ? -1.f : x[i]);
          ties += diff == 0;
        }
        auto one = RunDynamics(energy, StateKind::kBipolar, x, {}, o);
        ASSERT_TRUE(one.ok() && batched[q].ok());
        EXPECT_EQ(one->state, want) << f.name << " state " << q << " (one query)";
        EXPECT_EQ(batched[q]->state, want) << f.name << " state " << q << " (batched)";
      }
      EXPECT_GT(ties, 0) << f.name << ": the case must hold ties";
    }
  }
}

// A SyncBatch whose evaluations come from elsewhere (a bank's shards) runs
// the same dynamics: with an evaluator that is the bank's own batched pass
// over an energy of no rows, every trajectory is RunDynamics'; an
// evaluator's error finishes every query with it; a bipolar non-general
// bank steps on the drive the evaluator finishes from drive partials.
TEST(SyncBatchEvaluator, ExternalEvaluationsGiveTheSameTrajectories) {
  std::mt19937_64 rng(31);
  const int n = 20, k = 40;
  auto xi = RandomGaussian(k * n, rng, 1.f / std::sqrt(20.f));
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 6.0};
  Bank bank = MakeBank(n, StateKind::kContinuous, xi, cfg);
  EnergyFunction energy(cfg, bank.view());
  PatternView none;
  none.dim = n;
  EnergyFunction rowless(cfg, none);
  RetrieveOptions o;
  o.max_steps = 40;
  o.tol = 1e-6;
  o.record_trace = true;
  std::vector<std::vector<float>> queries;
  for (int q = 0; q < 5; ++q) queries.push_back(RandomGaussian(n, rng, 0.3f));
  int calls = 0;
  std::vector<absl::StatusOr<Trajectory>> got(queries.size(), absl::UnknownError("not run"));
  SyncBatch batch(
      rowless, StateKind::kContinuous,
      [&](uint64_t q, absl::StatusOr<Trajectory> t) { got[q] = std::move(t); },
      [&](const float* x, int64_t b, float* targets, double* energies, int64_t* nearest) {
        ++calls;
        energy.UpdateTargetBatch(x, b, targets, energies, nearest);
        return absl::OkStatus();
      });
  for (size_t q = 0; q < queries.size(); ++q) batch.Admit(q, {queries[q], {}, &o});
  while (!batch.empty()) batch.Step();
  EXPECT_GT(calls, 1);
  for (size_t q = 0; q < queries.size(); ++q) {
    ASSERT_OK(got[q]);
    auto alone = RunDynamics(energy, StateKind::kContinuous, queries[q], {}, o);
    ASSERT_OK(alone);
    EXPECT_EQ(got[q]->steps, alone->steps);
    EXPECT_EQ(got[q]->stop_reason, alone->stop_reason);
    EXPECT_NEAR(got[q]->energy_end, alone->energy_end, 1e-5);
    for (int i = 0; i < n; ++i) EXPECT_NEAR(got[q]->state[i], alone->state[i], 1e-5);
  }

  // An evaluation that fails on the third call ends every query with it.
  calls = 0;
  got.assign(queries.size(), absl::UnknownError("not run"));
  SyncBatch failing(
      rowless, StateKind::kContinuous,
      [&](uint64_t q, absl::StatusOr<Trajectory> t) { got[q] = std::move(t); },
      [&](const float* x, int64_t b, float* targets, double* energies, int64_t* nearest) {
        if (++calls == 3) return absl::UnavailableError("shard 2 is down");
        energy.UpdateTargetBatch(x, b, targets, energies, nearest);
        return absl::OkStatus();
      });
  for (size_t q = 0; q < queries.size(); ++q) failing.Admit(q, {queries[q], {}, &o});
  while (!failing.empty()) failing.Step();
  for (const auto& t : got) EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable);

  // lse on a bipolar bank steps on each neuron's drive: an evaluator that
  // finishes the drive partials (and takes the energies from a scores
  // pass) gives RunDynamics' trajectories, flip for flip.
  for (EnergyConfig bcfg : {EnergyConfig{.family = EnergyFamily::kLse, .beta = 0.5},
                            EnergyConfig{.family = EnergyFamily::kClassical}}) {
    SCOPED_TRACE(static_cast<int>(bcfg.family));
    const int bn = 48;
    Bank bits = MakeBank(bn, StateKind::kBipolar, RandomBipolar(30 * bn, rng), bcfg);
    EnergyFunction benergy(bcfg, bits.view());
    PatternView bnone;
    bnone.dim = bn;
    EnergyFunction browless(bcfg, bnone);
    std::vector<std::vector<float>> bq;
    for (int q = 0; q < 6; ++q) {
      std::vector<float> x(bits.pattern(q), bits.pattern(q) + bn);
      for (int i = 0; i < 12; ++i) x[(q * 7 + i * 5) % bn] *= -1.f;
      bq.push_back(x);
    }
    got.assign(bq.size(), absl::UnknownError("not run"));
    SyncBatch drive(
        browless, StateKind::kBipolar,
        [&](uint64_t q, absl::StatusOr<Trajectory> t) { got[q] = std::move(t); },
        [&](const float* x, int64_t b, float* targets, double* energies, int64_t* nearest) {
          benergy.UpdateTargetBatch(x, b, nullptr, energies, nearest);
          if (targets == nullptr) return absl::OkStatus();
          std::vector<StepPartial> parts;
          ENGRAM_RETURN_IF_ERROR(DrivePartialBatch(benergy, x, b, &parts));
          for (int64_t j = 0; j < b; ++j) FinishDrive(bcfg, parts[j], x + j * bn, targets + j * bn);
          return absl::OkStatus();
        });
    for (size_t q = 0; q < bq.size(); ++q) drive.Admit(q, {bq[q], {}, &o});
    while (!drive.empty()) drive.Step();
    int moved = 0;
    for (size_t q = 0; q < bq.size(); ++q) {
      ASSERT_OK(got[q]);
      auto alone = RunDynamics(benergy, StateKind::kBipolar, bq[q], {}, o);
      ASSERT_OK(alone);
      EXPECT_EQ(got[q]->steps, alone->steps);
      EXPECT_EQ(got[q]->stop_reason, alone->stop_reason);
      EXPECT_EQ(got[q]->state, alone->state);
      EXPECT_NEAR(got[q]->energy_end, alone->energy_end, 1e-6 * std::abs(alone->energy_end));
      moved += got[q]->steps > 0;
    }
    EXPECT_GT(moved, 0);
  }
}

TEST(Validation, AsyncOnContinuousIsFailedPrecondition) {
  RetrieveOptions o;
  o.dynamics = Dynamics::kAsync;
  EXPECT_THAT(ValidateRetrieveOptions(o, StateKind::kContinuous),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  o.dynamics = Dynamics::kSync;
  o.max_steps = 0;
  EXPECT_THAT(ValidateRetrieveOptions(o, StateKind::kContinuous),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace engram::core
