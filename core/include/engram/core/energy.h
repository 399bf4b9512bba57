// Dense Associative Memory energies: value, gradient and the fixed-point
// update target, for every family of SPEC section 2.
//
// General form (slides, "General Dense Associative Memory"):
//   E(x) = -Q( sum_mu F( S(xi_mu, x) ) ) + R(x)
//
//   EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 8.0};
//   EnergyFunction energy(cfg, bank.view());
//   std::vector<float> grad(energy.dim());
//   double e = energy.ValueAndGradient(x.data(), grad.data());
//
// Numerics: similarities are computed in float (Eigen matrix-vector
// products over the contiguous pattern matrix), everything downstream of the
// similarities (separation, log-sum-exp, weights) in double with a running
// max, so beta * s >> 100 neither overflows nor loses the winner. The
// EXPONENTIAL family's value -sum exp(beta s) is returned as -exp(lse) in
// double and is -inf when beta * max s exceeds ~709; its update target and
// the ASYNC rule never form that number.
#ifndef ENGRAM_CORE_ENERGY_H_
#define ENGRAM_CORE_ENERGY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/core/partials.h"

namespace engram::core {
namespace internal {
struct FusedSums;
}  // namespace internal

enum class StateKind { kContinuous, kBipolar };

enum class EnergyFamily {
  kClassical,    // -1/2 sum (xi.x)^2
  kPolynomial,   // -sum F_n(xi.x), F_n = s^n or max(s,0)^n
  kExponential,  // -sum exp(beta xi.x)
  kLse,          // -1/beta log sum exp(beta xi.x) + |x|^2/2
  kGaussian,     // -1/beta log sum exp(-beta |x-xi|^2/2)
  kGeneral,      // Universal Hopfield Network: similarity x separation
};

enum class SimilarityKind { kDot, kNegHalfSqL2, kNegL1 };
// kSparsemax and kEntmax15 are the sparse members of the softmax family
// (Tsallis alpha = 2 and 1.5; Santos et al., sparse Hopfield networks): the
// energy is -Psi(beta S)/beta with Psi(z) = max_{p in simplex} p.z + H(p), H
// the Tsallis entropy, and the weights -dE/dS are sparsemax(beta S) or
// 1.5-entmax(beta S) themselves: exactly zero outside a support, so a
// pattern with enough margin is retrieved exactly.
//
// kLogSumRelu is the log-sum-ReLU (Epanechnikov) energy of Hoover et al.
// 2025: E = -(1/beta) log(eps + sum_mu [1 + beta S_mu]_+), eps =
// kLogSumReluEpsilon; with the -|x - xi|^2/2 similarity each memory is a
// kernel of compact support (radius sqrt(2 / beta)). Its sync step is the
// mean shift: x <- the mean of the patterns whose support holds x (a state
// inside no support stays where it is); exact retrieval without exponential
// separation, and extra minima where supports overlap.
enum class SeparationKind {
  kIdentity,
  kPolynomial,
  kSoftmax,
  kMax,
  kSparsemax,
  kEntmax15,
  kLogSumRelu
};

// eps of the log-sum-ReLU energy: its value outside every support is
// -(1/beta) log eps.
inline constexpr double kLogSumReluEpsilon = 1e-12;

// p = sparsemax(z) or 1.5-entmax(z) over k scores (exact sort-based
// thresholds: Martins and Astudillo 2016; Peters et al. 2019). Returns
// Psi(z) = p.z + H(p): (1 - |p|^2)/2 for sparsemax, (1 - sum p^1.5)/0.75 for
// 1.5-entmax.
double Sparsemax(const double* z, int64_t k, double* p);
double Entmax15(const double* z, int64_t k, double* p);

struct EnergyConfig {
  EnergyFamily family = EnergyFamily::kLse;
  int degree = 3;          // polynomial degree n
  bool rectified = false;  // polynomial: max(s,0)^n
  double beta = 1.0;       // inverse temperature
  SimilarityKind similarity = SimilarityKind::kDot;   // kGeneral only
  SeparationKind separation = SeparationKind::kSoftmax;  // kGeneral only
};

std::string EnergyFamilyName(EnergyFamily family);

// Returns OK when `config` is usable on a bank of `kind`; INVALID_ARGUMENT
// with a message naming the field otherwise.
absl::Status ValidateEnergyConfig(const EnergyConfig& config, StateKind kind);

// The similarity actually used by a config (kGeneral: its own; kGaussian:
// kNegHalfSqL2; the rest: kDot).
SimilarityKind EffectiveSimilarity(const EnergyConfig& config);

// Numerically stable log(sum_i exp(v_i)); -inf for an empty span.
double LogSumExp(absl::Span<const double> v);

// One row of an int8 screen: the row xi is stored as q (int8, |q_i| <= 127)
// with xi~ = scale q. For a state x stored the same way (x~ = t u), and
// D = sum_i q_i u_i (exact in int32 for dims up to kMaxScreenDim),
//   |f32 dot(xi, x) - scale t D| <= err |x| + norm |x - x~|,
// where err >= |xi - xi~| + (n/4 + 8) 2^-24 |xi| also covers the f32 dot
// kernels' accumulation error, and norm >= |xi~|.
struct ScreenRow {
  float scale = 0.f;
  float err = 0.f;
  float norm = 0.f;
};

// Largest dimension a bank screens (int8 dot products stay in int32).
inline constexpr int kMaxScreenDim = 1 << 17;

// Read-only view of a bank's patterns: `rows` x `dim` floats, row-major and
// contiguous; `sq_norms` holds |xi_mu|^2 per row. A bank stored at reduced
// precision also exposes the same rows as `bf16` (upper halves of the f32
// values, rounded) or `bits` (bipolar rows, ceil(dim/64) words each, bit set
// for +1); the fast paths read those instead of `data`. The view does not
// own memory and is valid while the bank is not modified.
struct PatternView {
  const float* data = nullptr;
  const float* sq_norms = nullptr;
  int64_t rows = 0;
  int dim = 0;
  const uint16_t* bf16 = nullptr;
  const uint64_t* bits = nullptr;
  // A screen of f32 rows (Precision::kF32Screened): each row as int8
  // (`dim` bytes a row, see ScreenRow), which bounds every row's f32 dot
  // product from a single int8 dot product; screen_sums[r] = sum_i q_i.
  const int8_t* screen = nullptr;
  const ScreenRow* screen_rows = nullptr;
  const int32_t* screen_sums = nullptr;
  const float* row(int64_t mu) const { return data + mu * dim; }
};

// Energy of one configuration over one pattern set.
// Thread-safety: const methods may be called concurrently (no shared
// scratch state).
class EnergyFunction {
 public:
  // `config` must have passed ValidateEnergyConfig.
  EnergyFunction(const EnergyConfig& config, PatternView patterns);

  int dim() const { return patterns_.dim; }
  const EnergyConfig& config() const { return config_; }
  const PatternView& patterns() const { return patterns_; }

  // Similarities s_mu = S(xi_mu, x) for every pattern; `s` has rows() slots.
  void Similarities(const float* x, double* s) const;

  // E(x) given the similarities of x and |x|^2. When `weights` is non-null
  // it receives w_mu = -dE/dS_mu (before any normalisation).
  double EnergyFromSimilarities(const double* s, double sq_norm_x,
                                double* weights) const;

  // E(x).
  double Value(const float* x) const;

  // E(x), and from the same pass the row of the stored pattern nearest to x
  // in L2 (argmax x.xi - |xi|^2/2, the row Bank::Nearest returns), or -1
  // when this energy's pass cannot give it exactly (bf16 rows, no fused
  // form, empty bank): then ask Bank::Nearest. On entry *nearest_row is a
  // hint (a row likely to weigh most, e.g. the previous state's nearest, or
  // -1) that lets the pass leave out negligible rows sooner; it does not
  // change the result.
  double ValueAndNearest(const float* x, int64_t* nearest_row) const;

  // E(x); writes grad E(x) (dim() floats) into `grad`.
  double ValueAndGradient(const float* x, float* grad) const;

  // The fixed-point ("sync", UHN) update target sum_mu w~_mu xi_mu, where
  // w~ are the separation weights, rescaled by a positive constant for the
  // sign-invariant bipolar families so they cannot overflow. Writes dim()
  // floats into `target`; returns E(x).
  double UpdateTarget(const float* x, float* target) const;
  // The same, also giving x's nearest row (and taking a hint) as
  // ValueAndNearest does.
  double UpdateTarget(const float* x, float* target, int64_t* nearest_row) const;

  // UpdateTarget for `b` states at once (x and targets are b x dim(),
  // row-major; energies has b slots): the scores and weighted sums of all
  // states are two matrix-matrix products per tile of patterns. With
  // targets == nullptr only the energies are computed. When `nearest_rows`
  // (b slots: hints on entry) is non-null it receives each state's nearest
  // row as ValueAndNearest does (-1 where not available).
  void UpdateTargetBatch(const float* x, int64_t b, float* targets, double* energies,
                         int64_t* nearest_rows = nullptr) const;

  // This bank's partial of one step at x (see partials.h): with `with_sum`
  // the weighted sum of its rows, with `track_nearest` its nearest row
  // (numbered from `row_offset`); ValueReadoutPartial (readout.h) adds the
  // value readout. UNIMPLEMENTED for configs with no partial form (max,
  // sparsemax, 1.5-entmax, log-sum-ReLU separations, L1 similarity).
  absl::StatusOr<StepPartial> Partial(const float* x, bool with_sum, bool track_nearest,
                                      int64_t row_offset = 0) const;
  // The energy at x from a (merged) partial of this config, and the update
  // target and the gradient (dim floats each, either or both may be null;
  // they need the partial's sum) as Value, UpdateTarget and
  // ValueAndGradient give them; a partial of no rows gives the empty
  // bank's answers. INVALID_ARGUMENT when a target or gradient is asked of a
  // partial without a sum of dim floats.
  absl::StatusOr<double> FinishPartial(const StepPartial& partial, const float* x, float* target,
                                       float* grad) const;

  // The plain reference implementations of Value, ValueAndGradient and
  // UpdateTarget (Eigen over the f32 patterns, two passes, one thread). The
  // methods above use the fused single-pass kernels where the energy has a
  // fused form and agree with these to float tolerance; tests compare them.
  double ReferenceValue(const float* x) const;
  double ReferenceValueAndGradient(const float* x, float* grad) const;
  double ReferenceUpdateTarget(const float* x, float* target) const;

 private:
  // Fused single-pass evaluation; false when the config has no fused form.
  bool FusedEvaluate(const float* x, float* target, float* grad, double* energy,
                     int64_t* nearest_row = nullptr) const;
  // The compact-support pass of the sparse and log-sum-ReLU separations
  // (core/src/compact.h); false when the config has none.
  bool CompactEvaluate(const float* x, float* target, float* grad, double* energy,
                       int64_t* nearest_row) const;
  // Energy, target or gradient from the sums of a fused pass whose
  // accumulator is already in `target` or `grad`.
  void FinishFused(const internal::FusedSums& sums, bool log_domain, const float* x,
                   float* target, float* grad, double* energy) const;

  EnergyConfig config_;
  PatternView patterns_;
};

}  // namespace engram::core

#endif  // ENGRAM_CORE_ENERGY_H_
