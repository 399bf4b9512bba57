#include "engram/core/partials.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "fold.h"
#include "fused.h"

namespace engram::core {

StepPartial MergeStepPartials(absl::Span<const StepPartial> parts) {
  StepPartial out;
  if (parts.empty()) return out;
  out.log_domain = parts[0].log_domain;
  size_t n = 0;
  std::vector<internal::RunningSums> running(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    const StepPartial& p = parts[i];
    out.rows += p.rows;
    n = std::max(n, p.sum.size());
    if (std::isnan(out.sq_x)) out.sq_x = p.sq_x;
    running[i].log_scale = p.log_scale;
    running[i].scale = p.scale;
    running[i].wsum = p.wsum;
    running[i].hsum = p.hsum;
  }
  internal::FusedSums merged;
  out.sum.assign(n, 0.f);
  internal::MergeRanges(
      static_cast<int>(parts.size()),
      [&](int i) {
        const StepPartial& p = parts[i];
        return internal::RangeSums{&running[i], p.energy_terms, p.nearest_row, p.nearest_key,
                                   p.sum.empty() ? nullptr : p.sum.data()};
      },
      out.log_domain, /*track_nearest=*/true, static_cast<int>(n), &merged,
      n > 0 ? out.sum.data() : nullptr);
  out.log_scale = merged.log_scale;
  out.scale = merged.scale;
  out.wsum = merged.wsum;
  out.hsum = merged.hsum;
  out.energy_terms = merged.energy_terms;
  out.nearest_row = merged.nearest_row;
  out.nearest_key = merged.nearest_key;
  return out;
}

}  // namespace engram::core
