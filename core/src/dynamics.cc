#include "engram/core/dynamics.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <random>

#include <Eigen/Core>

#include "absl/strings/str_cat.h"
#include "engram/core/status_macros.h"
#include "fused.h"
#include "parallel.h"
#include "state_loops.h"

namespace engram::core {
namespace {

using RowMajorMatrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

bool Clamped(absl::Span<const bool> clamp, int i) {
  return !clamp.empty() && clamp[i];
}

// Records the energy after a step, counting Lyapunov violations when the
// dynamics guarantee descent.
class EnergyRecorder {
 public:
  EnergyRecorder(Trajectory* t, bool record_trace, bool guaranteed)
      : t_(t), record_trace_(record_trace), guaranteed_(guaranteed) {}
  void Start(double e) {
    t_->energy_start = e;
    t_->energy_end = e;
    if (record_trace_) t_->energy_trace.push_back(e);
  }
  void Step(double e) {
    if (guaranteed_ && e - t_->energy_end > EnergyTolerance(t_->energy_end, e)) {
      ++t_->lyapunov_violations;
    }
    t_->energy_end = e;
    if (record_trace_) t_->energy_trace.push_back(e);
  }

 private:
  Trajectory* t_;
  bool record_trace_;
  bool guaranteed_;
};

template <typename V>
bool AllFinite(const V& v) {
  for (auto x : v) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

bool AllFinite(const std::vector<float>& v) {
  return internal::AllFinite(v.data(), static_cast<int64_t>(v.size()));
}

bool StopRequested(const RetrieveOptions& o) {
  return o.should_stop && o.should_stop();
}

// The sync move from x to its update target (sign for bipolar states,
// clamped coordinates held at the query) into `next`; returns |next - x|_inf.
double SyncMove(StateKind kind, absl::Span<const float> query, absl::Span<const bool> clamp,
                const float* x, const float* target, float* next) {
  if (clamp.empty() && kind == StateKind::kContinuous) {  // next = target
    std::copy(target, target + query.size(), next);
    return internal::MaxAbsDiff(target, x, static_cast<int64_t>(query.size()));
  }
  double delta = 0.0;
  for (size_t i = 0; i < query.size(); ++i) {
    float v;
    if (Clamped(clamp, static_cast<int>(i))) {
      v = query[i];
    } else if (kind == StateKind::kBipolar) {
      v = target[i] > 0.f ? 1.f : (target[i] < 0.f ? -1.f : x[i]);
    } else {
      v = target[i];
    }
    delta = std::max(delta, static_cast<double>(std::fabs(v - x[i])));
    next[i] = v;
  }
  return delta;
}

bool BipolarDrive(const EnergyFunction& energy, const float* x, float* drive, double* e,
                  int64_t* nearest_row);
bool HasKrotovHopfieldDrive(const EnergyConfig& cfg, const PatternView& p);

// x <- sep-weighted sum of patterns (sign for bipolar), clamped coordinates
// held. Every pass over the bank at a state x gives E(x), the update target
// and the nearest memory of x; when the update would move x by less than
// `tol` the dynamics stop at x without taking it, so the energy and nearest
// memory reported are exactly those of the returned state and no pass is
// spent on a state that differs from x by less than the tolerance. (Bipolar
// states converge with no flip, so there the step is the identity anyway.)
void RunSync(const EnergyFunction& energy, StateKind kind,
             absl::Span<const float> query, absl::Span<const bool> clamp,
             const RetrieveOptions& o, Trajectory* t) {
  const int n = energy.dim();
  EnergyRecorder rec(t, o.record_trace,
                     GuaranteesDescent(Dynamics::kSync, energy.config()));
  std::vector<float> x(query.begin(), query.end()), target(n), next(n);
  // Bipolar banks step on the Krotov-Hopfield drive; they need only the
  // energy (scores, no weighted sum) from the energy function.
  const bool krotov_hopfield = kind == StateKind::kBipolar &&
                               HasKrotovHopfieldDrive(energy.config(), energy.patterns());
  // E(x), the target of x and x's nearest row.
  // A state the dynamics will not step from (max_steps reached) needs no
  // target: then the pass computes the scores only.
  auto evaluate = [&] {
    if (t->steps >= o.max_steps) return energy.ValueAndNearest(x.data(), &t->nearest_row);
    if (!krotov_hopfield) return energy.UpdateTarget(x.data(), target.data(), &t->nearest_row);
    double e;
    BipolarDrive(energy, x.data(), target.data(), &e, &t->nearest_row);
    // lse and gaussian energies on a bipolar bank take a pass of their own.
    if (std::isnan(e)) e = energy.ValueAndNearest(x.data(), &t->nearest_row);
    return e;
  };
  rec.Start(evaluate());
  while (true) {
    bool finite = false;
    double delta = 0.0;
    if (t->steps < o.max_steps) {
      finite = AllFinite(target);
      if (finite) delta = SyncMove(kind, query, clamp, x.data(), target.data(), next.data());
    }
    if (std::optional<StopReason> stop = SyncStopRule(t->steps, o, finite, delta)) {
      t->stop_reason = *stop;
      break;
    }
    x.swap(next);
    ++t->steps;
    rec.Step(evaluate());
  }
  t->state = std::move(x);
}

// Krotov-Hopfield (2016) parallel update for bipolar banks with a dot-product
// energy: every neuron takes the sign that gives the lower energy with all
// other neurons fixed, sigma_i <- sign(sum_mu F(r_mu + xi_mui) - F(r_mu -
// xi_mui)), r_mu = d_mu - xi_mui sigma_i. Unlike sign(Xi^T F'(Xi x)) it has
// no self-interaction term (W_ii = 0 for the classical energy), which is what
// the capacity results of SPEC section 5 assume. With a_mu = F(d) - F(d-2)
// and b_mu = F(d+2) - F(d) the drive is Xi^T (a+b)/2 + sigma_i sum (a-b)/2.
// Returns false when the energy has no such form (caller falls back).
// Krotov-Hopfield weights of a polynomial or classical energy:
// c = (a + b) / 2 and h = (a - b) / 2 from the overlap d.
class KrotovHopfieldWeights : public internal::RowWeights {
 public:
  explicit KrotovHopfieldWeights(const EnergyConfig& cfg) : cfg_(cfg) {}
  internal::WeightDomain domain() const override { return internal::WeightDomain::kLinear; }
  // Also returns the block's energy terms -sum F(d), E(x) of these families.
  double Block(const double* d, int64_t count, double* w, double* h) const override {
    double e = 0.0;
    if (cfg_.family == EnergyFamily::kClassical) {
      // F(s) = s^2 / 2: a = 2d - 2, b = 2d + 2, so c = 2d and h = -2, exactly
      // what the general form below computes for the integer overlaps of
      // bipolar states (every step is exact in double for |d| < 2^25).
      for (int64_t mu = 0; mu < count; ++mu) {
        w[mu] = 2.0 * d[mu];
        h[mu] = -2.0;
        e -= 0.5 * d[mu] * d[mu];
      }
      return e;
    }
    for (int64_t mu = 0; mu < count; ++mu) {
      const double f = F(d[mu]);
      const double a = f - F(d[mu] - 2);
      const double b = F(d[mu] + 2) - f;
      w[mu] = 0.5 * (a + b);
      h[mu] = 0.5 * (a - b);
      e -= f;
    }
    return e;
  }

  // The classical weights in integers: w = 2d, h = -2, energy terms
  // -d^2 / 2. (Polynomial weights are powers of d: no affine form.)
  bool affine_integer_form(internal::AffineIntegerForm* form) const override {
    if (cfg_.family != EnergyFamily::kClassical) return false;
    *form = {.a = 2, .b = 0, .c = -2, .e2 = -0.5, .e1 = 0.0};
    return true;
  }

 private:
  double F(double s) const {
    if (cfg_.family == EnergyFamily::kClassical) return 0.5 * s * s;
    if (cfg_.rectified && s <= 0) return 0.0;
    double r = 1.0;
    for (int i = 0; i < cfg_.degree; ++i) r *= s;
    return r;
  }
  EnergyConfig cfg_;
};

// True when the energy has the Krotov-Hopfield form used below (a separation
// of the dot-product overlap); the UHN and L1 energies fall back.
bool HasKrotovHopfieldDrive(const EnergyConfig& cfg, const PatternView& p) {
  return EffectiveSimilarity(cfg) != SimilarityKind::kNegL1 &&
         cfg.family != EnergyFamily::kGeneral && p.rows > 0;
}

// E(x) from a drive pass over the dot-product overlaps d = Xi x, for the
// families whose energy is a function of d alone (classical, polynomial:
// -sum F(d); exponential: -exp(lse(beta d))); NaN for the others (lse and
// gaussian add terms of |x|, so their energy takes its own pass).
double DriveEnergy(const EnergyConfig& cfg, const internal::FusedSums& sums) {
  switch (cfg.family) {
    case EnergyFamily::kClassical:
    case EnergyFamily::kPolynomial:
      return sums.energy_terms;
    case EnergyFamily::kExponential:
      return -std::exp(sums.log_scale + std::log(sums.wsum));
    default:
      return std::numeric_limits<double>::quiet_NaN();
  }
}

bool BipolarDrive(const EnergyFunction& energy, const float* x, float* drive, double* e,
                  int64_t* nearest_row) {
  const EnergyConfig& cfg = energy.config();
  const PatternView& p = energy.patterns();
  const int n = p.dim;
  if (!HasKrotovHopfieldDrive(cfg, p)) return false;
  const bool want_extras = e != nullptr;
  internal::FusedSums sums;
  float hs;
  if (cfg.family == EnergyFamily::kClassical ||
      cfg.family == EnergyFamily::kPolynomial) {
    KrotovHopfieldWeights rule(cfg);
    sums = internal::FusedPass(p, SimilarityKind::kDot, x, rule, drive, want_extras);
    hs = static_cast<float>(sums.hsum);
  } else {
    // exp(beta s) separation (exponential, lse, gaussian: for +-1 patterns
    // the gaussian similarity is the dot product minus a constant): with
    // w = exp(beta d), c = w (1 + e^{-2 beta}) / 2 and h = w (e^{-2 beta} - 1) / 2,
    // so the drive is proportional to sum w xi + sigma (e2 - 1)/(e2 + 1) sum w.
    internal::LogSoftmaxWeights rule(cfg.beta);
    sums = internal::FusedPass(p, SimilarityKind::kDot, x, rule, drive, want_extras,
                               want_extras ? *nearest_row : -1);
    const double e2 = std::exp(-2.0 * cfg.beta);
    hs = static_cast<float>(sums.wsum * (e2 - 1.0) / (e2 + 1.0));
  }
  for (int i = 0; i < n; ++i) drive[i] += hs * x[i];
  if (want_extras) {
    *e = DriveEnergy(cfg, sums);
    *nearest_row = sums.nearest_row;
  }
  return true;
}

// BipolarDrive for b states at once (x and drive are b x dim): the
// overlaps and the weighted sums are matrix-matrix products. With `energies`
// (b slots) also the energies and nearest rows, as BipolarDrive.
bool BipolarDriveBatch(const EnergyFunction& energy, const float* x, int64_t b, float* drive,
                       double* energies = nullptr, int64_t* nearest_rows = nullptr) {
  const EnergyConfig& cfg = energy.config();
  const PatternView& p = energy.patterns();
  const int n = p.dim;
  if (!HasKrotovHopfieldDrive(cfg, p)) return false;
  if (b < internal::BatchMinStates(p)) {  // as UpdateTargetBatch
    for (int64_t q = 0; q < b; ++q) {
      BipolarDrive(energy, x + q * n, drive + q * n, energies ? energies + q : nullptr,
                   nearest_rows ? nearest_rows + q : nullptr);
    }
    return true;
  }
  std::vector<internal::FusedSums> sums(b);
  const bool polynomial = cfg.family == EnergyFamily::kClassical ||
                          cfg.family == EnergyFamily::kPolynomial;
  const bool extras = energies != nullptr;
  if (polynomial) {
    KrotovHopfieldWeights rule(cfg);
    internal::FusedPassBatch(p, SimilarityKind::kDot, x, b, rule, drive, sums.data(), extras);
  } else {
    internal::LogSoftmaxWeights rule(cfg.beta);
    internal::FusedPassBatch(p, SimilarityKind::kDot, x, b, rule, drive, sums.data(), extras);
  }
  const double e2 = std::exp(-2.0 * cfg.beta);
  for (int64_t q = 0; q < b; ++q) {
    const float hs = static_cast<float>(
        polynomial ? sums[q].hsum : sums[q].wsum * (e2 - 1.0) / (e2 + 1.0));
    for (int i = 0; i < n; ++i) drive[q * n + i] += hs * x[q * n + i];
    if (extras) {
      energies[q] = DriveEnergy(cfg, sums[q]);
      nearest_rows[q] = sums[q].nearest_row;
    }
  }
  return true;
}

// The gradient steps of RunGradientDynamics; a failed evaluation is
// returned and ends the trajectory.
absl::Status GradientSteps(int n, const EnergyConfig& config, absl::Span<const float> query,
                           absl::Span<const bool> clamp, const RetrieveOptions& o,
                           const GradientOracle& value_and_gradient, Trajectory* t) {
  EnergyRecorder rec(t, o.record_trace, GuaranteesDescent(Dynamics::kGradient, config));
  std::vector<float> x(query.begin(), query.end()), grad(n);
  ENGRAM_ASSIGN_OR_RETURN(const double e0, value_and_gradient(x.data(), grad.data()));
  rec.Start(e0);
  const float alpha = static_cast<float>(o.alpha);
  while (true) {
    if (t->steps >= o.max_steps) { t->stop_reason = StopReason::kMaxSteps; break; }
    if (StopRequested(o)) { t->stop_reason = StopReason::kDeadline; break; }
    double delta = 0.0;
    std::vector<float> next = x;
    for (int i = 0; i < n; ++i) {
      if (Clamped(clamp, i)) continue;
      const float step = alpha * grad[i];
      next[i] -= step;
      delta = std::max(delta, static_cast<double>(std::fabs(step)));
    }
    std::vector<float> next_grad(n);
    double e_next = NAN;
    if (AllFinite(next)) {
      ENGRAM_ASSIGN_OR_RETURN(e_next, value_and_gradient(next.data(), next_grad.data()));
    }
    if (!AllFinite(next) || !AllFinite(next_grad) || !std::isfinite(e_next)) {
      t->stop_reason = StopReason::kDiverged;
      break;
    }
    x.swap(next);
    grad.swap(next_grad);
    ++t->steps;
    rec.Step(e_next);
    if (delta < o.tol) { t->stop_reason = StopReason::kConverged; break; }
  }
  t->state = std::move(x);
  return absl::OkStatus();
}

void RunGradient(const EnergyFunction& energy, absl::Span<const float> query,
                 absl::Span<const bool> clamp, const RetrieveOptions& o,
                 Trajectory* t) {
  GradientSteps(energy.dim(), energy.config(), query, clamp, o,
                [&](const float* x, float* grad) -> absl::StatusOr<double> {
                  return energy.ValueAndGradient(x, grad);
                },
                t)
      .IgnoreError();  // this oracle cannot fail
}

// The async dynamics' evaluations over one bank: overlaps d_mu = xi_mu .
// sigma are integers kept exactly in double, and a flip changes each by
// -2 sigma_i xi_mu,i (O(K) per neuron).
class OverlapFlips : public FlipOracle {
 public:
  OverlapFlips(const EnergyFunction& energy, absl::Span<const float> x)
      : energy_(energy), p_(energy.patterns()), d_(p_.rows, 0.0), d_flip_(p_.rows),
        s_(p_.rows) {
    for (int64_t mu = 0; mu < p_.rows; ++mu) {
      const float* r = p_.row(mu);
      double acc = 0.0;
      for (int i = 0; i < p_.dim; ++i) acc += double{r[i]} * x[i];
      d_[mu] = acc;
    }
  }

  absl::StatusOr<KeyedEnergy> Evaluate(const float* x, int flipped) override {
    if (flipped < 0) return Keyed(d_);
    // x holds the flipped value: the old sign was -x[flipped].
    const double two_sigma = -2.0 * x[flipped];
    for (int64_t mu = 0; mu < p_.rows; ++mu) {
      d_flip_[mu] = d_[mu] - two_sigma * p_.row(mu)[flipped];
    }
    return Keyed(d_flip_);
  }
  void Accept(int) override { d_.swap(d_flip_); }

 private:
  // Energy and a strictly monotone key of it that never overflows.
  KeyedEnergy Keyed(const std::vector<double>& dd) {
    const EnergyConfig& cfg = energy_.config();
    const int n = p_.dim;
    const int64_t k = p_.rows;
    const SimilarityKind sim = EffectiveSimilarity(cfg);
    // Similarity from the exact overlap (patterns and state are +-1).
    for (int64_t mu = 0; mu < k; ++mu) {
      switch (sim) {
        case SimilarityKind::kDot: s_[mu] = dd[mu]; break;
        case SimilarityKind::kNegHalfSqL2:
          s_[mu] = dd[mu] - 0.5 * p_.sq_norms[mu] - 0.5 * n; break;
        case SimilarityKind::kNegL1: s_[mu] = -(n - dd[mu]); break;
      }
    }
    KeyedEnergy out;
    out.energy = energy_.EnergyFromSimilarities(s_.data(), n, nullptr);
    out.key = out.energy;
    if (cfg.family == EnergyFamily::kExponential) {
      for (int64_t mu = 0; mu < k; ++mu) s_[mu] *= cfg.beta;
      out.key = -LogSumExp(s_);
    }
    return out;
  }

  const EnergyFunction& energy_;
  const PatternView& p_;
  std::vector<double> d_, d_flip_, s_;
};

void RunAsync(const EnergyFunction& energy, absl::Span<const float> query,
              absl::Span<const bool> clamp, const RetrieveOptions& o,
              Trajectory* t) {
  OverlapFlips flips(energy, query);
  absl::StatusOr<Trajectory> r = RunAsyncDynamics(energy.dim(), query, clamp, o, flips);
  *t = *std::move(r);  // this oracle cannot fail
}

void RunTinyBrain(const EnergyFunction& energy, StateKind kind,
                  absl::Span<const float> query, absl::Span<const bool> clamp,
                  const RetrieveOptions& o, Trajectory* t) {
  TinyBrainMemory memory(energy, kind, o.dt / o.tau_h);
  auto oracle = [&](const float* v, bool, StepPartial* merged, double* step_max) {
    *merged = memory.At(v, step_max);
    return absl::OkStatus();
  };
  *t = *RunTinyBrainDynamics(energy.dim(), kind, energy.config(), query, clamp, o,
                             oracle);  // this oracle cannot fail
}

}  // namespace

bool UsesBipolarDrive(const EnergyConfig& config, StateKind kind) {
  PatternView some_rows;
  some_rows.rows = 1;
  return kind == StateKind::kBipolar && HasKrotovHopfieldDrive(config, some_rows);
}

absl::Status DrivePartialBatch(const EnergyFunction& energy, const float* x, int64_t b,
                               std::vector<StepPartial>* out) {
  const EnergyConfig& cfg = energy.config();
  const PatternView& p = energy.patterns();
  const int n = p.dim;
  if (!UsesBipolarDrive(cfg, StateKind::kBipolar)) {
    return absl::UnimplementedError(
        "this energy has no bipolar drive (general families and L1 similarity step to an "
        "update target)");
  }
  const bool polynomial = cfg.family == EnergyFamily::kClassical ||
                          cfg.family == EnergyFamily::kPolynomial;
  out->assign(b, StepPartial{});
  for (StepPartial& part : *out) {
    part.log_domain = !polynomial;
    part.rows = p.rows;
    part.sum.assign(n, 0.f);
  }
  if (p.rows == 0 || b == 0) return absl::OkStatus();
  // The rules and passes of BipolarDrive / BipolarDriveBatch, keeping the
  // sums the drive is finished from.
  std::unique_ptr<internal::RowWeights> rule;
  if (polynomial) {
    rule = std::make_unique<KrotovHopfieldWeights>(cfg);
  } else {
    rule = std::make_unique<internal::LogSoftmaxWeights>(cfg.beta);
  }
  if (b < internal::BatchMinStates(p)) {
    for (int64_t q = 0; q < b; ++q) {
      StepPartial& part = (*out)[q];
      internal::SumsToPartial(
          internal::FusedPass(p, SimilarityKind::kDot, x + q * n, *rule, part.sum.data(), false),
          &part);
    }
    return absl::OkStatus();
  }
  std::vector<float> acc(b * n);
  std::vector<internal::FusedSums> sums(b);
  internal::FusedPassBatch(p, SimilarityKind::kDot, x, b, *rule, acc.data(), sums.data(), false);
  for (int64_t q = 0; q < b; ++q) {
    StepPartial& part = (*out)[q];
    internal::SumsToPartial(sums[q], &part);
    std::copy(acc.begin() + q * n, acc.begin() + (q + 1) * n, part.sum.begin());
  }
  return absl::OkStatus();
}

void FinishDrive(const EnergyConfig& config, const StepPartial& merged, const float* x,
                 float* drive) {
  const int n = static_cast<int>(merged.sum.size());
  if (merged.rows == 0) {
    std::fill(drive, drive + n, 0.f);
    return;
  }
  // As BipolarDrive: drive = acc + hs x, with hs the rule's second sum
  // (polynomial) or sum w (e2 - 1) / (e2 + 1) (exp(beta d) weights).
  const bool polynomial = config.family == EnergyFamily::kClassical ||
                          config.family == EnergyFamily::kPolynomial;
  const double e2 = std::exp(-2.0 * config.beta);
  const float hs = static_cast<float>(polynomial ? merged.hsum
                                                 : merged.wsum * (e2 - 1.0) / (e2 + 1.0));
  for (int i = 0; i < n; ++i) drive[i] = merged.sum[i] + hs * x[i];
}

std::string DynamicsName(Dynamics d) {
  switch (d) {
    case Dynamics::kSync: return "sync";
    case Dynamics::kAsync: return "async";
    case Dynamics::kGradient: return "gradient";
    case Dynamics::kTinyBrain: return "tinybrain";
  }
  return "unknown";
}

std::string StopReasonName(StopReason r) {
  switch (r) {
    case StopReason::kConverged: return "converged";
    case StopReason::kMaxSteps: return "max_steps";
    case StopReason::kDeadline: return "deadline";
    case StopReason::kDiverged: return "diverged";
  }
  return "unknown";
}

double EnergyTolerance(double e_before, double e_after) {
  return 1e-5 * std::max({1.0, std::fabs(e_before), std::fabs(e_after)});
}

bool GuaranteesDescent(Dynamics dynamics, const EnergyConfig& config) {
  switch (dynamics) {
    case Dynamics::kAsync: return true;
    case Dynamics::kSync:
      return config.family == EnergyFamily::kLse ||
             config.family == EnergyFamily::kGaussian;
    default: return false;
  }
}

absl::Status ValidateRetrieveOptions(const RetrieveOptions& o, StateKind kind) {
  if (o.max_steps < 1 || o.max_steps > kMaxSteps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_steps must be in [1, ", kMaxSteps, "], got ", o.max_steps));
  }
  auto positive = [](double v, const char* name) -> absl::Status {
    if (!std::isfinite(v) || v <= 0.0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be finite and > 0, got ", v));
    }
    return absl::OkStatus();
  };
  for (auto [v, name] : {std::pair{o.tol, "tol"}, {o.alpha, "alpha"},
                         {o.dt, "dt"}, {o.tau_v, "tau_v"}, {o.tau_h, "tau_h"}}) {
    if (auto s = positive(v, name); !s.ok()) return s;
  }
  if (o.dynamics == Dynamics::kAsync && kind != StateKind::kBipolar) {
    return absl::FailedPreconditionError(
        "async dynamics flip +-1 neurons and need a bipolar bank; use sync, "
        "gradient or tinybrain on a continuous bank");
  }
  if (o.dynamics == Dynamics::kGradient && kind != StateKind::kContinuous) {
    return absl::FailedPreconditionError(
        "gradient dynamics move continuous states; use sync, async or "
        "tinybrain on a bipolar bank");
  }
  return absl::OkStatus();
}

absl::StatusOr<Trajectory> RunDynamics(const EnergyFunction& energy,
                                       StateKind kind,
                                       absl::Span<const float> query,
                                       absl::Span<const bool> clamp,
                                       const RetrieveOptions& options) {
  if (auto s = ValidateRetrieveOptions(options, kind); !s.ok()) return s;
  if (options.dynamics == Dynamics::kTinyBrain && energy.patterns().log_prior != nullptr) {
    return absl::FailedPreconditionError(
        "tinybrain dynamics do not weigh patterns by age; on a bank that decays retrieve with "
        "sync or gradient dynamics");
  }
  if (static_cast<int>(query.size()) != energy.dim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query has ", query.size(), " values; the bank's dimension is ",
        energy.dim()));
  }
  if (!clamp.empty() && static_cast<int>(clamp.size()) != energy.dim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "clamp mask has ", clamp.size(), " values; expected 0 or ",
        energy.dim()));
  }
  Trajectory t;
  switch (options.dynamics) {
    case Dynamics::kSync: RunSync(energy, kind, query, clamp, options, &t); break;
    case Dynamics::kAsync: RunAsync(energy, query, clamp, options, &t); break;
    case Dynamics::kGradient: RunGradient(energy, query, clamp, options, &t); break;
    case Dynamics::kTinyBrain:
      RunTinyBrain(energy, kind, query, clamp, options, &t);
      break;
  }
  return t;
}

namespace {

// TinyBrain's memory activation: identity (classical), [h]_+^(n-1)
// (polynomial), softmax(beta h) for the others.
bool SoftmaxMemory(const EnergyConfig& c) {
  return c.family != EnergyFamily::kClassical && c.family != EnergyFamily::kPolynomial;
}

// The visible layer's energy: |v|^2 / 2, or sum v tanh v - log cosh v for
// bipolar banks (tanh visible units).
double VisibleLayerEnergy(StateKind kind, const float* v, int n) {
  double e = 0.0;
  for (int i = 0; i < n; ++i) {
    const double a = v[i];
    if (kind != StateKind::kBipolar) {
      e += 0.5 * a * a;
      continue;
    }
    // A stable log cosh.
    const double logcosh = std::fabs(a) + std::log1p(std::exp(-2 * std::fabs(a))) - std::log(2.0);
    e += a * std::tanh(a) - logcosh;
  }
  return e;
}

}  // namespace

TinyBrainMemory::TinyBrainMemory(const EnergyFunction& energy, StateKind kind, double rh)
    : energy_(energy), kind_(kind), rh_(static_cast<float>(rh)) {}

StepPartial TinyBrainMemory::At(const float* v, double* step_max) {
  const PatternView& p = energy_.patterns();
  const EnergyConfig& c = energy_.config();
  const int n = p.dim;
  const int64_t k = p.rows;
  const bool softmax = SoftmaxMemory(c);
  StepPartial out;
  out.log_domain = softmax;
  out.rows = k;
  out.sum.assign(n, 0.f);
  if (!softmax) {
    out.scale = 1.0;
    out.log_scale = 0.0;
  }
  *step_max = 0.0;
  if (k == 0) return out;
  Eigen::Map<const RowMajorMatrix> xi(p.data, k, n);
  Eigen::VectorXf vh = Eigen::Map<const Eigen::VectorXf>(v, n);
  if (kind_ == StateKind::kBipolar) vh = vh.array().tanh();
  const Eigen::VectorXf xv = xi * vh;
  if (!started_) {
    h_.assign(xv.data(), xv.data() + k);  // memory starts at equilibrium with v
    started_ = true;
  } else {
    for (int64_t mu = 0; mu < k; ++mu) h_[mu] += dh_[mu];
  }
  Eigen::VectorXf hh(k);
  if (softmax) {
    double m = -INFINITY;
    for (int64_t mu = 0; mu < k; ++mu) m = std::max(m, c.beta * h_[mu]);
    out.log_scale = m;
    for (int64_t mu = 0; mu < k; ++mu) {
      const double e = std::exp(c.beta * h_[mu] - m);
      hh[mu] = static_cast<float>(e);
      out.wsum += e;
      out.hsum += e * (double{h_[mu]} - xv[mu]);
    }
  } else {
    double terms = 0.0;
    for (int64_t mu = 0; mu < k; ++mu) {
      const double h = h_[mu];
      double a = h, layer = 0.5 * h * h;
      if (c.family == EnergyFamily::kPolynomial) {
        const double r = std::max(0.0, h);
        a = std::pow(r, c.degree - 1);
        layer = (1.0 - 1.0 / c.degree) * std::pow(r, c.degree);
      }
      hh[mu] = static_cast<float>(a);
      terms += layer - double{hh[mu]} * xv[mu];
    }
    out.energy_terms = terms;
  }
  Eigen::Map<Eigen::VectorXf>(out.sum.data(), n).noalias() = xi.transpose() * hh;
  // The memory step from here, rh (Xi vh - h).
  dh_.resize(k);
  double top = 0.0;
  for (int64_t mu = 0; mu < k; ++mu) {
    dh_[mu] = rh_ * (xv[mu] - h_[mu]);
    top = std::max(top, static_cast<double>(std::fabs(dh_[mu])));
    if (!std::isfinite(h_[mu] + dh_[mu])) top = INFINITY;
  }
  *step_max = top;
  return out;
}

double FinishTinyBrain(const EnergyConfig& config, StateKind kind, const StepPartial& merged,
                       const float* v, float* pull) {
  const int n = static_cast<int>(merged.sum.size());
  double memory = merged.energy_terms;
  float f = 1.f;
  if (SoftmaxMemory(config)) {
    // sum w (h - xi.vh) - lse / beta, w = softmax(beta h).
    const double lse = merged.log_scale + std::log(merged.wsum);
    memory = merged.hsum / merged.wsum - lse / config.beta;
    f = static_cast<float>(1.0 / merged.wsum);
  }
  for (int i = 0; i < n; ++i) pull[i] = f * merged.sum[i];
  return VisibleLayerEnergy(kind, v, n) + memory;
}

absl::StatusOr<Trajectory> RunTinyBrainDynamics(int dim, StateKind kind,
                                                const EnergyConfig& config,
                                                absl::Span<const float> query,
                                                absl::Span<const bool> clamp,
                                                const RetrieveOptions& o,
                                                const TinyBrainOracle& oracle) {
  const int n = dim;
  Trajectory t;
  EnergyRecorder rec(&t, o.record_trace, GuaranteesDescent(Dynamics::kTinyBrain, config));
  std::vector<float> v(query.begin(), query.end()), pull(n), v_next(n), pull_next(n);
  StepPartial merged;
  double dh_max = 0.0, dh_next = 0.0;
  ENGRAM_RETURN_IF_ERROR(oracle(v.data(), true, &merged, &dh_max));
  rec.Start(FinishTinyBrain(config, kind, merged, v.data(), pull.data()));
  const float rv = static_cast<float>(o.dt / o.tau_v);
  while (true) {
    if (t.steps >= o.max_steps) { t.stop_reason = StopReason::kMaxSteps; break; }
    if (StopRequested(o)) { t.stop_reason = StopReason::kDeadline; break; }
    double dv_max = 0.0;
    for (int i = 0; i < n; ++i) {
      const float dv = Clamped(clamp, i) ? 0.f : rv * (pull[i] - v[i]);
      v_next[i] = v[i] + dv;
      dv_max = std::max(dv_max, static_cast<double>(std::fabs(dv)));
    }
    double e_next = NAN;
    if (AllFinite(v_next) && std::isfinite(dh_max)) {
      ENGRAM_RETURN_IF_ERROR(oracle(v_next.data(), false, &merged, &dh_next));
      e_next = FinishTinyBrain(config, kind, merged, v_next.data(), pull_next.data());
    }
    if (!std::isfinite(e_next) || !AllFinite(pull_next)) {
      t.stop_reason = StopReason::kDiverged;
      break;
    }
    v.swap(v_next);
    pull.swap(pull_next);
    ++t.steps;
    rec.Step(e_next);
    const double delta = std::max(dv_max, dh_max);
    dh_max = dh_next;
    if (delta < o.tol) { t.stop_reason = StopReason::kConverged; break; }
  }
  t.state.resize(n);
  for (int i = 0; i < n; ++i) {
    if (kind == StateKind::kBipolar) {
      t.state[i] = v[i] > 0 ? 1.f : (v[i] < 0 ? -1.f : query[i]);
    } else {
      t.state[i] = v[i];
    }
  }
  return t;
}

absl::StatusOr<Trajectory> RunAsyncDynamics(int dim, absl::Span<const float> query,
                                            absl::Span<const bool> clamp,
                                            const RetrieveOptions& o, FlipOracle& oracle) {
  Trajectory t;
  EnergyRecorder rec(&t, o.record_trace, true);
  std::vector<float> x(query.begin(), query.end());
  ENGRAM_ASSIGN_OR_RETURN(KeyedEnergy now, oracle.Evaluate(x.data(), -1));
  rec.Start(now.energy);
  std::vector<int> order;
  for (int i = 0; i < dim; ++i) {
    if (!Clamped(clamp, i)) order.push_back(i);
  }
  std::mt19937_64 rng(o.seed);
  while (true) {
    if (t.steps >= o.max_steps) { t.stop_reason = StopReason::kMaxSteps; break; }
    if (StopRequested(o)) { t.stop_reason = StopReason::kDeadline; break; }
    std::shuffle(order.begin(), order.end(), rng);
    int flips = 0;
    for (int i : order) {
      x[i] = -x[i];
      ENGRAM_ASSIGN_OR_RETURN(const KeyedEnergy flipped, oracle.Evaluate(x.data(), i));
      if (flipped.key < now.key) {
        oracle.Accept(i);
        now = flipped;
        ++flips;
      } else {
        x[i] = -x[i];
      }
    }
    ++t.steps;
    rec.Step(now.energy);
    if (flips == 0) { t.stop_reason = StopReason::kConverged; break; }
  }
  t.state = std::move(x);
  return t;
}

absl::StatusOr<Trajectory> RunGradientDynamics(int dim, const EnergyConfig& config,
                                               absl::Span<const float> query,
                                               absl::Span<const bool> clamp,
                                               const RetrieveOptions& options,
                                               const GradientOracle& value_and_gradient) {
  RetrieveOptions o = options;
  o.dynamics = Dynamics::kGradient;
  ENGRAM_RETURN_IF_ERROR(ValidateRetrieveOptions(o, StateKind::kContinuous));
  if (static_cast<int>(query.size()) != dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("query has ", query.size(), " values; the bank's dimension is ", dim));
  }
  if (!clamp.empty() && static_cast<int>(clamp.size()) != dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("clamp mask has ", clamp.size(), " values; expected 0 or ", dim));
  }
  Trajectory t;
  ENGRAM_RETURN_IF_ERROR(GradientSteps(dim, config, query, clamp, o, value_and_gradient, &t));
  return t;
}

std::optional<StopReason> SyncStopRule(int steps, const RetrieveOptions& o, bool finite,
                                       double delta) {
  if (steps >= o.max_steps) return StopReason::kMaxSteps;
  if (StopRequested(o)) return StopReason::kDeadline;
  if (!finite) return StopReason::kDiverged;
  if (delta < o.tol) return StopReason::kConverged;
  return std::nullopt;
}

// One query of a SyncBatch: its request, trajectory, state and recorder.
struct SyncBatch::Live {
  uint64_t tag = 0;
  BatchQuery q;
  Trajectory t;
  std::vector<float> x, target, next;
  double energy = 0.0;  // E(x)
  std::unique_ptr<EnergyRecorder> rec;
  // Set by the parallel part of Step, read by its decisions.
  bool finite = false;
  double delta = 0.0;
};

SyncBatch::SyncBatch(const EnergyFunction& energy, StateKind kind, OnFinished on_finished)
    : energy_(energy),
      kind_(kind),
      on_finished_(std::move(on_finished)),
      krotov_hopfield_(kind == StateKind::kBipolar &&
                       HasKrotovHopfieldDrive(energy.config(), energy.patterns())) {}

SyncBatch::SyncBatch(const EnergyFunction& energy, StateKind kind, OnFinished on_finished,
                     Evaluator evaluate)
    : SyncBatch(energy, kind, std::move(on_finished)) {
  evaluate_ = std::move(evaluate);
  // `energy` may have no rows of its own: the drive is decided by the config.
  krotov_hopfield_ = UsesBipolarDrive(energy.config(), kind);
}

SyncBatch::~SyncBatch() = default;

int64_t SyncBatch::size() const {
  return static_cast<int64_t>(running_.size() + joining_.size());
}

void SyncBatch::Admit(uint64_t tag, const BatchQuery& q) {
  const int n = energy_.dim();
  absl::Status s = ValidateRetrieveOptions(*q.options, kind_);
  if (s.ok() && q.options->dynamics != Dynamics::kSync) {
    s = absl::InvalidArgumentError("a SyncBatch runs the sync dynamics only");
  }
  if (s.ok() && static_cast<int>(q.query.size()) != n) {
    s = absl::InvalidArgumentError(absl::StrCat(
        "query has ", q.query.size(), " values; the bank's dimension is ", n));
  }
  if (s.ok() && !q.clamp.empty() && static_cast<int>(q.clamp.size()) != n) {
    s = absl::InvalidArgumentError(absl::StrCat(
        "clamp mask has ", q.clamp.size(), " values; expected 0 or ", n));
  }
  if (!s.ok()) {
    on_finished_(tag, s);
    return;
  }
  auto l = std::make_unique<Live>();
  l->tag = tag;
  l->q = q;
  l->x.assign(q.query.begin(), q.query.end());
  l->target.resize(n);
  l->next.resize(n);
  l->rec = std::make_unique<EnergyRecorder>(&l->t, q.options->record_trace,
                                            GuaranteesDescent(Dynamics::kSync, energy_.config()));
  joining_.push_back(std::move(l));
}

// As RunSync: energies, targets (unless `with_targets` is false: states at
// max_steps) and nearest rows of `states`, in one batched evaluation.
absl::Status SyncBatch::Evaluate(const std::vector<Live*>& states, bool with_targets) {
  const int n = energy_.dim();
  const int64_t b = static_cast<int64_t>(states.size());
  if (b == 0) return absl::OkStatus();
  xs_.resize(b * n);
  // The copies in and out of the batch run on every compute thread.
  int used = 1;
  internal::ParallelRows(b, int64_t{n} * 8, [&](int, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      std::copy(states[j]->x.begin(), states[j]->x.end(), xs_.begin() + j * n);
    }
  }, &used);
  energies_.resize(b);
  targets_.resize(b * n);
  nearest_.resize(b);  // hints: each state's previous nearest row
  for (int64_t j = 0; j < b; ++j) nearest_[j] = states[j]->t.nearest_row;
  if (evaluate_) {
    ENGRAM_RETURN_IF_ERROR(evaluate_(xs_.data(), b, with_targets ? targets_.data() : nullptr,
                                     energies_.data(), nearest_.data()));
  } else if (!with_targets) {
    energy_.UpdateTargetBatch(xs_.data(), b, nullptr, energies_.data(), nearest_.data());
  } else if (krotov_hopfield_) {
    BipolarDriveBatch(energy_, xs_.data(), b, targets_.data(), energies_.data(),
                      nearest_.data());
    // lse and gaussian energies on a bipolar bank take a pass of their own.
    if (std::isnan(energies_[0])) {
      energy_.UpdateTargetBatch(xs_.data(), b, nullptr, energies_.data(), nearest_.data());
    }
  } else {
    energy_.UpdateTargetBatch(xs_.data(), b, targets_.data(), energies_.data(), nearest_.data());
  }
  internal::ParallelRows(b, int64_t{n} * 8, [&](int, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      Live& l = *states[j];
      l.t.nearest_row = nearest_[j];
      l.energy = energies_[j];
      if (with_targets) {
        std::copy(targets_.begin() + j * n, targets_.begin() + (j + 1) * n, l.target.begin());
      }
    }
  }, &used);
  return absl::OkStatus();
}

void SyncBatch::Finish(std::unique_ptr<Live> l, StopReason reason) {
  l->t.stop_reason = reason;
  l->t.state = std::move(l->x);
  on_finished_(l->tag, std::move(l->t));
}

void SyncBatch::Step() {
  const int n = energy_.dim();
  // Every state's finite check and move (into its `next`), split over
  // states; the decisions below are taken in order on this thread.
  const int64_t b = static_cast<int64_t>(running_.size());
  int used = 1;
  internal::ParallelRows(b, int64_t{n} * 12, [&](int, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      Live& l = *running_[j];
      l.finite = false;
      l.delta = 0.0;
      if (l.t.steps >= l.q.options->max_steps) continue;
      l.finite = AllFinite(l.target);
      if (l.finite) {
        l.delta = SyncMove(kind_, l.q.query, l.q.clamp, l.x.data(), l.target.data(),
                           l.next.data());
      }
    }
  }, &used);
  std::vector<std::unique_ptr<Live>> stepped;
  stepped.reserve(running_.size());
  for (std::unique_ptr<Live>& l : running_) {
    if (std::optional<StopReason> stop =
            SyncStopRule(l->t.steps, *l->q.options, l->finite, l->delta)) {
      Finish(std::move(l), *stop);
      continue;
    }
    l->x.swap(l->next);
    ++l->t.steps;
    stepped.push_back(std::move(l));
  }
  // One batched evaluation of the states that moved and the queries that
  // joined; the first get a step recorded, the second their start. States
  // that reached max_steps need no target.
  std::vector<Live*> going, ending;
  for (const auto* group : {&stepped, &joining_}) {
    for (const auto& l : *group) {
      (l->t.steps < l->q.options->max_steps ? going : ending).push_back(l.get());
    }
  }
  absl::Status evaluated = Evaluate(going, true);
  if (evaluated.ok()) evaluated = Evaluate(ending, false);
  if (!evaluated.ok()) {
    // Every query of the batch was in one of the two evaluations.
    for (auto* group : {&stepped, &joining_}) {
      for (auto& l : *group) on_finished_(l->tag, evaluated);
      group->clear();
    }
    running_.clear();
    return;
  }
  for (auto& l : stepped) l->rec->Step(l->energy);
  for (auto& l : joining_) l->rec->Start(l->energy);
  running_ = std::move(stepped);
  for (auto& l : joining_) running_.push_back(std::move(l));
  joining_.clear();
  // Scratch sized for a batch that has since shrunk is given back.
  if (xs_.capacity() > 2 * running_.size() * n + n) {
    xs_ = {};
    targets_ = {};
  }
}

std::vector<absl::StatusOr<Trajectory>> RunSyncBatch(const EnergyFunction& energy,
                                                     StateKind kind,
                                                     absl::Span<const BatchQuery> queries) {
  std::vector<absl::StatusOr<Trajectory>> out(queries.size(), absl::UnknownError("not run"));
  SyncBatch batch(energy, kind, [&](uint64_t tag, absl::StatusOr<Trajectory> r) {
    out[tag] = std::move(r);
  });
  for (size_t q = 0; q < queries.size(); ++q) batch.Admit(q, queries[q]);
  while (!batch.empty()) batch.Step();
  return out;
}

}  // namespace engram::core
