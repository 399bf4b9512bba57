#include "engram/core/novelty.h"

#include <algorithm>
#include <cmath>

namespace engram::core {

StoredEnergies StoredPatternEnergies(const EnergyFunction& energy) {
  StoredEnergies ref;
  const PatternView& view = energy.patterns();
  const int64_t k = view.rows;
  if (k == 0) return ref;
  const int64_t stride = (k + kNoveltySamples - 1) / kNoveltySamples;
  for (int64_t mu = 0; mu < k; mu += stride) ref.sorted.push_back(energy.Value(view.row(mu)));
  std::sort(ref.sorted.begin(), ref.sorted.end());
  double sum = 0.0;
  for (double e : ref.sorted) sum += e;
  ref.mean = sum / ref.sorted.size();
  double var = 0.0;
  for (double e : ref.sorted) var += (e - ref.mean) * (e - ref.mean);
  ref.stddev = std::sqrt(var / ref.sorted.size());
  return ref;
}

namespace {
double Tie(double e) { return kEnergyTieTolerance * std::max(1.0, std::fabs(e)); }
}  // namespace

double StoredEnergies::ZScore(double e) const {
  if (!(stddev > Tie(mean))) return 0.0;
  return (e - mean) / stddev;
}

double Novelty(const StoredEnergies& ref, double e) {
  if (ref.sorted.empty()) return 0.5;
  const double tie = Tie(e);
  const auto lo = std::lower_bound(ref.sorted.begin(), ref.sorted.end(), e - tie);
  const auto hi = std::upper_bound(lo, ref.sorted.end(), e + tie);
  const double below = static_cast<double>(lo - ref.sorted.begin());
  const double equal = static_cast<double>(hi - lo);
  return (below + 0.5 * equal) / static_cast<double>(ref.sorted.size());
}

}  // namespace engram::core
