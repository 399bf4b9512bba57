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
#include "engram/core/energy_config.h"
#include "engram/core/partials.h"
#include "engram/core/pattern_view.h"

namespace engram::core {
namespace internal {
struct FusedSums;
class RowWeights;
}  // namespace internal

// p = sparsemax(z) or 1.5-entmax(z) over k scores (exact sort-based
// thresholds: Martins and Astudillo 2016; Peters et al. 2019). Returns
// Psi(z) = p.z + H(p): (1 - |p|^2)/2 for sparsemax, (1 - sum p^1.5)/0.75 for
// 1.5-entmax. With `tau`, also the threshold (SparseThreshold in
// partials.h: for 1.5-entmax relative to max z / 2).
double Sparsemax(const double* z, int64_t k, double* p, double* tau = nullptr);
double Entmax15(const double* z, int64_t k, double* p, double* tau = nullptr);

// True for the general family's separations whose weights depend on every
// row at once (max, log-sum-ReLU, sparsemax, 1.5-entmax): their partials
// take the forms of their own described in partials.h.
bool HasWholeRowForm(const EnergyConfig& config);

// Numerically stable log(sum_i exp(v_i)); -inf for an empty span.
double LogSumExp(absl::Span<const double> v);

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
  // value readout. The max, log-sum-ReLU, sparsemax and 1.5-entmax
  // separations give their own forms (partials.h; sparsemax and 1.5-entmax
  // their candidates, for ThresholdPartial); with the L1 similarity the
  // partial also carries the gradient's sign_sum. Over a view with a row
  // prior (decay with age: softmax energies) the partial is formed in
  // double from the reference similarities and tracks no nearest row;
  // UNIMPLEMENTED for a prior under another energy.
  absl::StatusOr<StepPartial> Partial(const float* x, bool with_sum, bool track_nearest,
                                      int64_t row_offset = 0) const;
  // Partial(x_q, with_sum, false) for b states at once (x is b x dim,
  // row-major; `out` receives b partials): the batched pass of
  // UpdateTargetBatch, so equal to the one-state partials up to float
  // reassociation (the separations' own forms and L1: one state at a
  // time). The same UNIMPLEMENTED as Partial.
  absl::Status PartialBatch(const float* x, int64_t b, bool with_sum,
                            std::vector<StepPartial>* out) const;
  // A sparsemax or 1.5-entmax energy's second round over this bank's rows:
  // the weights at the whole bank's threshold `t` (ThresholdOf) as a kSums
  // partial (linear, scale 1: wsum = sum p, sum = sum p xi with `with_sum`),
  // and with `values` (rows x value_dim) the readout sum p v. The merge of
  // every part's, with psi = t.psi, finishes as the whole bank.
  // INVALID_ARGUMENT for another config.
  absl::StatusOr<StepPartial> ThresholdPartial(const float* x, const SparseThreshold& t,
                                               bool with_sum, const float* values = nullptr,
                                               int value_dim = 0) const;
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
  // Partial from the reference evaluation's similarities and `rule`'s
  // weights in double, no nearest row: over a view with a row prior (a
  // bank's decay with age; UNIMPLEMENTED for a linear-domain rule), and for
  // the L1 similarity (with its sign_sum, and its nearest row when
  // tracked).
  absl::StatusOr<StepPartial> ReferencePartial(const float* x, bool with_sum,
                                               const internal::RowWeights& rule,
                                               bool track_nearest, int64_t row_offset) const;
  // Tracks the nearest row by Bank::Nearest's key (-|x - xi|^2 / 2) into p,
  // from this config's similarities s at x where they give it.
  void TrackNearest(const float* x, const double* s, int64_t row_offset, StepPartial* p) const;
  // Partial for the separations whose weights depend on every row (max,
  // log-sum-ReLU; sparsemax and 1.5-entmax candidates).
  StepPartial WholeRowPartial(const float* x, bool with_sum, bool track_nearest,
                              int64_t row_offset) const;
  // This bank's similarities at x as the node's own evaluation computes
  // them for this config (the compact pass's fast kernels, or the
  // reference's), k doubles.
  void PassSimilarities(const float* x, double* s) const;

  EnergyConfig config_;
  PatternView patterns_;
};

}  // namespace engram::core

#endif  // ENGRAM_CORE_ENERGY_H_
