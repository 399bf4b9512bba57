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
// linear domain, one rounding per value in the log domain. Configs whose
// weights depend on every row at once (max, sparsemax, 1.5-entmax,
// log-sum-ReLU) or that have no fused pass (L1 similarity) have no partial
// form.
#ifndef ENGRAM_CORE_PARTIALS_H_
#define ENGRAM_CORE_PARTIALS_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram::core {

struct StepPartial {
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
  // Key -> value banks: the readout over these rows (ValueReadoutPartial in
  // readout.h: for the softmax families normalised over them, and
  // value_log_norm the log of that normaliser, by which the merge reweighs
  // the parts; for the others the plain sum). Empty when not formed.
  std::vector<float> value;
  double value_log_norm = 0.0;
};

// The merge of `parts`, given in row order (the first of equal nearest keys
// wins, as in one pass); an empty span gives an empty partial.
// INVALID_ARGUMENT unless the parts share their domain and every part of
// some rows has a `sum` (and a `value`) of one common length, or none has.
absl::StatusOr<StepPartial> MergeStepPartials(absl::Span<const StepPartial> parts);

}  // namespace engram::core

#endif  // ENGRAM_CORE_PARTIALS_H_
