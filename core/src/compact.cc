#include "compact.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "engram/core/energy.h"
#include "fused.h"
#include "kernels/kernels.h"
#include "state_loops.h"

namespace engram::core::internal {

bool HasCompactPass(const EnergyConfig& config) {
  if (config.family != EnergyFamily::kGeneral) return false;
  if (config.separation != SeparationKind::kSparsemax &&
      config.separation != SeparationKind::kEntmax15 &&
      config.separation != SeparationKind::kLogSumRelu) {
    return false;
  }
  return config.similarity == SimilarityKind::kDot ||
         config.similarity == SimilarityKind::kNegHalfSqL2;
}

bool CompactWeights(const PatternView& view, const EnergyConfig& config, const float* x,
                    CompactSupport* support_out) {
  const int64_t rows = view.rows;
  const int n = view.dim;
  if (rows == 0 || !HasCompactPass(config)) return false;
  const double beta = config.beta;
  std::vector<double> s(rows);
  FastSimilarities(view, config.similarity, x, s.data());

  // The largest z = beta s, and the nearest row by Bank::Nearest's key
  // (x.xi - |xi|^2 / 2 - |x|^2 / 2, which is s itself for kNegHalfSqL2).
  const bool l2 = config.similarity == SimilarityKind::kNegHalfSqL2;
  const double sqx = l2 ? 0.0 : SquaredNorm(x, n);
  double zmax = -INFINITY, best_key = -INFINITY;
  int64_t nearest = -1;
  for (int64_t r = 0; r < rows; ++r) {
    if (!std::isfinite(s[r])) return false;
    zmax = std::max(zmax, beta * s[r]);
    const double key = l2 ? s[r] : s[r] - 0.5 * view.sq_norms[r] - 0.5 * sqx;
    if (key > best_key) {
      best_key = key;
      nearest = r;
    }
  }
  if (!std::isfinite(zmax)) return false;

  // Candidates, in row order: every row the bound cannot rule out, and
  // (margin) any whose z only rounding separates from the bound: a row
  // outside the support changes neither the threshold nor a weight.
  std::vector<int64_t>& cand = support_out->rows;
  cand.clear();
  std::vector<double> z;
  const SeparationKind sep = config.separation;
  const double floor = SparseCandidateFloor(sep == SeparationKind::kSparsemax, zmax);
  for (int64_t r = 0; r < rows; ++r) {
    const double zr = beta * s[r];
    const bool keep = sep == SeparationKind::kLogSumRelu ? 1.0 + zr > 0.0 : zr >= floor;
    if (!keep) continue;
    cand.push_back(r);
    z.push_back(zr);
  }
  const int64_t m = static_cast<int64_t>(cand.size());
  std::vector<double>& w = support_out->weights;
  w.assign(m, 0.0);
  CompactSums* out = &support_out->sums;
  *out = CompactSums{};
  double energy = 0.0, wsum = 0.0;
  if (sep == SeparationKind::kLogSumRelu) {
    // As EnergyFromSimilarities: z = eps + sum_mu [1 + beta s_mu]_+, the
    // mean-shift weights 1 / z normalised to sum to one.
    double sum = 0.0;
    for (int64_t j = 0; j < m; ++j) sum += 1.0 + z[j];
    const double zsum = kLogSumReluEpsilon + sum;
    energy = -std::log(zsum) / beta;
    for (int64_t j = 0; j < m; ++j) w[j] = 1.0 / static_cast<double>(m);
    wsum = m > 0 ? 1.0 : 0.0;
    out->gradient_scale = static_cast<double>(m) / zsum;
  } else {
    const double psi = sep == SeparationKind::kSparsemax ? Sparsemax(z.data(), m, w.data())
                                                         : Entmax15(z.data(), m, w.data());
    energy = -psi / beta;
    for (int64_t j = 0; j < m; ++j) wsum += w[j];
  }

  int64_t support = 0;
  for (int64_t j = 0; j < m; ++j) support += w[j] != 0.0;
  out->energy = energy;
  out->wsum = wsum;
  out->candidates = m;
  out->support = support;
  out->nearest_row = nearest;
  return true;
}

bool CompactPass(const PatternView& view, const EnergyConfig& config, const float* x, float* acc,
                 CompactSums* out) {
  CompactSupport support;
  if (!CompactWeights(view, config, x, &support)) return false;
  if (acc != nullptr) {
    const int n = view.dim;
    std::fill(acc, acc + n, 0.f);
    const kernels::KernelTable& k = kernels::Kernels();
    for (size_t j = 0; j < support.rows.size(); ++j) {
      if (support.weights[j] == 0.0) continue;
      const float wf = static_cast<float>(support.weights[j]);
      k.axpy_rows(view.data + support.rows[j] * n, 1, n, &wf, acc);
    }
  }
  *out = support.sums;
  return true;
}

}  // namespace engram::core::internal
