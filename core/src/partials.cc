#include "engram/core/partials.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fold.h"
#include "fused.h"

namespace engram::core {
namespace {

// The readouts of the parts, merged: in the log domain each part's
// normalised readout weighs exp(value_log_norm_i - L), L the log of the
// merged normaliser; otherwise the readouts add.
void MergeValues(absl::Span<const StepPartial> parts, bool log_domain, StepPartial* out) {
  size_t m = 0;
  double top = -INFINITY;
  for (const StepPartial& p : parts) {
    m = std::max(m, p.value.size());
    if (!p.value.empty() && p.rows > 0) top = std::max(top, p.value_log_norm);
  }
  if (m == 0) return;
  double z = 0.0;
  if (log_domain && std::isfinite(top)) {
    for (const StepPartial& p : parts) {
      if (!p.value.empty() && p.rows > 0) z += std::exp(p.value_log_norm - top);
    }
  }
  std::vector<double> acc(m, 0.0);
  for (const StepPartial& p : parts) {
    if (p.value.empty() || p.rows == 0) continue;
    const double f = log_domain ? std::exp(p.value_log_norm - top) / z : 1.0;
    for (size_t j = 0; j < m; ++j) acc[j] += f * p.value[j];
  }
  out->value.assign(m, 0.f);
  for (size_t j = 0; j < m; ++j) out->value[j] = static_cast<float>(acc[j]);
  out->value_log_norm = log_domain && z > 0.0 ? top + std::log(z) : 0.0;
}

}  // namespace

absl::StatusOr<StepPartial> MergeStepPartials(absl::Span<const StepPartial> parts) {
  StepPartial out;
  if (parts.empty()) return out;
  out.log_domain = parts[0].log_domain;
  // Every part of some rows carries a sum (and a value) of one length, or
  // none does; a part of no rows may carry either.
  size_t sum_len = 0, value_len = 0;
  for (const StepPartial& p : parts) {
    sum_len = std::max(sum_len, p.sum.size());
    value_len = std::max(value_len, p.value.size());
  }
  for (const StepPartial& p : parts) {
    if (p.log_domain != out.log_domain) {
      return absl::InvalidArgumentError("partials of a softmax and of a linear energy");
    }
    const bool sum_ok = p.sum.size() == sum_len || (p.rows == 0 && p.sum.empty());
    const bool value_ok = p.value.size() == value_len || (p.rows == 0 && p.value.empty());
    if (!sum_ok || !value_ok) {
      return absl::InvalidArgumentError(
          "partials with weighted sums or value readouts of different lengths");
    }
  }
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
        // A part of no rows has no scale: MergeRanges skips it.
        return internal::RangeSums{&running[i], p.energy_terms, p.nearest_row, p.nearest_key,
                                   p.sum.size() == n ? p.sum.data() : nullptr};
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
  MergeValues(parts, out.log_domain, &out);
  return out;
}

}  // namespace engram::core
