// Diffusion-style sampling as memory retrieval (SPEC section 4; survey
// sections 3, 5.1 Eq. 17, 5.2).
//
// With the Gaussian energy at inverse temperature beta = 1/sigma^2 the ideal
// denoiser of the stored set is D(x; sigma) = sum_mu softmax_mu(-|x - xi_mu|^2
// / 2 sigma^2) xi_mu, and the score is (D - x) / sigma^2. For another energy
// of the bank the score is -beta grad E_beta(x) at beta = 1/sigma^2: Engram's
// energies carry the 1/beta prefactor (survey Eq. 17), so beta E_beta is the
// negative log-density up to a constant, and for the Gaussian energy the two
// definitions coincide.
//
//   SampleOptions o;
//   o.sampler = SamplerKind::kHeun;
//   o.schedule = {.kind = ScheduleKind::kKarras, .sigma_max = 10, .steps = 64};
//   o.seed = 7;
//   ENGRAM_ASSIGN_OR_RETURN(SampleBatch b, Sample(bank, bank.spec().energy, 16, {}, {}, o));
//   // b.samples[i].state, .nearest, .sample_class
//
// Thread-safety: reentrant; the bank must not change during the call.
#ifndef ENGRAM_CORE_SAMPLER_H_
#define ENGRAM_CORE_SAMPLER_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/core/bank.h"
#include "engram/core/energy.h"
#include "engram/core/schedule.h"

namespace engram::core {

enum class SamplerKind { kEuler, kHeun, kStochastic, kLangevin, kAnnealedAm };
enum class SampleClass { kMemorized, kSpurious, kNovel };

std::string SamplerName(SamplerKind kind);
std::string SampleClassName(SampleClass c);

struct SampleOptions {
  SamplerKind sampler = SamplerKind::kHeun;
  ScheduleConfig schedule;
  uint64_t seed = 0;
  // Start: pure noise x ~ N(0, sigma_max^2 I) when no query is given;
  // otherwise query + N(0, sigma_start^2 I) and the schedule starts at
  // sigma_start (0 means sigma_max).
  double sigma_start = 0.0;
  // stochastic: churn S_churn (Karras et al. 2022), applied for sigma in
  // [s_tmin, s_tmax]; s_noise scales the added noise.
  double churn = 10.0;
  double s_tmin = 0.0;
  double s_tmax = 1e30;
  double s_noise = 1.0;
  // langevin: steps per noise level and step size eta (step_i = eta sigma_i^2).
  int langevin_steps = 4;
  double langevin_eta = 0.1;
  // annealed_am: fixed-point iterations per noise level.
  int am_iterations = 1;
  // Classification thresholds on relative distances |a - b| / |b|.
  double delta_memorized = 0.05;
  double delta_spurious = 0.05;
  // A final state is a fixed point when one more AM update at the last
  // noise level moves it by less than this (relative).
  double fixed_point_tol = 1e-3;
  // Record the state every k steps (0: never).
  int trajectory_every = 0;
  // The bank's log weight prior at the call's time (Bank::LogPrior: decay
  // with age), one per row, or empty for none.
  absl::Span<const double> log_prior;
  // Polled between steps; true stops the call with a deadline.
  std::function<bool()> should_stop;
  // Called after each step with (step, sigma, states of every sample), for
  // streaming.
  std::function<void(int, double, const std::vector<std::vector<float>>&)> on_step;
};

struct SampleResult {
  std::vector<float> state;
  // Nearest stored memory. For energies even in x (classical, polynomial of
  // even degree without rectification) -xi is the same attractor as xi: the
  // sample is matched against +-xi and `mirrored` says it matched -xi
  // (distance and similarity are then those of -xi).
  NearestMemory nearest;
  bool mirrored = false;
  double relative_distance = 0.0;  // |x - (+-)xi_nearest| / |xi_nearest|
  SampleClass sample_class = SampleClass::kNovel;
  bool fixed_point = false;
  // Fixed point farther than delta_memorized from every memory: the
  // evidence of a spurious attractor when no two samples share one.
  bool spurious_fixed_point = false;
  double energy = 0.0;  // bank energy at beta = 1/sigma_last^2 (see .cc)
  std::vector<std::vector<float>> trajectory;
  std::vector<double> trajectory_sigmas;
};

struct SampleBatch {
  std::vector<SampleResult> samples;
  std::vector<double> sigmas;  // the schedule used
  int steps = 0;               // denoiser evaluations per sample
  bool deadline = false;
};

// OK or INVALID_ARGUMENT / FAILED_PRECONDITION (a sampler that needs
// continuous states on a bipolar bank).
absl::Status ValidateSampleOptions(const SampleOptions& o, StateKind kind);

// Draws `count` samples (count >= 1). `query` is empty (pure noise) or dim
// floats shared by all samples (or count * dim); `clamp` is empty, dim or
// count * dim flags held at the query's values at every step (inpainting).
// Bank must be non-empty. Reproducible bit for bit for a seed on one build.
absl::StatusOr<SampleBatch> Sample(const Bank& bank, const EnergyConfig& energy,
                                   int count, absl::Span<const float> query,
                                   absl::Span<const bool> clamp,
                                   const SampleOptions& options);

// Where Sample's evaluations come from when a bank's rows are elsewhere (a
// router over shards, server/router.h): `evaluate` gives the energies and
// the update targets or the gradients (exactly one of targets and grads is
// non-null; b x dim floats) of b states under `config` (the call's energy
// at a level's sigma), as EnergyFunction would over the whole bank;
// `nearest` gives each of b states' nearest stored memory (Bank::Nearest)
// and that memory's norm |xi|; on bipolar banks `key` gives a state's
// energy under the call's energy, or -lse(beta S) for the exponential
// family (a monotone key of it), which the Glauber sweeps and the descent
// to a fixed point compare. A failure ends the call with its status.
struct SampleEvaluator {
  std::function<absl::Status(const EnergyConfig& config, const float* x, int64_t b,
                             float* targets, float* grads, double* energies)>
      evaluate;
  std::function<absl::Status(const float* x, int64_t b, std::vector<NearestMemory>* nearest,
                             std::vector<double>* norms)>
      nearest;
  std::function<absl::StatusOr<double>(const float* x)> key;
};

// Sample over a bank described by `spec` holding `rows` rows, whose
// evaluations come from `evaluator`: the same samplers, draws and
// description as Sample, so the same samples for the same seed up to float
// reassociation (a bipolar bank's every flip evaluated remotely).
// UNIMPLEMENTED for a log_prior, and for a bipolar bank without `key`.
absl::StatusOr<SampleBatch> SampleWith(const SampleEvaluator& evaluator, const BankSpec& spec,
                                       int64_t rows, const EnergyConfig& energy, int count,
                                       absl::Span<const float> query,
                                       absl::Span<const bool> clamp, const SampleOptions& options);

// True when E(-x) = E(x) for every x (classical; polynomial of even degree,
// not rectified).
bool EvenEnergy(const EnergyConfig& energy);

// The ideal denoiser D(x; sigma) of the bank's patterns (dim floats out).
void IdealDenoiser(const PatternView& patterns, const float* x, double sigma,
                   float* out);

// Score -beta grad E_beta(x) at beta = 1/sigma^2 for `energy` (its beta is
// replaced). For the Gaussian energy this is (D(x; sigma) - x) / sigma^2.
void Score(const PatternView& patterns, const EnergyConfig& energy,
           const float* x, double sigma, float* out);

}  // namespace engram::core

#endif  // ENGRAM_CORE_SAMPLER_H_
