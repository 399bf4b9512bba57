#include "engram/core/schedule.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace engram::core {

std::string ScheduleName(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kKarras: return "karras";
    case ScheduleKind::kGeometric: return "geometric";
    case ScheduleKind::kLinear: return "linear";
  }
  return "unknown";
}

absl::StatusOr<std::vector<double>> MakeSchedule(const ScheduleConfig& c) {
  if (!std::isfinite(c.sigma_max) || !std::isfinite(c.sigma_min) || c.sigma_min <= 0 ||
      c.sigma_max < c.sigma_min) {
    return absl::InvalidArgumentError(absl::StrCat(
        "schedule needs finite 0 < sigma_min <= sigma_max, got sigma_min=", c.sigma_min,
        " sigma_max=", c.sigma_max));
  }
  if (c.sigma_max > 1e6) {
    return absl::InvalidArgumentError(absl::StrCat("sigma_max must be <= 1e6, got ", c.sigma_max));
  }
  if (!std::isfinite(c.rho) || c.rho <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("rho must be finite and > 0, got ", c.rho));
  }
  if (c.steps < 1 || c.steps > kMaxSampleSteps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "steps must be in [1, ", kMaxSampleSteps, "], got ", c.steps));
  }
  std::vector<double> s(c.steps);
  const int last = c.steps - 1;
  for (int i = 0; i < c.steps; ++i) {
    const double t = last == 0 ? 0.0 : static_cast<double>(i) / last;
    switch (c.kind) {
      case ScheduleKind::kKarras: {
        const double a = std::pow(c.sigma_max, 1.0 / c.rho);
        const double b = std::pow(c.sigma_min, 1.0 / c.rho);
        s[i] = std::pow(a + t * (b - a), c.rho);
        break;
      }
      case ScheduleKind::kGeometric:
        s[i] = c.sigma_max * std::pow(c.sigma_min / c.sigma_max, t);
        break;
      case ScheduleKind::kLinear:
        s[i] = c.sigma_max + t * (c.sigma_min - c.sigma_max);
        break;
    }
  }
  // Exact end points, whatever the rounding of pow.
  s[0] = c.sigma_max;
  if (last > 0) s[last] = c.sigma_min;
  // An extreme rho overflows smax^(1/rho) (rho = 1e-172 gives inf - inf
  // inside the bracket, then NaN levels and NaN samples).
  for (int i = 0; i < c.steps; ++i) {
    if (!std::isfinite(s[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rho=", c.rho, " makes noise level ", i, " non-finite; use a moderate rho (7 is usual)"));
    }
    s[i] = std::clamp(s[i], c.sigma_min, c.sigma_max);
  }
  if (!c.stop_at_sigma_min) s.push_back(0.0);
  return s;
}

}  // namespace engram::core
