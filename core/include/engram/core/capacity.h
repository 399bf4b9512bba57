// Theoretical storage capacity of an energy at dimension N (SPEC section 5).
//
//   CapacityEstimate c = TheoreticalCapacity(cfg, StateKind::kBipolar, 784);
//   bool over = bank.size() > c.patterns;
//
// Thread-safety: pure functions.
#ifndef ENGRAM_CORE_CAPACITY_H_
#define ENGRAM_CORE_CAPACITY_H_

#include <string>

#include "engram/core/energy_config.h"

namespace engram::core {

struct CapacityEstimate {
  // Patterns retrievable with small error: classical 0.138 N (Amit,
  // Gutfreund, Sompolinsky); polynomial n N^(n-1) / (2 (2n-3)!! ln N)
  // (Krotov-Hopfield 2016); exponential / lse 2^(N/2) (Demircigil et al.);
  // +inf where the energy has no finite bound (gaussian, general).
  double patterns = 0.0;
  // Classical: N / (2 ln N), every pattern an exact fixed point
  // (McEliece et al.). Otherwise equal to `patterns`.
  double exact_patterns = 0.0;
  std::string formula;
};

CapacityEstimate TheoreticalCapacity(const EnergyConfig& config,
                                     StateKind kind, int dim);

// One-step bit-error probability of the classical network for random
// patterns at load K/N: 1/2 erfc( sqrt(N / 2K) ). Returns 0 for K = 0.
double ClassicalOneStepErrorProbability(int dim, double patterns);

// (2n-3)!! for n >= 2 (1 for n < 2).
double DoubleFactorial2nMinus3(int n);

}  // namespace engram::core

#endif  // ENGRAM_CORE_CAPACITY_H_
