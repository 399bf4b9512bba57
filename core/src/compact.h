// A pass for the separations of compact support: sparsemax and 1.5-entmax
// (the sparse members of the softmax family) and the log-sum-ReLU. Each
// gives weight 0 to every row outside a support that a bound on the scores
// alone rules in or out, so after one read of the scores (the fast
// threaded kernels) only the rows that can be in the support are weighed,
// and only the support is read again for the weighted sum:
//
//   sparsemax   p_mu = [z_mu - tau]_+ with tau >= max z - 1   (z = beta s)
//   1.5-entmax  p_mu = [z_mu / 2 - tau]_+^2 with tau >= max z / 2 - 1
//   LSR         w_mu > 0 exactly when 1 + beta s_mu > 0
//
// so rows with z below max z - 1 (sparsemax), max z - 2 (entmax) or with
// 1 + beta s <= 0 (LSR) are left out. The thresholds and weights are those
// of Sparsemax / Entmax15 / the LSR rule over the candidate rows, which are
// the ones over all rows (a row outside the support changes neither the
// threshold nor any sum).
//
// Thread-safety: reentrant; the view must not change during the call.
#ifndef ENGRAM_CORE_SRC_COMPACT_H_
#define ENGRAM_CORE_SRC_COMPACT_H_

#include <cstdint>
#include <vector>

#include "engram/core/energy_config.h"
#include "engram/core/pattern_view.h"

namespace engram::core::internal {

struct CompactSums {
  double energy = 0.0;     // the energy (general family: no R(x) term)
  double wsum = 0.0;       // sum of the weights written into acc
  // The factor from acc's weights to those of the energy's gradient
  // (-dE/ds): 1 for the sparse separations, m / z for the log-sum-ReLU
  // (m rows in support, z = eps + sum of [1 + beta s]_+).
  double gradient_scale = 1.0;
  int64_t candidates = 0;  // rows the bound kept (weighed exactly)
  int64_t support = 0;     // rows of nonzero weight
  int64_t nearest_row = -1;  // as Bank::Nearest (first on ties); -1 with no rows
};

// The rows a compact pass weighs and their weights: `rows` (ascending) are
// the candidates the bound kept, `weights` theirs (0 outside the support);
// the sums as in CompactSums, nothing accumulated.
struct CompactSupport {
  std::vector<int64_t> rows;
  std::vector<double> weights;
  CompactSums sums;
};

// The least z = beta s a row may have and still be in a sparse
// separation's support when the largest over the rows is zmax (sparsemax:
// zmax - 1; 1.5-entmax: zmax - 2), less a margin for rows only rounding
// separates from the bound. Monotone in zmax, so over a subset of the rows
// it keeps a superset of the rows it keeps over all of them.
inline double SparseCandidateFloor(bool sparsemax, double zmax) {
  return zmax - (sparsemax ? 1.0 : 2.0) - 0x1p-40 * (1.0 + (zmax < 0 ? -zmax : zmax));
}

// True when `config` has a compact-support separation this pass evaluates
// (general family; sparsemax, 1.5-entmax or log-sum-ReLU; kDot or
// kNegHalfSqL2 similarity).
bool HasCompactPass(const EnergyConfig& config);

// Evaluates the energy at x and, when acc is non-null, acc = sum_mu w_mu xi_mu
// (view.dim floats) with the separation's weights w (for the log-sum-ReLU the
// mean-shift weights, normalised to sum to 1; none when its support is
// empty). False, changing nothing, when a score is not finite (the reference
// path then decides) or the bank is empty.
bool CompactPass(const PatternView& view, const EnergyConfig& config, const float* x, float* acc,
                 CompactSums* out);

// The first half of CompactPass: the support and weights at x, for sums over
// other rows than the patterns' (a value readout). False as CompactPass.
bool CompactWeights(const PatternView& view, const EnergyConfig& config, const float* x,
                    CompactSupport* out);

}  // namespace engram::core::internal

#endif  // ENGRAM_CORE_SRC_COMPACT_H_
