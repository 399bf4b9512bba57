// The bounds Engram checks on a request's parameters, in one place. The
// server's documentation table of limits (engramd --print_limits,
// docs/reliability.md) is generated from these constants.
#ifndef ENGRAM_CORE_LIMITS_H_
#define ENGRAM_CORE_LIMITS_H_

namespace engram::core {

// energy.beta: finite and within [kMinBeta, kMaxBeta]. Below kMinBeta the
// log-sum-exp energies' 1/beta log K term leaves double range for large
// banks; above kMaxBeta every softmax is a hard max.
inline constexpr double kMinBeta = 1e-12;
inline constexpr double kMaxBeta = 1e6;
// energy.degree of the polynomial separations.
inline constexpr int kMinDegree = 1;
inline constexpr int kMaxDegree = 12;
// Sample: Langevin steps per level and annealed-AM iterations per level.
inline constexpr int kMaxLangevinSteps = 1000;
inline constexpr int kMaxAmIterations = 1000;

}  // namespace engram::core

#endif  // ENGRAM_CORE_LIMITS_H_
