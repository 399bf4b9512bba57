#include "engram/core/partials.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "compact.h"
#include "engram/core/energy.h"
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
  if (log_domain && !std::isfinite(top)) {
    // No part weighs a row (a log-sum-ReLU state outside every support).
    out->value.assign(m, 0.f);
    out->value_log_norm = top;
    return;
  }
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

// The max separation's merge: the part of the largest similarity (the first
// on ties, as one pass in row order), over all the parts' rows.
StepPartial MergeTops(absl::Span<const StepPartial> parts) {
  StepPartial out = parts[0];
  int64_t rows = 0;
  const StepPartial* best = nullptr;
  for (const StepPartial& p : parts) {
    rows += p.rows;
    if (p.rows > 0 && (best == nullptr || p.top > best->top)) best = &p;
    if (p.nearest_key > out.nearest_key) {
      out.nearest_key = p.nearest_key;
      out.nearest_row = p.nearest_row;
    }
  }
  const int64_t nearest_row = out.nearest_row;
  const double nearest_key = out.nearest_key;
  if (best != nullptr) out = *best;
  out.rows = rows;
  out.nearest_row = nearest_row;
  out.nearest_key = nearest_key;
  return out;
}

}  // namespace

absl::StatusOr<SparseThreshold> ThresholdOf(const StepPartial& merged) {
  if (merged.form != PartialForm::kSparsemax && merged.form != PartialForm::kEntmax15) {
    return absl::InvalidArgumentError("a threshold needs a sparse separation's candidates");
  }
  SparseThreshold t;
  if (merged.candidates.empty()) return t;
  // The rows CompactWeights keeps over the whole bank (a part's bound kept
  // a superset); the others have weight zero and change no sum.
  double zmax = -INFINITY;
  for (double z : merged.candidates) zmax = std::max(zmax, z);
  const bool sparsemax = merged.form == PartialForm::kSparsemax;
  const double floor = internal::SparseCandidateFloor(sparsemax, zmax);
  std::vector<double> z;
  for (double v : merged.candidates) {
    if (v >= floor) z.push_back(v);
  }
  std::vector<double> p(z.size());
  const int64_t m = static_cast<int64_t>(z.size());
  t.psi = sparsemax ? Sparsemax(z.data(), m, p.data(), &t.tau)
                    : Entmax15(z.data(), m, p.data(), &t.tau);
  t.shift = sparsemax ? 0.0 : zmax / 2;
  return t;
}

absl::StatusOr<StepPartial> MergeStepPartials(absl::Span<const StepPartial> parts) {
  StepPartial out;
  if (parts.empty()) return out;
  // The parts of some rows share one form.
  PartialForm form = parts[0].form;
  for (const StepPartial& p : parts) {
    if (p.rows > 0) {
      form = p.form;
      break;
    }
  }
  for (const StepPartial& p : parts) {
    if (p.rows > 0 && p.form != form) {
      return absl::InvalidArgumentError("partials of different forms (separations)");
    }
  }
  if (form == PartialForm::kTop) return MergeTops(parts);
  if (form == PartialForm::kSparsemax || form == PartialForm::kEntmax15) {
    out.form = form;
    out.log_domain = false;
    for (const StepPartial& p : parts) {
      out.rows += p.rows;
      if (p.rows == 0) continue;
      out.top = std::max(out.top, p.top);
      if (p.nearest_key > out.nearest_key) {
        out.nearest_key = p.nearest_key;
        out.nearest_row = p.nearest_row;
      }
      out.candidates.insert(out.candidates.end(), p.candidates.begin(), p.candidates.end());
    }
    return out;
  }
  out.form = form;
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
  // The L1 gradient's signs, brought to the merged scale as the sums are.
  size_t signs = 0;
  for (const StepPartial& p : parts) signs = std::max(signs, p.sign_sum.size());
  if (signs > 0) {
    out.sign_sum.assign(signs, 0.f);
    for (size_t i = 0; i < parts.size(); ++i) {
      const StepPartial& p = parts[i];
      if (p.sign_sum.size() != signs) {
        if (p.rows == 0) continue;
        return absl::InvalidArgumentError("partials with sign sums of different lengths");
      }
      if (!std::isfinite(running[i].LogScale(out.log_domain))) continue;
      const float f = static_cast<float>(
          internal::MergeFactor(running[i], out.log_domain, merged.log_scale, merged.scale));
      for (size_t j = 0; j < signs; ++j) out.sign_sum[j] += f * p.sign_sum[j];
    }
  }
  out.log_scale = merged.log_scale;
  out.scale = merged.scale;
  out.wsum = merged.wsum;
  out.hsum = merged.hsum;
  out.energy_terms = merged.energy_terms;
  out.nearest_row = merged.nearest_row;
  out.nearest_key = merged.nearest_key;
  // Log-sum-ReLU readouts are means over each part's support, weighed by
  // its size (value_log_norm = log of it), as the softmax readouts are.
  MergeValues(parts, out.log_domain || form == PartialForm::kLogSumRelu, &out);
  return out;
}

}  // namespace engram::core
