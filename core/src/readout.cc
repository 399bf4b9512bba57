#include "engram/core/readout.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "compact.h"
#include "fused.h"
#include "kernels/kernels.h"
#include "parallel.h"

namespace engram::core {
namespace {

bool SoftmaxReadout(const EnergyConfig& c) {
  switch (c.family) {
    case EnergyFamily::kExponential:
    case EnergyFamily::kLse:
    case EnergyFamily::kGaussian:
      return true;
    case EnergyFamily::kGeneral:
      return c.separation == SeparationKind::kSoftmax;
    default:
      return false;
  }
}

}  // namespace

void ReadoutWeights(const EnergyFunction& energy, const float* x, double* p, double* log_norm) {
  const PatternView& view = energy.patterns();
  const int64_t k = view.rows;
  if (log_norm != nullptr) *log_norm = 0.0;
  if (k == 0) return;
  const EnergyConfig& c = energy.config();
  const SimilarityKind sim = EffectiveSimilarity(c);
  if (sim == SimilarityKind::kNegL1 || view.log_prior != nullptr) {
    energy.Similarities(x, p);
  } else {
    internal::FastSimilarities(view, sim, x, p);
  }
  if (SoftmaxReadout(c)) {
    double top = -INFINITY;
    for (int64_t mu = 0; mu < k; ++mu) top = std::max(top, c.beta * p[mu]);
    double z = 0.0;
    for (int64_t mu = 0; mu < k; ++mu) {
      p[mu] = std::exp(c.beta * p[mu] - top);
      z += p[mu];
    }
    for (int64_t mu = 0; mu < k; ++mu) p[mu] /= z;
    if (log_norm != nullptr) *log_norm = top + std::log(z);
    return;
  }
  if (c.family == EnergyFamily::kGeneral && c.separation == SeparationKind::kMax) {
    int64_t best = 0;
    for (int64_t mu = 1; mu < k; ++mu) {
      if (p[mu] > p[best]) best = mu;
    }
    std::fill(p, p + k, 0.0);
    p[best] = 1.0;
    return;
  }
  // F'(s): the weights the energy itself reports (-dE/dS).
  std::vector<double> s(p, p + k);
  energy.EnergyFromSimilarities(s.data(), 0.0, p);
  if (c.family == EnergyFamily::kGeneral && c.separation == SeparationKind::kLogSumRelu) {
    // Epanechnikov kernel regression: the mean of the values in support.
    double sum = 0.0;
    for (int64_t mu = 0; mu < k; ++mu) sum += p[mu];
    if (sum > 0.0) {
      for (int64_t mu = 0; mu < k; ++mu) p[mu] /= sum;
    }
  }
}

void ValueReadout(const EnergyFunction& energy, const float* values, int value_dim,
                  const float* x, float* out, double* log_norm) {
  const int64_t k = energy.patterns().rows;
  const int m = value_dim;
  std::fill(out, out + m, 0.f);
  if (log_norm != nullptr) *log_norm = 0.0;
  if (k == 0 || m == 0) return;
  // A separation of compact support weighs only the rows its bound keeps:
  // the readout sums the values of its support alone, in double.
  internal::CompactSupport support;
  if (internal::HasCompactPass(energy.config()) &&
      internal::CompactWeights(energy.patterns(), energy.config(), x, &support)) {
    std::vector<double> sum(m, 0.0);
    for (size_t j = 0; j < support.rows.size(); ++j) {
      const double w = support.weights[j];
      if (w == 0.0) continue;
      const float* v = values + support.rows[j] * m;
      for (int i = 0; i < m; ++i) sum[i] += w * v[i];
    }
    for (int i = 0; i < m; ++i) out[i] = static_cast<float>(sum[i]);
    return;
  }
  std::vector<double> p(k);
  ReadoutWeights(energy, x, p.data(), log_norm);
  // Unnormalised weights (polynomial F') can pass the float range: the sums
  // run on p / 2^e, 2^e >= max |p|, and are scaled back in double.
  double top = 0.0;
  for (int64_t mu = 0; mu < k; ++mu) top = std::max(top, std::fabs(p[mu]));
  double scale = 1.0;
  if (top > 0.0 && std::isfinite(top)) {
    int e = 0;
    std::frexp(top, &e);
    scale = std::ldexp(1.0, e);
    for (int64_t mu = 0; mu < k; ++mu) p[mu] /= scale;
  }
  // Each range's partial (f32, the axpy kernel over blocks of rows) in its
  // own slot, summed in double in range order.
  const int max_ranges = 4 * internal::ComputeThreads();
  std::vector<std::vector<float>> partial(max_ranges);
  const kernels::KernelTable& kt = kernels::Kernels();
  int used = 1;
  internal::ParallelRows(k, int64_t{m} * 2, [&](int range, int64_t begin, int64_t end) {
    std::vector<float>& acc = partial[range];
    acc.assign(m, 0.f);
    constexpr int64_t kChunk = 256;
    float w[kChunk];
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      for (int64_t i = 0; i < count; ++i) w[i] = static_cast<float>(p[b + i]);
      kt.axpy_rows(values + b * m, count, m, w, acc.data());
    }
  }, &used);
  std::vector<double> sum(m, 0.0);
  for (int r = 0; r < used; ++r) {
    if (partial[r].empty()) continue;
    for (int j = 0; j < m; ++j) sum[j] += partial[r][j];
  }
  for (int j = 0; j < m; ++j) out[j] = static_cast<float>(sum[j] * scale);
}

void ValueReadoutPartial(const EnergyFunction& energy, const float* values, int value_dim,
                         const float* x, StepPartial* partial) {
  partial->value.assign(value_dim, 0.f);
  ValueReadout(energy, values, value_dim, x, partial->value.data(), &partial->value_log_norm);
  if (partial->form == PartialForm::kLogSumRelu) {
    // The mean over this part's support weighs by the support's size.
    partial->value_log_norm = partial->wsum > 0.0 ? std::log(partial->wsum) : -INFINITY;
  }
}

}  // namespace engram::core
