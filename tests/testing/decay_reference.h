// The energy and update target of a softmax energy whose rows weigh
// 2^(-age / half-life) (a bank's decay with age), computed in long double
// from the definitions: an independent reference for the decay tests.
#ifndef ENGRAM_TESTS_TESTING_DECAY_REFERENCE_H_
#define ENGRAM_TESTS_TESTING_DECAY_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "engram/core/energy_config.h"

namespace engram::testing {

// E, update target of a softmax energy whose rows weigh 2^(-age / h),
// computed here in long double from the definitions.
struct DecayReference {
  long double energy = 0;
  std::vector<long double> target;
};
inline DecayReference ReferenceDecay(const std::vector<float>& xi, int n,
                                     const std::vector<float>& x,
                                     const std::vector<double>& ages_in_half_lives,
                                     const core::EnergyConfig& c) {
  const int64_t k = static_cast<int64_t>(xi.size()) / n;
  const bool l2 = core::EffectiveSimilarity(c) == core::SimilarityKind::kNegHalfSqL2;
  std::vector<long double> a(k);
  long double top = -INFINITY;
  for (int64_t mu = 0; mu < k; ++mu) {
    long double dot = 0, sq = 0;
    for (int i = 0; i < n; ++i) {
      dot += static_cast<long double>(xi[mu * n + i]) * x[i];
      sq += (static_cast<long double>(xi[mu * n + i]) - x[i]) *
            (static_cast<long double>(xi[mu * n + i]) - x[i]);
    }
    const long double sim = l2 ? -0.5L * sq : dot;
    a[mu] = c.beta * sim - ages_in_half_lives[mu] * std::log(2.0L);
    top = std::max(top, a[mu]);
  }
  DecayReference r;
  r.target.assign(n, 0.0L);
  long double z = 0;
  for (int64_t mu = 0; mu < k; ++mu) {
    const long double w = std::exp(a[mu] - top);
    z += w;
    for (int i = 0; i < n; ++i) r.target[i] += w * xi[mu * n + i];
  }
  for (auto& t : r.target) t /= z;
  r.energy = -(top + std::log(z)) / c.beta;
  if (c.family == core::EnergyFamily::kLse) {
    for (float v : x) r.energy += 0.5L * v * v;
  }
  return r;
}


}  // namespace engram::testing

#endif  // ENGRAM_TESTS_TESTING_DECAY_REFERENCE_H_
