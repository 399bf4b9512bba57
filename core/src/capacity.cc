#include "engram/core/capacity.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace engram::core {

double DoubleFactorial2nMinus3(int n) {
  double r = 1.0;
  for (int k = 2 * n - 3; k > 1; k -= 2) r *= k;
  return r;
}

double ClassicalOneStepErrorProbability(int dim, double patterns) {
  if (patterns <= 0) return 0.0;
  return 0.5 * std::erfc(std::sqrt(dim / (2.0 * patterns)));
}

CapacityEstimate TheoreticalCapacity(const EnergyConfig& config,
                                     StateKind kind, int dim) {
  CapacityEstimate c;
  const double n_dim = dim;
  const double ln_n = std::log(std::max(2.0, n_dim));
  switch (config.family) {
    case EnergyFamily::kClassical:
      c.patterns = 0.138 * n_dim;
      c.exact_patterns = n_dim / (2.0 * ln_n);
      c.formula = "0.138 N (exact fixed points: N / (2 ln N))";
      return c;
    case EnergyFamily::kPolynomial: {
      const int n = config.degree;
      c.patterns = std::pow(n_dim, n - 1) / (2.0 * DoubleFactorial2nMinus3(n) * ln_n);
      c.exact_patterns = c.patterns;
      c.formula = absl::StrCat("N^", n - 1, " / (2 (2n-3)!! ln N), n = ", n);
      return c;
    }
    case EnergyFamily::kExponential:
    case EnergyFamily::kLse:
      c.patterns = std::pow(2.0, n_dim / 2.0);
      c.exact_patterns = c.patterns;
      c.formula = "2^(N/2)";
      return c;
    case EnergyFamily::kGaussian:
    case EnergyFamily::kGeneral:
      c.patterns = std::numeric_limits<double>::infinity();
      c.exact_patterns = c.patterns;
      c.formula = "no finite bound (any finite set is retrievable as beta grows)";
      return c;
  }
  (void)kind;
  return c;
}

}  // namespace engram::core
