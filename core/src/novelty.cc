#include "engram/core/novelty.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace engram::core {

uint64_t NoveltyKey(uint64_t id) {
  id = (id ^ (id >> 30)) * 0xbf58476d1ce4e5b9ULL;
  id = (id ^ (id >> 27)) * 0x94d049bb133111ebULL;
  return id ^ (id >> 31);
}

std::vector<int64_t> NoveltyRows(absl::Span<const uint64_t> ids) {
  const int64_t k = static_cast<int64_t>(ids.size());
  std::vector<std::pair<uint64_t, int64_t>> keyed(k);
  for (int64_t r = 0; r < k; ++r) keyed[r] = {NoveltyKey(ids[r]), r};
  const int64_t take = std::min(k, kNoveltySamples);
  std::partial_sort(keyed.begin(), keyed.begin() + take, keyed.end());
  std::vector<int64_t> rows(take);
  for (int64_t i = 0; i < take; ++i) rows[i] = keyed[i].second;
  return rows;
}

StoredEnergies StoredPatternEnergies(const EnergyFunction& energy,
                                     absl::Span<const uint64_t> ids) {
  std::vector<double> energies;
  for (int64_t r : NoveltyRows(ids)) energies.push_back(energy.Value(energy.patterns().row(r)));
  return StoredEnergiesOf(std::move(energies));
}

StoredEnergies StoredEnergiesOf(std::vector<double> energies) {
  StoredEnergies ref;
  ref.sorted = std::move(energies);
  if (ref.sorted.empty()) return ref;
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
