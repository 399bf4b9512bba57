// What selects an energy (SPEC section 2): the state kind, the family, and
// for the general family its similarity and separation; checked against a
// bank's state kind. The energies themselves are in energy.h.
//
//   EnergyConfig cfg{.family = EnergyFamily::kGaussian, .beta = 4.0};
//   ENGRAM_RETURN_IF_ERROR(ValidateEnergyConfig(cfg, StateKind::kContinuous));
//
// Thread-safety: plain values and pure functions.
#ifndef ENGRAM_CORE_ENERGY_CONFIG_H_
#define ENGRAM_CORE_ENERGY_CONFIG_H_

#include <string>

#include "absl/status/status.h"

namespace engram::core {

enum class StateKind { kContinuous, kBipolar };

enum class EnergyFamily {
  kClassical,    // -1/2 sum (xi.x)^2
  kPolynomial,   // -sum F_n(xi.x), F_n = s^n or max(s,0)^n
  kExponential,  // -sum exp(beta xi.x)
  kLse,          // -1/beta log sum exp(beta xi.x) + |x|^2/2
  kGaussian,     // -1/beta log sum exp(-beta |x-xi|^2/2)
  kGeneral,      // Universal Hopfield Network: similarity x separation
};

enum class SimilarityKind { kDot, kNegHalfSqL2, kNegL1 };
// kSparsemax and kEntmax15 are the sparse members of the softmax family
// (Tsallis alpha = 2 and 1.5; Santos et al., sparse Hopfield networks): the
// energy is -Psi(beta S)/beta with Psi(z) = max_{p in simplex} p.z + H(p), H
// the Tsallis entropy, and the weights -dE/dS are sparsemax(beta S) or
// 1.5-entmax(beta S) themselves: exactly zero outside a support, so a
// pattern with enough margin is retrieved exactly.
//
// kLogSumRelu is the log-sum-ReLU (Epanechnikov) energy of Hoover et al.
// 2025: E = -(1/beta) log(eps + sum_mu [1 + beta S_mu]_+), eps =
// kLogSumReluEpsilon; with the -|x - xi|^2/2 similarity each memory is a
// kernel of compact support (radius sqrt(2 / beta)). Its sync step is the
// mean shift: x <- the mean of the patterns whose support holds x (a state
// inside no support stays where it is); exact retrieval without exponential
// separation, and extra minima where supports overlap.
enum class SeparationKind {
  kIdentity,
  kPolynomial,
  kSoftmax,
  kMax,
  kSparsemax,
  kEntmax15,
  kLogSumRelu
};

// eps of the log-sum-ReLU energy: its value outside every support is
// -(1/beta) log eps.
inline constexpr double kLogSumReluEpsilon = 1e-12;

struct EnergyConfig {
  EnergyFamily family = EnergyFamily::kLse;
  int degree = 3;          // polynomial degree n
  bool rectified = false;  // polynomial: max(s,0)^n
  double beta = 1.0;       // inverse temperature
  SimilarityKind similarity = SimilarityKind::kDot;   // kGeneral only
  SeparationKind separation = SeparationKind::kSoftmax;  // kGeneral only
};

std::string EnergyFamilyName(EnergyFamily family);

// Returns OK when `config` is usable on a bank of `kind`; INVALID_ARGUMENT
// with a message naming the field otherwise.
absl::Status ValidateEnergyConfig(const EnergyConfig& config, StateKind kind);

// The similarity actually used by a config (kGeneral: its own; kGaussian:
// kNegHalfSqL2; the rest: kDot).
SimilarityKind EffectiveSimilarity(const EnergyConfig& config);

}  // namespace engram::core

#endif  // ENGRAM_CORE_ENERGY_CONFIG_H_
