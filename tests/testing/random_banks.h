// Seeded random pattern sets for tests.
#ifndef ENGRAM_TESTS_TESTING_RANDOM_BANKS_H_
#define ENGRAM_TESTS_TESTING_RANDOM_BANKS_H_

#include <random>
#include <vector>

#include "engram/core/bank.h"

namespace engram::testing {

inline std::vector<float> RandomBipolar(int64_t count, std::mt19937_64& rng) {
  std::vector<float> v(count);
  std::bernoulli_distribution coin(0.5);
  for (auto& x : v) x = coin(rng) ? 1.f : -1.f;
  return v;
}

inline std::vector<float> RandomGaussian(int64_t count, std::mt19937_64& rng,
                                         float scale = 1.f) {
  std::vector<float> v(count);
  std::normal_distribution<float> g(0.f, scale);
  for (auto& x : v) x = g(rng);
  return v;
}

// A bank filled with `k` patterns of `data` (k * dim floats).
inline core::Bank MakeBank(int dim, core::StateKind kind,
                           const std::vector<float>& data,
                           core::EnergyConfig energy = {}) {
  core::BankSpec spec{"test", dim, kind, energy, core::Precision::kF32};
  core::Bank bank(spec);
  const int64_t k = static_cast<int64_t>(data.size()) / dim;
  bank.Append(data, bank.AssignIds(k), {});
  return bank;
}

// Flips `flips` distinct coordinates of a bipolar vector.
inline std::vector<float> FlipBits(const float* x, int dim, int flips,
                                   std::mt19937_64& rng) {
  std::vector<float> out(x, x + dim);
  std::vector<int> idx(dim);
  for (int i = 0; i < dim; ++i) idx[i] = i;
  std::shuffle(idx.begin(), idx.end(), rng);
  for (int j = 0; j < flips; ++j) out[idx[j]] = -out[idx[j]];
  return out;
}

}  // namespace engram::testing

#endif  // ENGRAM_TESTS_TESTING_RANDOM_BANKS_H_
