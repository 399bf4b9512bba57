#include "engram/core/energy_config.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "engram/core/limits.h"

namespace engram::core {

std::string EnergyFamilyName(EnergyFamily family) {
  switch (family) {
    case EnergyFamily::kClassical: return "classical";
    case EnergyFamily::kPolynomial: return "polynomial";
    case EnergyFamily::kExponential: return "exponential";
    case EnergyFamily::kLse: return "lse";
    case EnergyFamily::kGaussian: return "gaussian";
    case EnergyFamily::kGeneral: return "general";
  }
  return "unknown";
}

absl::Status ValidateEnergyConfig(const EnergyConfig& config, StateKind kind) {
  if (!std::isfinite(config.beta) || !(config.beta >= kMinBeta) || config.beta > kMaxBeta) {
    return absl::InvalidArgumentError(absl::StrCat("energy.beta must be in [", kMinBeta, ", ",
                                                   kMaxBeta, "], got ", config.beta));
  }
  const bool uses_degree =
      config.family == EnergyFamily::kPolynomial ||
      (config.family == EnergyFamily::kGeneral &&
       config.separation == SeparationKind::kPolynomial);
  if (uses_degree && (config.degree < kMinDegree || config.degree > kMaxDegree)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "energy.degree must be in [", kMinDegree, ", ", kMaxDegree, "], got ", config.degree));
  }
  const bool bipolar_only = config.family == EnergyFamily::kClassical ||
                            config.family == EnergyFamily::kPolynomial ||
                            config.family == EnergyFamily::kExponential;
  if (bipolar_only && kind != StateKind::kBipolar) {
    return absl::FailedPreconditionError(absl::StrCat(
        "energy family ", EnergyFamilyName(config.family),
        " is defined on bipolar states; this bank is continuous"));
  }
  return absl::OkStatus();
}

SimilarityKind EffectiveSimilarity(const EnergyConfig& config) {
  switch (config.family) {
    case EnergyFamily::kGaussian: return SimilarityKind::kNegHalfSqL2;
    case EnergyFamily::kGeneral: return config.similarity;
    default: return SimilarityKind::kDot;
  }
}

}  // namespace engram::core
