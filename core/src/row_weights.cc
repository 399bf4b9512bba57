#include "fused.h"

#include <cmath>
#include <memory>

namespace engram::core::internal {

double LogSoftmaxWeights::Block(const double* s, int64_t count, double* w, double*) const {
  for (int64_t i = 0; i < count; ++i) w[i] = beta_ * s[i];
  return 0.0;
}

double PolynomialWeights::Block(const double* s, int64_t count, double* w, double* h) const {
  double e = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const double v = s[i];
    h[i] = 0.0;
    if (degree_ == 0) {  // identity
      w[i] = 1.0;
      e -= v;
      continue;
    }
    if (rectified_ && v <= 0.0) {
      w[i] = 0.0;
      continue;
    }
    double p = 1.0;  // v^(degree-1)
    for (int j = 1; j < degree_; ++j) p *= v;
    if (half_) {
      w[i] = 0.5 * degree_ * p;
      e -= 0.5 * p * v;
    } else {
      w[i] = degree_ * p;
      e -= p * v;
    }
  }
  return e;
}

bool PolynomialWeights::affine_integer_form(AffineIntegerForm* form) const {
  if (degree_ == 0 || (degree_ == 1 && !half_ && !rectified_)) {  // F(s) = s: w = 1
    *form = {.a = 0, .b = 1, .c = 0, .e2 = 0.0, .e1 = -1.0};
    return true;
  }
  if (degree_ == 2 && !rectified_) {  // F(s) = s^2 (/ 2): w = 2 s (s)
    *form = {.a = half_ ? 1 : 2, .b = 0, .c = 0, .e2 = half_ ? -0.5 : -1.0, .e1 = 0.0};
    return true;
  }
  return false;
}

std::unique_ptr<RowWeights> MakeRowWeights(const EnergyConfig& config) {
  switch (config.family) {
    case EnergyFamily::kClassical:
      return std::make_unique<PolynomialWeights>(2, false, true);
    case EnergyFamily::kPolynomial:
      return std::make_unique<PolynomialWeights>(config.degree, config.rectified, false);
    case EnergyFamily::kExponential:
    case EnergyFamily::kLse:
    case EnergyFamily::kGaussian:
      return std::make_unique<LogSoftmaxWeights>(config.beta);
    case EnergyFamily::kGeneral:
      if (config.similarity == SimilarityKind::kNegL1) return nullptr;
      switch (config.separation) {
        case SeparationKind::kIdentity:
          return std::make_unique<PolynomialWeights>(0, false, false);
        case SeparationKind::kPolynomial:
          return std::make_unique<PolynomialWeights>(config.degree, config.rectified, false);
        case SeparationKind::kSoftmax:
          return std::make_unique<LogSoftmaxWeights>(config.beta);
        case SeparationKind::kMax:
        case SeparationKind::kSparsemax:
        case SeparationKind::kEntmax15:
        case SeparationKind::kLogSumRelu:
          return nullptr;
      }
  }
  return nullptr;
}

}  // namespace engram::core::internal
