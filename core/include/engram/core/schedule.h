// Noise schedules for diffusion-style sampling (SPEC section 4): a
// decreasing sequence sigma_0 = sigma_max > ... > sigma_{S-1} = sigma_min,
// followed by sigma_S = 0 unless the sampler stops at sigma_min.
//
//   ScheduleConfig cfg{.kind = ScheduleKind::kKarras, .steps = 64};
//   ENGRAM_ASSIGN_OR_RETURN(std::vector<double> sigmas, MakeSchedule(cfg));
//   // sigmas.size() == 65, sigmas.back() == 0
//
// Thread-safety: pure functions.
#ifndef ENGRAM_CORE_SCHEDULE_H_
#define ENGRAM_CORE_SCHEDULE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace engram::core {

enum class ScheduleKind { kKarras, kGeometric, kLinear };

std::string ScheduleName(ScheduleKind kind);

struct ScheduleConfig {
  ScheduleKind kind = ScheduleKind::kKarras;
  double sigma_max = 80.0;
  double sigma_min = 0.002;
  double rho = 7.0;  // Karras exponent
  int steps = 64;    // S: number of noise levels sigma_0 .. sigma_{S-1}
  bool stop_at_sigma_min = false;
};

inline constexpr int kMaxSampleSteps = 100000;

// karras: sigma_i = (smax^(1/rho) + i/(S-1) (smin^(1/rho) - smax^(1/rho)))^rho
// geometric: sigma_i = smax (smin/smax)^(i/(S-1))
// linear: sigma_i = smax + i/(S-1) (smin - smax)
// Returns S values, plus a final 0 unless stop_at_sigma_min. S = 1 gives
// {sigma_max}. INVALID_ARGUMENT unless 0 < sigma_min <= sigma_max (finite),
// rho > 0 and 1 <= steps <= kMaxSampleSteps, and when an extreme rho makes a
// level non-finite (pow overflow). Levels lie in [sigma_min, sigma_max].
absl::StatusOr<std::vector<double>> MakeSchedule(const ScheduleConfig& config);

}  // namespace engram::core

#endif  // ENGRAM_CORE_SCHEDULE_H_
