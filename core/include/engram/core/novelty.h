// Novelty of a state relative to a bank's own memories: where its energy
// falls in the distribution of the stored patterns' energies under the same
// energy function. Stored patterns sit at (or near) minima, so a state like
// them has a novelty near the middle of [0, 1], and a state far from every
// memory (out of distribution) a novelty near 1.
//
//   StoredEnergies ref = StoredPatternEnergies(energy, ids);  // sorted, once per bank version
//   double nov = Novelty(ref, energy.Value(x));            // in [0, 1]
//   double z = ref.ZScore(energy.Value(x));
#ifndef ENGRAM_CORE_NOVELTY_H_
#define ENGRAM_CORE_NOVELTY_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

#include "engram/core/energy.h"

namespace engram::core {

// Stored patterns whose energies form the reference (a sample of the bank
// when it holds more).
inline constexpr int64_t kNoveltySamples = 256;

struct StoredEnergies {
  std::vector<double> sorted;  // ascending
  double mean = 0.0;
  double stddev = 0.0;
  // (e - mean) / stddev; 0 when the stored energies agree to within
  // kEnergyTieTolerance.
  double ZScore(double e) const;
};

// The order in which the reference takes a bank's rows: a bijective mix of
// the pattern id (the splitmix64 finaliser), so the sample depends on the
// ids alone, not on the rows' order; a bank split into shards by id
// samples the same patterns as the whole.
uint64_t NoveltyKey(uint64_t id);

// The rows of the reference among rows with these ids: those of the
// min(K, kNoveltySamples) smallest NoveltyKey, in ascending key order.
std::vector<int64_t> NoveltyRows(absl::Span<const uint64_t> ids);

// The energies of the NoveltyRows of a bank whose rows have ids `ids`
// (energy.patterns().rows of them) under `energy`, each computed as
// Value(xi_mu).
StoredEnergies StoredPatternEnergies(const EnergyFunction& energy,
                                     absl::Span<const uint64_t> ids);

// The reference of these energies (any order).
StoredEnergies StoredEnergiesOf(std::vector<double> energies);

// Energies within this relative distance count as equal: the same state
// evaluated by different passes (a query, a stored row) agrees only to
// rounding.
inline constexpr double kEnergyTieTolerance = 1e-9;

// The fraction of the reference energies below e, counting equal ones (to
// kEnergyTieTolerance) half: the mid-rank percentile; 0.5 for an empty
// reference.
double Novelty(const StoredEnergies& ref, double e);

}  // namespace engram::core

#endif  // ENGRAM_CORE_NOVELTY_H_
