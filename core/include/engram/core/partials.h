// The partial statistics of one step over some of a bank's rows, and their
// exact merge: the same type and merge with which a pass combines its
// threads' ranges, so a bank split into shards (each a subset of the rows)
// answers as the whole bank does, up to float reassociation.
//
//   // Shard s holds rows [first_s, first_s + K_s) of the bank, as a Bank.
//   StepPartial a = *EnergyFunction(cfg, shard0.view()).Partial(x, true, true, 0);
//   StepPartial b = *EnergyFunction(cfg, shard1.view()).Partial(x, true, true, k0);
//   StepPartial all = *MergeStepPartials({a, b});         // in row order
//   double e = EnergyFunction(cfg, any_view).FinishPartial(all, x, target, nullptr);
//
// What a partial holds: the sums of the separation weights w_mu relative to
// a common scale (the running max of the log-weights for the softmax
// families, a power of two for the others), the weighted sum of the rows at
// that scale, the energy terms of the linear families, and the nearest row.
// Merging rescales every partial to the largest scale: exactly in the
// linear domain, one rounding per value in the log domain.
//
// The separations whose weights depend on every row at once (general
// family) have forms of their own:
//   - max: the largest similarity of the part (`top`) and that row as the
//     sum; the merge keeps the part with the largest (the first on ties);
//   - log-sum-ReLU: plain sums over the rows in support (their count, the
//     sum of 1 + beta s, the sum of the rows), which add;
//   - sparsemax and 1.5-entmax: two rounds. A part's first partial holds
//     its candidates (z = beta s of the rows its bound cannot rule out);
//     merged, ThresholdOf gives the whole bank's threshold, which no part
//     can know alone, and EnergyFunction::ThresholdPartial the weighted sums
//     at it, which add.
//
//   StepPartial c = *MergeStepPartials({fa.Partial(x, false, false), fb.Partial(...)});
//   SparseThreshold t = *ThresholdOf(c);
//   StepPartial all = *MergeStepPartials({*fa.ThresholdPartial(x, t, true), ...});
//   all.psi = t.psi;
//   double e = f.FinishPartial(all, x, target, nullptr);
//
// The L1 similarity's gradient is not a weighted sum of the rows but of
// their signs relative to x: its partials carry that sum too (sign_sum).
#ifndef ENGRAM_CORE_PARTIALS_H_
#define ENGRAM_CORE_PARTIALS_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram::core {

// What a StepPartial holds (see above).
enum class PartialForm {
  kSums,       // scaled sums (the fused passes; a sparse separation's second round)
  kTop,        // max separation: the best row
  kLogSumRelu, // log-sum-ReLU: sums over the support
  kSparsemax,  // first round: candidates
  kEntmax15,   // first round: candidates
};

struct StepPartial {
  PartialForm form = PartialForm::kSums;
  bool log_domain = true;        // softmax families: log-sum-exp sums
  double log_scale = -INFINITY;  // log of the common scale
  double scale = 0.0;            // linear domain: the scale (a power of two)
  double wsum = 0.0;             // sum of w / scale
  double hsum = 0.0;             // sum of the rule's second quantity / scale
  double energy_terms = 0.0;     // linear families: sum of the energy terms
  int64_t rows = 0;              // rows the partial covers
  int64_t nearest_row = -1;      // in the caller's row numbering; -1: not tracked
  double nearest_key = -INFINITY;  // x.xi - |xi|^2 / 2 - |x|^2 / 2 of that row
  double sq_x = NAN;             // |x|^2 when the pass computed it
  std::vector<float> sum;        // sum_mu (w_mu / scale) xi_mu; empty when not formed
  // L1 similarity: sum_mu (w_mu / scale) sign(xi_mu - x), the gradient's
  // sum (dS/dx = sign(xi - x)); formed with `sum`, empty otherwise.
  std::vector<float> sign_sum;
  // Key -> value banks: the readout over these rows (ValueReadoutPartial in
  // readout.h: for the softmax families normalised over them, and
  // value_log_norm the log of that normaliser, by which the merge reweighs
  // the parts; for the others the plain sum). Empty when not formed.
  std::vector<float> value;
  double value_log_norm = 0.0;
  // kTop: the largest similarity of these rows (-inf with none); kSparsemax
  // and kEntmax15: the largest z = beta s.
  double top = -INFINITY;
  // kSparsemax / kEntmax15: the z = beta s of the rows the bound keeps
  // (z >= max z - 1, resp. - 2, over these rows), in row order.
  std::vector<double> candidates;
  // A sparse separation's second round, merged: Psi(z) over the whole bank
  // (SparseThreshold::psi, set by the caller); the energy is -psi / beta.
  double psi = NAN;
};

// The threshold of a sparse separation over a whole bank, from the merge of
// its parts' candidates: the weights are p = [z - tau]_+ (sparsemax) or
// p = [z / 2 - shift - tau]_+^2 (1.5-entmax), exactly as Sparsemax and
// Entmax15 give them over all rows.
struct SparseThreshold {
  double tau = 0.0;
  double shift = 0.0;  // 1.5-entmax: max z / 2
  double psi = 0.0;    // Psi(z): the energy is -psi / beta
};

// INVALID_ARGUMENT unless `merged` is a kSparsemax or kEntmax15 partial.
absl::StatusOr<SparseThreshold> ThresholdOf(const StepPartial& merged);

// The merge of `parts`, given in row order (the first of equal nearest keys
// wins, as in one pass); an empty span gives an empty partial.
// INVALID_ARGUMENT unless the parts of some rows share their form, the parts
// share their domain and every part of
// some rows has a `sum` (and a `value`) of one common length, or none has.
absl::StatusOr<StepPartial> MergeStepPartials(absl::Span<const StepPartial> parts);

}  // namespace engram::core

#endif  // ENGRAM_CORE_PARTIALS_H_
