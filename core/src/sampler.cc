#include "engram/core/sampler.h"
#include "engram/core/limits.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <random>

#include <Eigen/Core>

#include "absl/strings/str_cat.h"
#include "engram/core/status_macros.h"

namespace engram::core {
namespace {

using VectorMap = Eigen::Map<Eigen::VectorXf>;
using ConstVectorMap = Eigen::Map<const Eigen::VectorXf>;

bool HasBeta(const EnergyConfig& c) {
  return c.family == EnergyFamily::kExponential || c.family == EnergyFamily::kLse ||
         c.family == EnergyFamily::kGaussian ||
         (c.family == EnergyFamily::kGeneral && (c.separation == SeparationKind::kSoftmax ||
                                                 c.separation == SeparationKind::kSparsemax ||
                                                 c.separation == SeparationKind::kEntmax15 ||
                                                 c.separation == SeparationKind::kLogSumRelu));
}

EnergyConfig AtSigma(EnergyConfig c, double sigma) {
  if (HasBeta(c)) c.beta = 1.0 / (sigma * sigma);
  return c;
}

// Gaussian and lse: x - grad E_beta(x) is the softmax-weighted sum of the
// patterns, the fixed-point update target.
bool DenoiserIsUpdateTarget(const EnergyConfig& c) {
  return c.family == EnergyFamily::kGaussian || c.family == EnergyFamily::kLse;
}

// Den(x; sigma) = x + sigma^2 score = x - grad E_beta(x), beta = 1/sigma^2.
// Returns E_beta(x).
double Denoise(const PatternView& p, const EnergyConfig& energy, const float* x,
               double sigma, float* out) {
  const EnergyConfig c = AtSigma(energy, sigma);
  EnergyFunction f(c, p);
  if (DenoiserIsUpdateTarget(c)) return f.UpdateTarget(x, out);
  const double e = f.ValueAndGradient(x, out);
  for (int i = 0; i < p.dim; ++i) out[i] = x[i] - out[i];
  return e;
}

// Denoise for `b` states at once (x and out are b x dim, row-major; energies
// has b slots). Gaussian and lse banks take one batched pass over the rows
// for all states (UpdateTargetBatch: equal to one pass per state up to float
// reassociation); the other families one pass per state.
void DenoiseBatch(const PatternView& p, const EnergyConfig& energy, const float* x, int64_t b,
                  double sigma, float* out, double* energies) {
  const EnergyConfig c = AtSigma(energy, sigma);
  if (DenoiserIsUpdateTarget(c)) {
    EnergyFunction(c, p).UpdateTargetBatch(x, b, out, energies);
    return;
  }
  for (int64_t q = 0; q < b; ++q) {
    energies[q] = Denoise(p, energy, x + q * p.dim, sigma, out + q * p.dim);
  }
}

double Norm(const float* x, int n) {
  return Eigen::Map<const Eigen::VectorXf>(x, n).cast<double>().norm();
}

double Distance(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) {
    const double d = double{a[i]} - b[i];
    s += d * d;
  }
  return std::sqrt(s);
}

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Single flips of a bipolar state and their change of the energy's key
// (E itself, or -log(-E) for the exponential family), as the async
// dynamics compare them.
class Flipper {
 public:
  virtual ~Flipper() = default;
  // Key change if neuron i of x flips.
  virtual double FlipDelta(const std::vector<float>& x, int i) = 0;
  // Flips neuron i of x (the last FlipDelta's).
  virtual void AcceptFlip(std::vector<float>& x, int i) = 0;
};

// Exact energy differences of single flips on a bipolar bank (as in the
// async dynamics): keeps overlaps d_mu = xi_mu . sigma in double.
class BipolarFlipper : public Flipper {
 public:
  BipolarFlipper(const PatternView& p, const EnergyConfig& c, const std::vector<float>& x)
      : p_(p), c_(c), energy_(c, p), d_(p.rows), d_flip_(p.rows), s_(p.rows) {
    for (int64_t mu = 0; mu < p.rows; ++mu) {
      double acc = 0;
      for (int i = 0; i < p.dim; ++i) acc += double{p.row(mu)[i]} * x[i];
      d_[mu] = acc;
    }
    key_ = Key(d_);
  }
  // Key of the energy (E itself, or -log(-E) for the exponential family).
  double Key(const std::vector<double>& d) {
    const int n = p_.dim;
    const SimilarityKind sim = EffectiveSimilarity(c_);
    for (int64_t mu = 0; mu < p_.rows; ++mu) {
      switch (sim) {
        case SimilarityKind::kDot: s_[mu] = d[mu]; break;
        case SimilarityKind::kNegHalfSqL2: s_[mu] = d[mu] - 0.5 * p_.sq_norms[mu] - 0.5 * n; break;
        case SimilarityKind::kNegL1: s_[mu] = -(n - d[mu]); break;
      }
    }
    if (c_.family == EnergyFamily::kExponential) {
      for (auto& v : s_) v *= c_.beta;
      return -LogSumExp(s_);
    }
    return energy_.EnergyFromSimilarities(s_.data(), n, nullptr);
  }
  // Key change if neuron i flips (computes the flipped overlaps).
  double FlipDelta(const std::vector<float>& x, int i) override {
    const double two = 2.0 * x[i];
    for (int64_t mu = 0; mu < p_.rows; ++mu) d_flip_[mu] = d_[mu] - two * p_.row(mu)[i];
    key_flip_ = Key(d_flip_);
    return key_flip_ - key_;
  }
  void AcceptFlip(std::vector<float>& x, int i) override {
    x[i] = -x[i];
    d_.swap(d_flip_);
    key_ = key_flip_;
  }

 private:
  PatternView p_;
  EnergyConfig c_;
  EnergyFunction energy_;
  std::vector<double> d_, d_flip_, s_;
  double key_ = 0, key_flip_ = 0;
};

// Flips whose keys come from a SampleEvaluator (a bank's shards): each
// evaluation is the whole state's key. After a failure (kept in *error)
// no flip is taken (the change is +inf).
class RemoteFlipper : public Flipper {
 public:
  RemoteFlipper(const SampleEvaluator& remote, const std::vector<float>& x, absl::Status* error)
      : remote_(remote), error_(error) {
    key_ = Key(x);
  }
  double FlipDelta(const std::vector<float>& x, int i) override {
    std::vector<float> flipped = x;
    flipped[i] = -flipped[i];
    key_flip_ = Key(flipped);
    return key_flip_ - key_;
  }
  void AcceptFlip(std::vector<float>& x, int i) override {
    x[i] = -x[i];
    key_ = key_flip_;
  }

 private:
  double Key(const std::vector<float>& x) {
    if (!error_->ok()) return INFINITY;
    absl::StatusOr<double> k = remote_.key(x.data());
    if (!k.ok()) {
      *error_ = k.status();
      return INFINITY;
    }
    return *k;
  }

  const SampleEvaluator& remote_;
  absl::Status* error_;
  double key_ = 0, key_flip_ = 0;
};

}  // namespace

std::string SamplerName(SamplerKind kind) {
  switch (kind) {
    case SamplerKind::kEuler: return "euler";
    case SamplerKind::kHeun: return "heun";
    case SamplerKind::kStochastic: return "stochastic";
    case SamplerKind::kLangevin: return "langevin";
    case SamplerKind::kAnnealedAm: return "annealed_am";
  }
  return "unknown";
}

std::string SampleClassName(SampleClass c) {
  switch (c) {
    case SampleClass::kMemorized: return "memorized";
    case SampleClass::kSpurious: return "spurious";
    case SampleClass::kNovel: return "novel";
  }
  return "unknown";
}

bool EvenEnergy(const EnergyConfig& c) {
  return c.family == EnergyFamily::kClassical ||
         (c.family == EnergyFamily::kPolynomial && !c.rectified && c.degree % 2 == 0);
}

void IdealDenoiser(const PatternView& patterns, const float* x, double sigma, float* out) {
  EnergyConfig c{.family = EnergyFamily::kGaussian, .beta = 1.0 / (sigma * sigma)};
  EnergyFunction(c, patterns).UpdateTarget(x, out);
}

void Score(const PatternView& patterns, const EnergyConfig& energy, const float* x,
           double sigma, float* out) {
  Denoise(patterns, energy, x, sigma, out);
  const double inv = 1.0 / (sigma * sigma);
  for (int i = 0; i < patterns.dim; ++i) {
    out[i] = static_cast<float>((double{out[i]} - x[i]) * inv);
  }
}

absl::Status ValidateSampleOptions(const SampleOptions& o, StateKind kind) {
  auto nonneg = [](double v, const char* name) -> absl::Status {
    if (!std::isfinite(v) || v < 0) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be finite and >= 0, got ", v));
    }
    return absl::OkStatus();
  };
  for (auto [v, name] :
       {std::pair{o.sigma_start, "sigma_start"}, {o.churn, "churn"}, {o.s_tmin, "s_tmin"},
        {o.s_noise, "s_noise"}, {o.langevin_eta, "langevin_eta"},
        {o.delta_memorized, "delta_memorized"}, {o.delta_spurious, "delta_spurious"},
        {o.fixed_point_tol, "fixed_point_tol"}}) {
    if (auto s = nonneg(v, name); !s.ok()) return s;
  }
  if (std::isnan(o.s_tmax) || o.s_tmax < 0) {
    return absl::InvalidArgumentError("s_tmax must be >= 0");
  }
  if (o.langevin_steps < 1 || o.langevin_steps > kMaxLangevinSteps) {
    return absl::InvalidArgumentError(
        absl::StrCat("langevin_steps must be in [1, ", kMaxLangevinSteps, "]"));
  }
  if (o.am_iterations < 1 || o.am_iterations > kMaxAmIterations) {
    return absl::InvalidArgumentError(
        absl::StrCat("am_iterations must be in [1, ", kMaxAmIterations, "]"));
  }
  if (o.trajectory_every < 0) {
    return absl::InvalidArgumentError("trajectory_every must be >= 0");
  }
  if (kind == StateKind::kBipolar && o.sampler != SamplerKind::kAnnealedAm) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sampler ", SamplerName(o.sampler),
        " integrates continuous states; bipolar banks sample with annealed_am"));
  }
  return MakeSchedule(o.schedule).status();
}

namespace {

// The shape and values of a Sample call's query and clamp mask.
absl::Status ValidateSampleInputs(const BankSpec& spec, int64_t rows, int count,
                                  absl::Span<const float> query, absl::Span<const bool> clamp) {
  const int n = spec.dim;
  if (count < 1) return absl::InvalidArgumentError("count must be >= 1");
  if (rows == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "bank '", spec.name, "' is empty; store patterns first"));
  }
  const size_t qn = query.size();
  if (qn != 0 && qn != static_cast<size_t>(n) && qn != static_cast<size_t>(count) * n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query has ", qn, " values; expected 0, ", n, " or ", int64_t{count} * n));
  }
  const size_t cn = clamp.size();
  if (cn != 0 && cn != static_cast<size_t>(n) && cn != static_cast<size_t>(count) * n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "clamp has ", cn, " values; expected 0, ", n, " or ", int64_t{count} * n));
  }
  if (cn != 0 && qn == 0) {
    return absl::InvalidArgumentError("a clamp mask needs a query holding the known values");
  }
  for (float v : query) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError("query is not finite");
    if (spec.kind == StateKind::kBipolar && v != 1.f && v != -1.f) {
      return absl::InvalidArgumentError("bank is bipolar but the query is not +-1");
    }
  }
  return absl::OkStatus();
}

PatternView ViewWithPrior(const Bank& bank, absl::Span<const double> log_prior) {
  PatternView v = bank.view();
  if (!log_prior.empty()) v.log_prior = log_prior.data();
  return v;
}

// One Sample call's states and what every sampler's step needs. Samples
// draw noise one after another in index order and share one normal
// distribution, so a call's draws depend only on the seed. The ODE samplers
// (euler, heun) step all samples of a level together, one batched pass over
// the bank per denoiser evaluation.
class SampleRun {
 public:
  SampleRun(const Bank& bank, const EnergyConfig& energy, int count,
            absl::Span<const float> query, absl::Span<const bool> clamp, const SampleOptions& o)
      : p(ViewWithPrior(bank, o.log_prior)), energy(energy), o(o), n(bank.dim()),
        kind(bank.spec().kind),
        count(count), query_(query), clamp_(clamp), den(n) {}
  // A run whose evaluations come from `remote` (continuous states).
  SampleRun(const SampleEvaluator* remote, int dim, StateKind kind, const EnergyConfig& energy,
            int count, absl::Span<const float> query, absl::Span<const bool> clamp,
            const SampleOptions& o)
      : p(PatternView{.dim = dim}), energy(energy), o(o), n(dim), kind(kind), count(count),
        remote(remote), query_(query), clamp_(clamp), den(n) {}

  // Flips of bipolar state x over this run's bank, or from `remote`.
  std::unique_ptr<Flipper> Flips(const std::vector<float>& x) {
    if (remote != nullptr) return std::make_unique<RemoteFlipper>(*remote, x, &error);
    return std::make_unique<BipolarFlipper>(p, energy, x);
  }

  // The sample's known values (its query row), or null.
  const float* Query(int b) const {
    const size_t qn = query_.size();
    return qn == 0 ? nullptr : query_.data() + (qn == static_cast<size_t>(n) ? 0 : int64_t{b} * n);
  }
  // The sample's clamp mask, or null.
  const bool* Clamp(int b) const {
    const size_t cn = clamp_.size();
    return cn == 0 ? nullptr : clamp_.data() + (cn == static_cast<size_t>(n) ? 0 : int64_t{b} * n);
  }
  void ApplyClamp(int b, float* x) const {
    const bool* c = Clamp(b);
    if (c == nullptr) return;
    const float* q = Query(b);
    for (int i = 0; i < n; ++i) {
      if (c[i]) x[i] = q[i];
    }
  }

  // Noise (or the query plus noise, or random +-1 on a bipolar bank) at the
  // schedule's first sigma, and one generator per sample.
  void InitialStates(double sigma0) {
    xs.assign(count, std::vector<float>(n));
    for (int b = 0; b < count; ++b) {
      rngs.emplace_back(SplitMix(o.seed * 0x100000001b3ULL + static_cast<uint64_t>(b)));
      auto& rng = rngs.back();
      const float* q = Query(b);
      for (int i = 0; i < n; ++i) {
        if (kind == StateKind::kBipolar) {
          xs[b][i] = q != nullptr ? q[i] : ((rng() & 1) ? 1.f : -1.f);
        } else {
          xs[b][i] = (q != nullptr ? q[i] : 0.f) + static_cast<float>(sigma0) * gauss(rng);
        }
      }
      ApplyClamp(b, xs[b].data());
    }
  }

  // One step of the probability-flow ODE dx/dsigma = (x - D)/sigma from
  // s_from to s_to for sample b (x: its state): Euler, plus Heun's
  // correction unless s_to is 0.
  void OdeStep(int b, float* x, double s_from, double s_to, bool heun) {
    Ode(b, 1, x, s_from, s_to, heun);
  }
  // The same step for every sample at once.
  void OdeLevel(double s_from, double s_to, bool heun) {
    Gather(flat_);
    Ode(0, count, flat_.data(), s_from, s_to, heun);
    Scatter(flat_);
  }
  // Every sample's state replaced by Den(x; sigma), clamped: one batched pass.
  void DenoiseLevel(double sigma) {
    Gather(flat_);
    dens_.resize(flat_.size());
    energies_.resize(count);
    DenoiseStates(flat_.data(), count, sigma, dens_.data(), energies_.data());
    Scatter(dens_);
    for (int b = 0; b < count; ++b) ApplyClamp(b, xs[b].data());
  }

  // DenoiseBatch over this run's bank, or from `remote`. After a remote
  // failure (kept in `error`, which the caller checks after each level)
  // the states are left as they are.
  void DenoiseStates(const float* x, int64_t b, double sigma, float* out, double* energies) {
    if (remote == nullptr) return DenoiseBatch(p, energy, x, b, sigma, out, energies);
    const int64_t total = b * n;
    const EnergyConfig c = AtSigma(energy, sigma);
    if (!std::isfinite(c.beta) || !std::all_of(x, x + total, [](float v) { return std::isfinite(v); })) {
      // What a node's pass gives past float range: the overflow check after
      // the levels reports it, as for a node.
      std::fill(out, out + total, NAN);
      std::fill(energies, energies + b, NAN);
      return;
    }
    if (error.ok()) {
      if (DenoiserIsUpdateTarget(c)) {
        error = remote->evaluate(c, x, b, out, nullptr, energies);
      } else {
        error = remote->evaluate(c, x, b, nullptr, out, energies);
        if (error.ok()) {
          for (int64_t k = 0; k < total; ++k) out[k] = x[k] - out[k];
        }
      }
    }
    if (!error.ok()) {
      std::copy(x, x + total, out);
      std::fill(energies, energies + b, 0.0);
    }
  }
  // Den(x; sigma) of one state into `den`; returns E_beta(x).
  double DenoiseOne(const float* x, double sigma) {
    double e = 0.0;
    DenoiseStates(x, 1, sigma, den.data(), &e);
    return e;
  }

  const PatternView p;
  const EnergyConfig& energy;
  const SampleOptions& o;
  const int n;
  const StateKind kind;
  const int count;
  const SampleEvaluator* const remote = nullptr;
  absl::Status error;
  std::vector<std::vector<float>> xs;
  std::vector<std::mt19937_64> rngs;
  std::normal_distribution<float> gauss{0.f, 1.f};

 private:
  absl::Span<const float> query_;
  absl::Span<const bool> clamp_;
  // All states, consecutive (count x n), into `flat`, and back.
  void Gather(std::vector<float>& flat) const {
    const size_t per = static_cast<size_t>(n);
    flat.resize(per * count);
    for (int b = 0; b < count; ++b) std::copy(xs[b].begin(), xs[b].end(), flat.begin() + b * per);
  }
  void Scatter(const std::vector<float>& flat) {
    const size_t per = static_cast<size_t>(n);
    for (int b = 0; b < count; ++b) {
      std::copy(flat.begin() + b * per, flat.begin() + (b + 1) * per, xs[b].begin());
    }
  }
  // The ODE step for samples [first, first + states), whose states are
  // consecutive in x.
  void Ode(int first, int states, float* x, double s_from, double s_to, bool heun) {
    const size_t total = static_cast<size_t>(n) * states;
    dens_.resize(total);
    slopes_.resize(total);
    next_.resize(total);
    energies_.resize(states);
    DenoiseStates(x, states, s_from, dens_.data(), energies_.data());
    const float h = static_cast<float>(s_to - s_from);
    for (size_t k = 0; k < total; ++k) {
      slopes_[k] = static_cast<float>((x[k] - double{dens_[k]}) / s_from);
      next_[k] = x[k] + h * slopes_[k];
    }
    if (heun && s_to > 0) {
      for (int q = 0; q < states; ++q) ApplyClamp(first + q, next_.data() + size_t{1} * q * n);
      DenoiseStates(next_.data(), states, s_to, dens_.data(), energies_.data());
      for (size_t k = 0; k < total; ++k) {
        const float slope2 = static_cast<float>((next_[k] - double{dens_[k]}) / s_to);
        next_[k] = x[k] + h * 0.5f * (slopes_[k] + slope2);
      }
    }
    std::copy(next_.begin(), next_.end(), x);
  }

  std::vector<float> flat_, dens_, slopes_, next_;
  std::vector<double> energies_;

 public:
  std::vector<float> den;  // the last denoiser output
};

// One level of a sampler: from s_cur towards s_next (levels: the
// schedule's transitions; 0 when it has a single sigma).
struct Level {
  double s_cur, s_next;
  int levels;
};
using StepFn = void (*)(SampleRun& run, int b, const Level& at);
using LevelFn = void (*)(SampleRun& run, const Level& at);

void EulerLevel(SampleRun& run, const Level& at) {
  if (at.levels > 0) run.OdeLevel(at.s_cur, at.s_next, /*heun=*/false);
}

void HeunLevel(SampleRun& run, const Level& at) {
  if (at.levels > 0) run.OdeLevel(at.s_cur, at.s_next, /*heun=*/true);
}

// Karras et al.'s stochastic sampler: raise sigma by churn (noise added),
// then a Heun step down.
void StochasticStep(SampleRun& run, int b, const Level& at) {
  if (at.levels == 0) return;
  const SampleOptions& o = run.o;
  float* x = run.xs[b].data();
  const double gamma = (at.s_cur >= o.s_tmin && at.s_cur <= o.s_tmax)
                           ? std::min(o.churn / std::max(at.levels, 1), std::sqrt(2.0) - 1)
                           : 0.0;
  const double s_hat = at.s_cur * (1 + gamma);
  const float add = static_cast<float>(std::sqrt(s_hat * s_hat - at.s_cur * at.s_cur) * o.s_noise);
  for (int k = 0; k < run.n; ++k) x[k] += add * run.gauss(run.rngs[b]);
  run.ApplyClamp(b, x);
  run.OdeStep(b, x, s_hat, at.s_next, true);
}

// Annealed Langevin at sigma_i: x += (eps/2) score + sqrt(eps) z,
// eps = eta sigma_i^2, i.e. x += eta/2 (Den - x) + sqrt(eta) sigma_i z. The
// last transition to sigma = 0 is one denoising step.
void LangevinStep(SampleRun& run, int b, const Level& at) {
  float* x = run.xs[b].data();
  if (at.s_next == 0.0 || at.levels == 0) {
    run.DenoiseOne(x, at.s_cur);
    std::copy(run.den.begin(), run.den.end(), x);
    return;
  }
  const float half = static_cast<float>(0.5 * run.o.langevin_eta);
  const float noise = static_cast<float>(std::sqrt(run.o.langevin_eta) * at.s_cur);
  for (int l = 0; l < run.o.langevin_steps; ++l) {
    run.DenoiseOne(x, at.s_cur);
    for (int k = 0; k < run.n; ++k) {
      x[k] += half * (run.den[k] - x[k]) + noise * run.gauss(run.rngs[b]);
    }
    run.ApplyClamp(b, x);
  }
}

// Annealed associative memory at sigma_i on a bipolar bank: am_iterations
// sweeps of Glauber dynamics at beta_i = 1/sigma_i^2 on the exact energy
// differences (a neuron flips with probability 1 / (1 + exp(beta dE))), in
// a random order per sweep.
void GlauberStep(SampleRun& run, int b, const Level& at) {
  float* x = run.xs[b].data();
  const int n = run.n;
  std::vector<float> xv(x, x + n);
  std::unique_ptr<Flipper> flips = run.Flips(xv);
  Flipper& flipper = *flips;
  const double beta = 1.0 / (at.s_cur * at.s_cur);
  std::vector<int> order;
  const bool* c = run.Clamp(b);
  for (int k = 0; k < n; ++k) {
    if (c == nullptr || !c[k]) order.push_back(k);
  }
  std::uniform_real_distribution<double> u(0.0, 1.0);
  auto& rng = run.rngs[b];
  for (int it = 0; it < run.o.am_iterations; ++it) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int k : order) {
      const double a = beta * flipper.FlipDelta(xv, k);
      const double prob = a > 700 ? 0.0 : 1.0 / (1.0 + std::exp(a));
      if (u(rng) < prob) flipper.AcceptFlip(xv, k);
    }
  }
  std::copy(xv.begin(), xv.end(), x);
}

// The samplers that draw noise within a level step one sample after
// another, so that the draws keep their order.
template <StepFn step>
void EachSample(SampleRun& run, const Level& at) {
  for (int b = 0; b < run.count; ++b) step(run, b, at);
}

// Annealed associative memory at sigma_i: continuous states take
// am_iterations denoising (retrieval) steps, bipolar states Glauber sweeps.
void AnnealedAmLevel(SampleRun& run, const Level& at) {
  if (run.kind == StateKind::kBipolar) return EachSample<GlauberStep>(run, at);
  for (int it = 0; it < run.o.am_iterations; ++it) run.DenoiseLevel(at.s_cur);
}

// The level of each sampler, indexed by SamplerKind.
constexpr LevelFn kLevels[] = {EulerLevel, HeunLevel, EachSample<StochasticStep>,
                               EachSample<LangevinStep>, AnnealedAmLevel};
static_assert(static_cast<int>(SamplerKind::kEuler) == 0 &&
              static_cast<int>(SamplerKind::kHeun) == 1 &&
              static_cast<int>(SamplerKind::kStochastic) == 2 &&
              static_cast<int>(SamplerKind::kLangevin) == 3 &&
              static_cast<int>(SamplerKind::kAnnealedAm) == 4);

// Bipolar annealing ends at zero temperature: every sample descends (exact
// single flips that lower the energy) to a fixed point.
void DescendToFixedPoints(SampleRun& run) {
  for (int b = 0; b < run.count; ++b) {
    std::vector<float>& xv = run.xs[b];
    std::unique_ptr<Flipper> flips = run.Flips(xv);
  Flipper& flipper = *flips;
    const bool* c = run.Clamp(b);
    for (int sweep = 0; sweep < 1000; ++sweep) {
      int flips = 0;
      for (int k = 0; k < run.n; ++k) {
        if (c != nullptr && c[k]) continue;
        if (flipper.FlipDelta(xv, k) < 0) {
          flipper.AcceptFlip(xv, k);
          ++flips;
        }
      }
      if (flips == 0) break;
    }
  }
}

// Each sample's nearest memory (or its mirror image for an even energy),
// relative distance, energy at the last positive sigma and whether it is a
// fixed point there.
// The bank is `bank`, or (null) the run's remote evaluator's.
absl::Status DescribeSamples(const Bank* bank, SampleRun& run, double sigma_last,
                             SampleBatch* batch) {
  const int n = run.n;
  const size_t per = static_cast<size_t>(n);
  // Energies (and, for continuous states, one more denoising step) at the
  // last positive sigma, all samples in one batched pass.
  std::vector<double> energies(run.count);
  std::vector<float> states, dens;
  if (run.kind == StateKind::kContinuous) {
    states.resize(per * run.count);
    dens.resize(states.size());
    for (int b = 0; b < run.count; ++b) {
      std::copy(run.xs[b].begin(), run.xs[b].end(), states.begin() + b * per);
    }
    run.DenoiseStates(states.data(), run.count, sigma_last, dens.data(), energies.data());
    ENGRAM_RETURN_IF_ERROR(run.error);
  } else if (bank == nullptr) {
    states.resize(per * run.count);
    dens.resize(states.size());  // the update targets: not used
    for (int b = 0; b < run.count; ++b) {
      std::copy(run.xs[b].begin(), run.xs[b].end(), states.begin() + b * per);
    }
    ENGRAM_RETURN_IF_ERROR(run.remote->evaluate(AtSigma(run.energy, sigma_last), states.data(),
                                                run.count, dens.data(), nullptr,
                                                energies.data()));
  } else {
    EnergyFunction final_energy(AtSigma(run.energy, sigma_last), run.p);
    for (int b = 0; b < run.count; ++b) energies[b] = final_energy.Value(run.xs[b].data());
  }
  // Each sample's nearest memory and its norm (and for an even energy its
  // mirror image's).
  const bool even = EvenEnergy(run.energy);
  std::vector<NearestMemory> nearest(run.count), mirrored;
  std::vector<double> norms(run.count), mirrored_norms;
  std::vector<float> xs(per * run.count);
  for (int b = 0; b < run.count; ++b) {
    std::copy(run.xs[b].begin(), run.xs[b].end(), xs.begin() + b * per);
  }
  auto find = [&](const std::vector<float>& x, std::vector<NearestMemory>* out,
                  std::vector<double>* out_norms) -> absl::Status {
    if (bank == nullptr) return run.remote->nearest(x.data(), run.count, out, out_norms);
    out->resize(run.count);
    out_norms->resize(run.count);
    for (int b = 0; b < run.count; ++b) {
      (*out)[b] = bank->Nearest(x.data() + b * per);
      (*out_norms)[b] = Norm(bank->pattern((*out)[b].row), n);
    }
    return absl::OkStatus();
  };
  ENGRAM_RETURN_IF_ERROR(find(xs, &nearest, &norms));
  if (even) {
    for (float& v : xs) v = -v;
    ENGRAM_RETURN_IF_ERROR(find(xs, &mirrored, &mirrored_norms));
  }
  for (int b = 0; b < run.count; ++b) {
    SampleResult& r = batch->samples[b];
    r.state = run.xs[b];
    r.nearest = nearest[b];
    double mem_norm = norms[b];
    if (even && mirrored[b].distance < r.nearest.distance) {
      r.nearest = mirrored[b];
      r.nearest.similarity = -mirrored[b].similarity;
      r.mirrored = true;
      mem_norm = mirrored_norms[b];
    }
    r.relative_distance = mem_norm > 0 ? r.nearest.distance / mem_norm : r.nearest.distance;
    r.energy = energies[b];
    const bool* c = run.Clamp(b);
    if (run.kind == StateKind::kBipolar) {
      std::vector<float> xv = r.state;
      std::unique_ptr<Flipper> flips = run.Flips(xv);
  Flipper& flipper = *flips;
      bool stable = true;
      for (int k = 0; k < n && stable; ++k) {
        if (c != nullptr && c[k]) continue;
        if (flipper.FlipDelta(xv, k) < 0) stable = false;
      }
      r.fixed_point = stable;
    } else {
      const float* den = dens.data() + b * per;
      double moved = 0;
      for (int k = 0; k < n; ++k) {
        if (c != nullptr && c[k]) continue;
        const double dd = double{den[k]} - r.state[k];
        moved += dd * dd;
      }
      r.fixed_point =
          std::sqrt(moved) <= run.o.fixed_point_tol * std::max(Norm(r.state.data(), n), 1e-12);
    }
  }
  return absl::OkStatus();
}

// Memorized: within delta_memorized (relative) of a stored pattern;
// spurious: otherwise, but within delta_spurious of another sample of the
// batch (an attractor the batch keeps finding); novel: neither.
void ClassifySamples(const std::vector<std::vector<float>>& xs, const SampleOptions& o,
                     std::vector<SampleResult>* samples) {
  const int count = static_cast<int>(xs.size());
  for (int b = 0; b < count; ++b) {
    SampleResult& r = (*samples)[b];
    if (r.relative_distance <= o.delta_memorized) {
      r.sample_class = SampleClass::kMemorized;
      continue;
    }
    r.spurious_fixed_point = r.fixed_point;
    bool shared = false;
    for (int j = 0; j < count && !shared; ++j) {
      if (j == b) continue;
      const int n = static_cast<int>(xs[j].size());
      const double dn = Norm(xs[j].data(), n);
      const double dist = Distance(xs[b].data(), xs[j].data(), n);
      shared = dist <= o.delta_spurious * std::max(dn, 1e-12);
    }
    r.sample_class = shared ? SampleClass::kSpurious : SampleClass::kNovel;
  }
}

}  // namespace

namespace {

// Sample over `bank`, or (bank null) over the rows behind `remote`.
absl::StatusOr<SampleBatch> SampleImpl(const Bank* bank, const SampleEvaluator* remote,
                                       const BankSpec& spec, int64_t rows,
                                       const EnergyConfig& energy, int count,
                                       absl::Span<const float> query,
                                       absl::Span<const bool> clamp, const SampleOptions& o) {
  const StateKind kind = spec.kind;
  if (auto s = ValidateSampleOptions(o, kind); !s.ok()) return s;
  if (auto s = ValidateEnergyConfig(energy, kind); !s.ok()) return s;
  if (auto s = ValidateSampleInputs(spec, rows, count, query, clamp); !s.ok()) return s;
  if (!o.log_prior.empty()) {
    if (o.log_prior.size() != static_cast<size_t>(rows)) {
      return absl::InvalidArgumentError(absl::StrCat("log_prior has ", o.log_prior.size(),
                                                     " entries for ", rows, " rows"));
    }
    for (double b : o.log_prior) {
      if (!(b <= 0.0) || !std::isfinite(b)) {
        return absl::InvalidArgumentError("log_prior entries must be finite and <= 0");
      }
    }
    // Only softmax energies on continuous states weigh rows by a prior.
    if (auto s = ValidateDecay(1, energy, kind); !s.ok()) return s;
  }
  ScheduleConfig sched = o.schedule;
  if (!query.empty() && o.sigma_start > 0) {
    sched.sigma_max = o.sigma_start;
    sched.sigma_min = std::min(sched.sigma_min, o.sigma_start);
  }
  auto sigmas_or = MakeSchedule(sched);
  if (!sigmas_or.ok()) return sigmas_or.status();
  SampleBatch batch;
  batch.sigmas = *std::move(sigmas_or);
  const std::vector<double>& sig = batch.sigmas;
  batch.samples.resize(count);

  std::unique_ptr<SampleRun> run_holder =
      bank != nullptr
          ? std::make_unique<SampleRun>(*bank, energy, count, query, clamp, o)
          : std::make_unique<SampleRun>(remote, spec.dim, kind, energy, count, query, clamp, o);
  SampleRun& run = *run_holder;
  run.InitialStates(sig[0]);
  auto record = [&](int step, double sigma, bool force) {
    if (o.trajectory_every <= 0) return;
    if (!force && step % o.trajectory_every != 0) return;
    for (int b = 0; b < count; ++b) {
      batch.samples[b].trajectory.push_back(run.xs[b]);
      batch.samples[b].trajectory_sigmas.push_back(sigma);
    }
  };
  record(0, sig[0], true);

  const LevelFn level_fn = kLevels[static_cast<int>(o.sampler)];
  const int levels = static_cast<int>(sig.size()) - 1;  // transitions i -> i+1
  const int positive_levels = sig.back() == 0.0 ? levels : levels + 1;
  const double sigma_last = sig[positive_levels - 1];
  int step = 0;
  double sigma_of_step = sig[0];  // the sigma recorded for the last step taken
  for (int i = 0; i < std::max(levels, 1); ++i) {
    if (o.should_stop && o.should_stop()) {
      batch.deadline = true;
      break;
    }
    const Level at{sig[i], levels == 0 ? sig[i] : sig[i + 1], levels};
    level_fn(run, at);
    ENGRAM_RETURN_IF_ERROR(run.error);
    for (int b = 0; b < count; ++b) run.ApplyClamp(b, run.xs[b].data());
    ++step;
    sigma_of_step = o.sampler == SamplerKind::kAnnealedAm ? at.s_cur : at.s_next;
    record(step, sigma_of_step, false);
    if (o.on_step) o.on_step(step, sigma_of_step, run.xs);
  }
  if (kind == StateKind::kBipolar && !batch.deadline) DescendToFixedPoints(run);
  batch.steps = step;
  if (step > 0 && step % std::max(o.trajectory_every, 1) != 0) {
    record(step, sigma_of_step, true);
  }

  // A schedule ending at a tiny sigma (1/sigma^2 beyond float range) can
  // overflow the denoiser; say so rather than describe a non-finite state.
  for (int b = 0; b < count; ++b) {
    for (float v : run.xs[b]) {
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "sampling overflowed to a non-finite state (sample ", b, " after ", step,
            " steps, sigma_min ", sig[std::min<size_t>(step, sig.size() - 1)],
            "); raise sigma_min or lower beta"));
      }
    }
  }
  // A remote run that stopped at its deadline is not described: its caller
  // answers DEADLINE_EXCEEDED, and describing takes more remote steps.
  if (remote != nullptr && batch.deadline) return batch;
  ENGRAM_RETURN_IF_ERROR(DescribeSamples(bank, run, sigma_last, &batch));
  ClassifySamples(run.xs, o, &batch.samples);
  return batch;
}

}  // namespace

absl::StatusOr<SampleBatch> Sample(const Bank& bank, const EnergyConfig& energy, int count,
                                   absl::Span<const float> query,
                                   absl::Span<const bool> clamp, const SampleOptions& o) {
  return SampleImpl(&bank, nullptr, bank.spec(), bank.size(), energy, count, query, clamp, o);
}

absl::StatusOr<SampleBatch> SampleWith(const SampleEvaluator& evaluator, const BankSpec& spec,
                                       int64_t rows, const EnergyConfig& energy, int count,
                                       absl::Span<const float> query,
                                       absl::Span<const bool> clamp, const SampleOptions& o) {
  if (spec.kind == StateKind::kBipolar && !evaluator.key) {
    return absl::UnimplementedError(
        "sampling a bipolar bank needs each state's energy key from the evaluator");
  }
  if (!o.log_prior.empty()) {
    return absl::UnimplementedError("a bank that decays with age has no partial form yet");
  }
  return SampleImpl(nullptr, &evaluator, spec, rows, energy, count, query, clamp, o);
}

}  // namespace engram::core
