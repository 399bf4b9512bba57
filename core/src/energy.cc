#include "engram/core/energy.h"
#include "engram/core/limits.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>

#include <Eigen/Core>

#include "absl/strings/str_cat.h"
#include "engram/core/status_macros.h"
#include "compact.h"
#include "fold.h"
#include "fused.h"
#include "kernels/kernels.h"
#include "parallel.h"
#include "state_loops.h"

namespace engram::core {
namespace {

using RowMajorMatrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMatrixMap = Eigen::Map<const RowMajorMatrix>;
using ConstVectorMap = Eigen::Map<const Eigen::VectorXf>;
using VectorMap = Eigen::Map<Eigen::VectorXf>;

double IntPow(double s, int n) {
  double r = 1.0;
  for (int i = 0; i < n; ++i) r *= s;
  return r;
}

// F_n(s) and F_n'(s) for the polynomial separation.
double PolyF(double s, int n, bool rectified) {
  if (rectified && s <= 0.0) return 0.0;
  return IntPow(s, n);
}
double PolyDF(double s, int n, bool rectified) {
  if (rectified && s <= 0.0) return 0.0;
  return n * IntPow(s, n - 1);
}

// Writes softmax(beta * s) into w; returns lse(beta * s).
double Softmax(const double* s, int64_t k, double beta, double* w) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < k; ++i) m = std::max(m, beta * s[i]);
  if (!std::isfinite(m)) {
    if (w != nullptr) std::fill(w, w + k, k > 0 ? 1.0 / k : 0.0);
    return m;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double e = std::exp(beta * s[i] - m);
    if (w != nullptr) w[i] = e;
    sum += e;
  }
  if (w != nullptr) {
    const double inv = 1.0 / sum;
    for (int64_t i = 0; i < k; ++i) w[i] *= inv;
  }
  return m + std::log(sum);
}

}  // namespace

double Sparsemax(const double* z, int64_t k, double* p, double* tau_out) {
  if (tau_out != nullptr) *tau_out = 0.0;
  if (k == 0) return 0.0;
  std::vector<double> sorted(z, z + k);
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  // The support is the largest r with 1 + r z_(r) > sum_{j<=r} z_(j).
  double cum = 0.0, tau = sorted[0] - 1.0;
  for (int64_t r = 1; r <= k; ++r) {
    cum += sorted[r - 1];
    if (1.0 + r * sorted[r - 1] > cum) tau = (cum - 1.0) / r;
  }
  if (tau_out != nullptr) *tau_out = tau;
  double dot = 0.0, sq = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    p[i] = std::max(z[i] - tau, 0.0);
    dot += p[i] * z[i];
    sq += p[i] * p[i];
  }
  return dot + 0.5 * (1.0 - sq);
}

double Entmax15(const double* z, int64_t k, double* p, double* tau_out) {
  if (tau_out != nullptr) *tau_out = 0.0;
  if (k == 0) return 0.0;
  // p_i = [z_i / 2 - tau]_+^2 with sum p = 1; on a support of the r largest
  // u = z / 2, tau solves r tau^2 - 2 tau sum u + sum u^2 - 1 = 0.
  const double top = *std::max_element(z, z + k) / 2;
  std::vector<double> u(k);
  for (int64_t i = 0; i < k; ++i) u[i] = z[i] / 2 - top;  // shifted: exact in tau
  std::vector<double> sorted(u);
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  double cum = 0.0, cum_sq = 0.0, tau = sorted[0] - 1.0;
  for (int64_t r = 1; r <= k; ++r) {
    cum += sorted[r - 1];
    cum_sq += sorted[r - 1] * sorted[r - 1];
    const double mean = cum / r;
    const double delta = (1.0 - r * (cum_sq / r - mean * mean)) / r;
    const double t = mean - std::sqrt(std::max(delta, 0.0));
    if (t <= sorted[r - 1]) tau = t;
  }
  if (tau_out != nullptr) *tau_out = tau;
  double dot = 0.0, pow15 = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double d = std::max(u[i] - tau, 0.0);
    p[i] = d * d;
    dot += p[i] * z[i];
    pow15 += p[i] * d;  // p^1.5 = d^3
  }
  return dot + (1.0 - pow15) / 0.75;
}

double LogSumExp(absl::Span<const double> v) {
  double m = -std::numeric_limits<double>::infinity();
  for (double x : v) m = std::max(m, x);
  if (!std::isfinite(m)) return m;
  double sum = 0.0;
  for (double x : v) sum += std::exp(x - m);
  return m + std::log(sum);
}

EnergyFunction::EnergyFunction(const EnergyConfig& config,
                               PatternView patterns)
    : config_(config), patterns_(patterns) {}

void EnergyFunction::Similarities(const float* x, double* s) const {
  const int64_t k = patterns_.rows;
  const int n = patterns_.dim;
  if (k == 0) return;
  ConstMatrixMap xi(patterns_.data, k, n);
  ConstVectorMap xv(x, n);
  switch (EffectiveSimilarity(config_)) {
    case SimilarityKind::kDot: {
      Eigen::VectorXf dots = xi * xv;
      for (int64_t mu = 0; mu < k; ++mu) s[mu] = dots[mu];
      break;
    }
    case SimilarityKind::kNegHalfSqL2: {
      Eigen::VectorXf dots = xi * xv;
      const double sq_x = xv.cast<double>().squaredNorm();
      for (int64_t mu = 0; mu < k; ++mu) {
        s[mu] = double{dots[mu]} - 0.5 * patterns_.sq_norms[mu] - 0.5 * sq_x;
      }
      break;
    }
    case SimilarityKind::kNegL1: {
      for (int64_t mu = 0; mu < k; ++mu) {
        const float* r = patterns_.row(mu);
        double acc = 0.0;
        for (int i = 0; i < n; ++i) acc += std::fabs(double{r[i]} - x[i]);
        s[mu] = -acc;
      }
      break;
    }
  }
  if (patterns_.log_prior != nullptr) {
    // Weights exp(beta S + b) = exp(beta (S + b / beta)); only softmax
    // energies take a prior (ValidateDecay).
    const double inv_beta = 1.0 / config_.beta;
    for (int64_t mu = 0; mu < k; ++mu) s[mu] += patterns_.log_prior[mu] * inv_beta;
  }
}

double EnergyFunction::EnergyFromSimilarities(const double* s,
                                              double sq_norm_x,
                                              double* w) const {
  const int64_t k = patterns_.rows;
  const double beta = config_.beta;
  switch (config_.family) {
    case EnergyFamily::kClassical: {
      double e = 0.0;
      for (int64_t mu = 0; mu < k; ++mu) {
        e -= 0.5 * s[mu] * s[mu];
        if (w != nullptr) w[mu] = s[mu];
      }
      return e;
    }
    case EnergyFamily::kPolynomial: {
      double e = 0.0;
      for (int64_t mu = 0; mu < k; ++mu) {
        e -= PolyF(s[mu], config_.degree, config_.rectified);
        if (w != nullptr) w[mu] = PolyDF(s[mu], config_.degree, config_.rectified);
      }
      return e;
    }
    case EnergyFamily::kExponential: {
      const double lse = Softmax(s, k, beta, w);
      if (w != nullptr) {
        // w_mu = beta exp(beta s_mu) = beta exp(lse) softmax_mu.
        const double scale = beta * std::exp(lse);
        for (int64_t mu = 0; mu < k; ++mu) w[mu] *= scale;
      }
      return k == 0 ? 0.0 : -std::exp(lse);
    }
    case EnergyFamily::kLse: {
      if (k == 0) return 0.5 * sq_norm_x;
      const double lse = Softmax(s, k, beta, w);
      return -lse / beta + 0.5 * sq_norm_x;
    }
    case EnergyFamily::kGaussian: {
      if (k == 0) return 0.0;
      return -Softmax(s, k, beta, w) / beta;
    }
    case EnergyFamily::kGeneral: {
      if (k == 0) return 0.0;
      switch (config_.separation) {
        case SeparationKind::kIdentity: {
          double e = 0.0;
          for (int64_t mu = 0; mu < k; ++mu) {
            e -= s[mu];
            if (w != nullptr) w[mu] = 1.0;
          }
          return e;
        }
        case SeparationKind::kPolynomial: {
          double e = 0.0;
          for (int64_t mu = 0; mu < k; ++mu) {
            e -= PolyF(s[mu], config_.degree, config_.rectified);
            if (w != nullptr) {
              w[mu] = PolyDF(s[mu], config_.degree, config_.rectified);
            }
          }
          return e;
        }
        case SeparationKind::kSoftmax:
          return -Softmax(s, k, beta, w) / beta;
        case SeparationKind::kSparsemax:
        case SeparationKind::kEntmax15: {
          std::vector<double> z(k), p(k);
          for (int64_t mu = 0; mu < k; ++mu) z[mu] = beta * s[mu];
          const double psi = config_.separation == SeparationKind::kSparsemax
                                 ? Sparsemax(z.data(), k, p.data())
                                 : Entmax15(z.data(), k, p.data());
          if (w != nullptr) std::copy(p.begin(), p.end(), w);
          return -psi / beta;
        }
        case SeparationKind::kLogSumRelu: {
          double sum = 0.0;
          for (int64_t mu = 0; mu < k; ++mu) sum += std::max(1.0 + beta * s[mu], 0.0);
          const double z = kLogSumReluEpsilon + sum;
          if (w != nullptr) {
            for (int64_t mu = 0; mu < k; ++mu) w[mu] = 1.0 + beta * s[mu] > 0.0 ? 1.0 / z : 0.0;
          }
          return -std::log(z) / beta;
        }
        case SeparationKind::kMax: {
          int64_t best = 0;
          for (int64_t mu = 1; mu < k; ++mu) {
            if (s[mu] > s[best]) best = mu;
          }
          if (w != nullptr) {
            std::fill(w, w + k, 0.0);
            w[best] = 1.0;
          }
          return -s[best];
        }
      }
    }
  }
  return 0.0;
}

double EnergyFunction::ReferenceValue(const float* x) const {
  std::vector<double> s(patterns_.rows);
  Similarities(x, s.data());
  ConstVectorMap xv(x, patterns_.dim);
  return EnergyFromSimilarities(s.data(), xv.cast<double>().squaredNorm(),
                                nullptr);
}

double EnergyFunction::ReferenceValueAndGradient(const float* x, float* grad) const {
  const int64_t k = patterns_.rows;
  const int n = patterns_.dim;
  std::vector<double> s(k), w(k);
  Similarities(x, s.data());
  ConstVectorMap xv(x, n);
  const double e =
      EnergyFromSimilarities(s.data(), xv.cast<double>().squaredNorm(), w.data());
  VectorMap g(grad, n);
  g.setZero();
  if (k > 0) {
    ConstMatrixMap xi(patterns_.data, k, n);
    switch (EffectiveSimilarity(config_)) {
      case SimilarityKind::kDot: {
        // grad = -Xi^T w
        Eigen::VectorXf wf = Eigen::Map<Eigen::VectorXd>(w.data(), k).cast<float>();
        g.noalias() = -(xi.transpose() * wf);
        break;
      }
      case SimilarityKind::kNegHalfSqL2: {
        // dS/dx = xi - x  =>  grad = -Xi^T w + (sum w) x
        Eigen::VectorXf wf = Eigen::Map<Eigen::VectorXd>(w.data(), k).cast<float>();
        double wsum = 0.0;
        for (double v : w) wsum += v;
        g.noalias() = -(xi.transpose() * wf);
        g += static_cast<float>(wsum) * xv;
        break;
      }
      case SimilarityKind::kNegL1: {
        // dS/dx_i = sign(xi_i - x_i)
        std::vector<double> acc(n, 0.0);
        for (int64_t mu = 0; mu < k; ++mu) {
          if (w[mu] == 0.0) continue;
          const float* r = patterns_.row(mu);
          for (int i = 0; i < n; ++i) {
            const double d = double{r[i]} - x[i];
            acc[i] -= w[mu] * ((d > 0) - (d < 0));
          }
        }
        for (int i = 0; i < n; ++i) g[i] = static_cast<float>(acc[i]);
        break;
      }
    }
  }
  if (config_.family == EnergyFamily::kLse) g += xv;  // R(x) = |x|^2 / 2
  return e;
}

double EnergyFunction::ReferenceUpdateTarget(const float* x, float* target) const {
  const int64_t k = patterns_.rows;
  const int n = patterns_.dim;
  std::vector<double> s(k), w(k);
  Similarities(x, s.data());
  ConstVectorMap xv(x, n);
  const double e =
      EnergyFromSimilarities(s.data(), xv.cast<double>().squaredNorm(), w.data());
  VectorMap t(target, n);
  if (k == 0) {
    t = xv;
    return e;
  }
  const bool sign_invariant = config_.family == EnergyFamily::kClassical ||
                              config_.family == EnergyFamily::kPolynomial ||
                              config_.family == EnergyFamily::kExponential;
  if (sign_invariant) {
    double m = 0.0;
    for (double v : w) m = std::max(m, std::fabs(v));
    if (config_.family == EnergyFamily::kExponential || !std::isfinite(m)) {
      // Recompute as softmax: a positive rescaling of exp(beta s).
      Softmax(s.data(), k, config_.beta, w.data());
    } else if (m > 0.0) {
      // The multiple the fused passes return: w over the least power of two
      // >= max |w| (an exact division, see fused.cc).
      int ex = 0;
      const double mant = std::frexp(m, &ex);
      const double p2 = mant == 0.5 ? m : std::ldexp(1.0, ex);
      for (double& v : w) v /= p2;
    }
  }
  if (config_.family == EnergyFamily::kGeneral &&
      config_.separation == SeparationKind::kLogSumRelu) {
    // The mean shift: the weights normalised to sum to one (in double, so a
    // single pattern in support gives weight exactly 1); no support: stay.
    double wsum = 0.0;
    for (double v : w) wsum += v;
    if (!(wsum > 0.0)) {
      t = xv;
      return e;
    }
    for (double& v : w) v /= wsum;
  }
  ConstMatrixMap xi(patterns_.data, k, n);
  Eigen::VectorXf wf = Eigen::Map<Eigen::VectorXd>(w.data(), k).cast<float>();
  t.noalias() = xi.transpose() * wf;
  return e;
}

bool EnergyFunction::FusedEvaluate(const float* x, float* target, float* grad,
                                   double* energy, int64_t* nearest_row) const {
  // A row prior is read by the reference evaluation only.
  if (patterns_.rows == 0 || patterns_.log_prior != nullptr) return false;
  if (internal::HasCompactPass(config_)) {
    return CompactEvaluate(x, target, grad, energy, nearest_row);
  }
  const SimilarityKind sim = EffectiveSimilarity(config_);
  std::unique_ptr<internal::RowWeights> rule = internal::MakeRowWeights(config_);
  if (rule == nullptr || sim == SimilarityKind::kNegL1) return false;
  const internal::FusedSums sums =
      internal::FusedPass(patterns_, sim, x, *rule, target != nullptr ? target : grad,
                          nearest_row != nullptr, nearest_row != nullptr ? *nearest_row : -1);
  if (nearest_row != nullptr) *nearest_row = sums.nearest_row;
  FinishFused(sums, rule->domain() == internal::WeightDomain::kLog, x, target, grad, energy);
  return true;
}

namespace {

// acc += w sign(row - x) (n floats): an L1 similarity's dS/dx, weighed.
void AddSigns(const float* row, const float* x, int n, double w, std::vector<float>* acc) {
  const float wf = static_cast<float>(w);
  for (int i = 0; i < n; ++i) {
    const float d = row[i] - x[i];
    (*acc)[i] += wf * static_cast<float>((d > 0) - (d < 0));
  }
}

// The energy, target and gradient of a whole-row form's merged partial (of
// some rows), as the node's own evaluation gives them: max, the row of the
// largest similarity; log-sum-ReLU, the mean shift over the support; the
// sparse separations, the weighted sum at the whole bank's threshold.
absl::StatusOr<double> FinishWholeRow(const EnergyConfig& c, const StepPartial& p, const float* x,
                                      float* target, float* grad) {
  const int n = static_cast<int>(p.sum.size());
  const bool l2 = c.similarity == SimilarityKind::kNegHalfSqL2;
  double energy = 0.0;
  // The sum's factor into -dE/dx (before the x term), and the x term's.
  double g_sum = -1.0, g_x = 0.0;
  double t_sum = 1.0;
  bool stay = false, matched = false;
  switch (c.separation) {
    case SeparationKind::kMax:
      matched = p.form == PartialForm::kTop;
      energy = -p.top;
      g_x = l2 ? 1.0 : 0.0;
      break;
    case SeparationKind::kLogSumRelu: {
      matched = p.form == PartialForm::kLogSumRelu;
      // wsum rows in support, hsum = sum of 1 + beta s over them.
      const double zsum = kLogSumReluEpsilon + p.hsum;
      energy = -std::log(zsum) / c.beta;
      stay = !(p.wsum > 0.0);
      t_sum = stay ? 0.0 : 1.0 / p.wsum;
      g_sum = -1.0 / zsum;
      g_x = l2 ? p.wsum / zsum : 0.0;
      break;
    }
    case SeparationKind::kSparsemax:
    case SeparationKind::kEntmax15:
      matched = p.form == PartialForm::kSums && !std::isnan(p.psi);
      energy = -p.psi / c.beta;
      g_x = l2 ? p.wsum : 0.0;
      break;
    default:
      break;
  }
  if (!matched) {
    return absl::InvalidArgumentError(
        "a partial of another form than this energy's (a sparse separation's merged second "
        "round needs psi)");
  }
  if (target != nullptr) {
    if (stay) {
      std::copy(x, x + n, target);
    } else {
      const float f = static_cast<float>(t_sum);
      for (int i = 0; i < n; ++i) target[i] = f == 1.f ? p.sum[i] : f * p.sum[i];
    }
  }
  if (grad != nullptr) {
    const float a = static_cast<float>(g_sum), b = static_cast<float>(g_x);
    if (c.similarity != SimilarityKind::kNegL1) {
      for (int i = 0; i < n; ++i) grad[i] = a * p.sum[i] + b * x[i];
    } else if (p.form == PartialForm::kTop) {
      // dS/dx_i = sign(xi_i - x_i) of the best row.
      for (int i = 0; i < n; ++i) {
        const double d = double{p.sum[i]} - x[i];
        grad[i] = -static_cast<float>((d > 0) - (d < 0));
      }
    } else {
      for (int i = 0; i < n; ++i) grad[i] = a * p.sign_sum[i];
    }
  }
  return energy;
}

}  // namespace

bool HasWholeRowForm(const EnergyConfig& c) {
  if (c.family != EnergyFamily::kGeneral) return false;
  switch (c.separation) {
    case SeparationKind::kMax:
    case SeparationKind::kLogSumRelu:
    case SeparationKind::kSparsemax:
    case SeparationKind::kEntmax15:
      return true;
    default:
      return false;
  }
}

void EnergyFunction::PassSimilarities(const float* x, double* s) const {
  if (internal::HasCompactPass(config_)) {
    internal::FastSimilarities(patterns_, config_.similarity, x, s);
  } else {
    Similarities(x, s);
  }
}

StepPartial EnergyFunction::WholeRowPartial(const float* x, bool with_sum, bool track_nearest,
                                            int64_t row_offset) const {
  const int n = patterns_.dim;
  const int64_t k = patterns_.rows;
  const SeparationKind sep = config_.separation;
  StepPartial p;
  p.form = sep == SeparationKind::kMax          ? PartialForm::kTop
           : sep == SeparationKind::kLogSumRelu ? PartialForm::kLogSumRelu
           : sep == SeparationKind::kSparsemax  ? PartialForm::kSparsemax
                                                : PartialForm::kEntmax15;
  p.log_domain = false;
  p.scale = 1.0;
  p.log_scale = 0.0;
  p.rows = k;
  const bool candidates =
      p.form == PartialForm::kSparsemax || p.form == PartialForm::kEntmax15;
  if (with_sum && !candidates) p.sum.assign(n, 0.f);
  // L1: the gradient's signs (the max form's come from its row).
  const bool l1 = with_sum && p.form == PartialForm::kLogSumRelu &&
                  config_.similarity == SimilarityKind::kNegL1;
  if (l1) p.sign_sum.assign(n, 0.f);
  if (k == 0) return p;
  std::vector<double> s(k);
  PassSimilarities(x, s.data());
  const double beta = config_.beta;
  if (track_nearest) TrackNearest(x, s.data(), row_offset, &p);
  const kernels::KernelTable& kt = kernels::Kernels();
  switch (p.form) {
    case PartialForm::kTop: {
      int64_t best = 0;
      for (int64_t r = 1; r < k; ++r) {
        if (s[r] > s[best]) best = r;
      }
      p.top = s[best];
      p.wsum = 1.0;
      if (with_sum) std::copy(patterns_.row(best), patterns_.row(best) + n, p.sum.begin());
      break;
    }
    case PartialForm::kLogSumRelu: {
      const float one = 1.f;
      for (int64_t r = 0; r < k; ++r) {
        const double z = beta * s[r];
        if (!(1.0 + z > 0.0)) continue;
        p.wsum += 1.0;
        p.hsum += 1.0 + z;
        if (with_sum) kt.axpy_rows(patterns_.row(r), 1, n, &one, p.sum.data());
        if (l1) AddSigns(patterns_.row(r), x, n, 1.0, &p.sign_sum);
      }
      break;
    }
    default: {
      // The rows CompactWeights keeps over these rows: a superset of those
      // it keeps over the whole bank, whose max z is at least this one.
      double zmax = -INFINITY;
      for (int64_t r = 0; r < k; ++r) zmax = std::max(zmax, beta * s[r]);
      p.top = zmax;
      const double floor =
          internal::SparseCandidateFloor(p.form == PartialForm::kSparsemax, zmax);
      for (int64_t r = 0; r < k; ++r) {
        const double z = beta * s[r];
        if (z >= floor) p.candidates.push_back(z);
      }
      break;
    }
  }
  return p;
}

absl::StatusOr<StepPartial> EnergyFunction::ThresholdPartial(const float* x,
                                                             const SparseThreshold& t,
                                                             bool with_sum, const float* values,
                                                             int value_dim) const {
  const SeparationKind sep = config_.separation;
  if (config_.family != EnergyFamily::kGeneral ||
      (sep != SeparationKind::kSparsemax && sep != SeparationKind::kEntmax15)) {
    return absl::InvalidArgumentError("a threshold partial is for sparsemax and 1.5-entmax");
  }
  const int n = patterns_.dim;
  const bool l1 = with_sum && config_.similarity == SimilarityKind::kNegL1;
  const int64_t k = patterns_.rows;
  StepPartial p;
  p.form = PartialForm::kSums;
  p.log_domain = false;
  p.scale = 1.0;
  p.log_scale = 0.0;
  p.rows = k;
  if (with_sum) p.sum.assign(n, 0.f);
  if (l1) p.sign_sum.assign(n, 0.f);
  std::vector<double> vsum(values != nullptr ? value_dim : 0, 0.0);
  if (k > 0) {
    std::vector<double> s(k);
    PassSimilarities(x, s.data());
    const kernels::KernelTable& kt = kernels::Kernels();
    for (int64_t r = 0; r < k; ++r) {
      // As Sparsemax / Entmax15 weigh z over every row.
      const double z = config_.beta * s[r];
      double w;
      if (sep == SeparationKind::kSparsemax) {
        w = std::max(z - t.tau, 0.0);
      } else {
        const double d = std::max((z / 2 - t.shift) - t.tau, 0.0);
        w = d * d;
      }
      if (w == 0.0) continue;
      p.wsum += w;
      if (with_sum) {
        const float wf = static_cast<float>(w);
        kt.axpy_rows(patterns_.row(r), 1, n, &wf, p.sum.data());
      }
      if (l1) AddSigns(patterns_.row(r), x, n, w, &p.sign_sum);
      for (int j = 0; j < static_cast<int>(vsum.size()); ++j) {
        vsum[j] += w * values[r * value_dim + j];
      }
    }
  }
  if (values != nullptr) p.value.assign(vsum.begin(), vsum.end());
  return p;
}

void internal::SumsToPartial(const internal::FusedSums& s, StepPartial* p) {
  p->log_scale = s.log_scale;
  p->scale = s.scale;
  p->wsum = s.wsum;
  p->hsum = s.hsum;
  p->energy_terms = s.energy_terms;
  p->sq_x = s.sq_x;
}

absl::StatusOr<StepPartial> EnergyFunction::Partial(const float* x, bool with_sum,
                                                     bool track_nearest,
                                                     int64_t row_offset) const {
  const SimilarityKind sim = EffectiveSimilarity(config_);
  if (HasWholeRowForm(config_)) {
    if (patterns_.log_prior != nullptr) {
      return absl::UnimplementedError(
          "a row prior (decay with age) weighs softmax energies only; this energy has none");
    }
    return WholeRowPartial(x, with_sum, track_nearest, row_offset);
  }
  // The weights' rule depends on the family and separation alone (for L1
  // too, which the fused passes do not take).
  EnergyConfig rule_config = config_;
  if (sim == SimilarityKind::kNegL1) rule_config.similarity = SimilarityKind::kDot;
  std::unique_ptr<internal::RowWeights> rule = internal::MakeRowWeights(rule_config);
  if (rule == nullptr) {
    return absl::UnimplementedError("this energy has no partial form");
  }
  if (patterns_.log_prior != nullptr || sim == SimilarityKind::kNegL1) {
    return ReferencePartial(x, with_sum, *rule, track_nearest, row_offset);
  }
  const int n = patterns_.dim;
  StepPartial p;
  p.log_domain = rule->domain() == internal::WeightDomain::kLog;
  p.rows = patterns_.rows;
  if (with_sum) p.sum.assign(n, 0.f);
  if (patterns_.rows == 0) return p;
  const internal::FusedSums s = internal::FusedPass(
      patterns_, sim, x, *rule, with_sum ? p.sum.data() : nullptr, track_nearest);
  internal::SumsToPartial(s, &p);
  p.nearest_row = s.nearest_row >= 0 ? s.nearest_row + row_offset : -1;
  p.nearest_key = s.nearest_key;
  return p;
}

void EnergyFunction::TrackNearest(const float* x, const double* s, int64_t row_offset,
                                  StepPartial* p) const {
  const int n = patterns_.dim;
  const SimilarityKind sim = EffectiveSimilarity(config_);
  const double sqx = sim == SimilarityKind::kDot ? internal::SquaredNorm(x, n) : 0.0;
  for (int64_t r = 0; r < patterns_.rows; ++r) {
    double key;
    if (sim == SimilarityKind::kNegHalfSqL2) {
      key = s[r];
    } else if (sim == SimilarityKind::kDot) {
      key = s[r] - 0.5 * patterns_.sq_norms[r] - 0.5 * sqx;
    } else {
      const float* row = patterns_.row(r);
      double sq = 0.0;
      for (int i = 0; i < n; ++i) sq += (double{row[i]} - x[i]) * (double{row[i]} - x[i]);
      key = -0.5 * sq;
    }
    if (key > p->nearest_key) {
      p->nearest_key = key;
      p->nearest_row = r + row_offset;
    }
  }
}

absl::StatusOr<StepPartial> EnergyFunction::ReferencePartial(
    const float* x, bool with_sum, const internal::RowWeights& rule, bool track_nearest,
    int64_t row_offset) const {
  const bool log_domain = rule.domain() == internal::WeightDomain::kLog;
  if (patterns_.log_prior != nullptr && !log_domain) {
    return absl::UnimplementedError(
        "a row prior (decay with age) weighs softmax energies only; this energy has none");
  }
  const int n = patterns_.dim;
  const int64_t k = patterns_.rows;
  const bool l1 = EffectiveSimilarity(config_) == SimilarityKind::kNegL1;
  StepPartial p;
  p.log_domain = log_domain;
  p.rows = k;
  p.sq_x = internal::SquaredNorm(x, n);
  if (with_sum) p.sum.assign(n, 0.f);
  if (with_sum && l1) p.sign_sum.assign(n, 0.f);
  if (k == 0) return p;
  // The reference evaluation's similarities (a prior folded in as
  // S + b / beta) and the rule's weights of them, in double: log-weights
  // relative to their max, or linear weights over the least power of two
  // at least their largest magnitude (the fused passes' scales).
  std::vector<double> s(k), w(k), h(k);
  Similarities(x, s.data());
  // A prior's S + b / beta are no distances: the nearest row only for L1.
  if (track_nearest && l1 && patterns_.log_prior == nullptr) TrackNearest(x, s.data(), row_offset, &p);
  p.energy_terms = rule.Block(s.data(), k, w.data(), h.data());
  std::vector<double> wr(k);
  if (log_domain) {
    p.log_scale = *std::max_element(w.begin(), w.end());
    for (int64_t mu = 0; mu < k; ++mu) wr[mu] = std::exp(w[mu] - p.log_scale);
  } else {
    double m = 0.0;
    for (int64_t mu = 0; mu < k; ++mu) m = std::max({m, std::fabs(w[mu]), std::fabs(h[mu])});
    p.scale = m > 0.0 ? internal::PowerOfTwoCeil(m) : 1.0;
    p.log_scale = std::log(p.scale);
    for (int64_t mu = 0; mu < k; ++mu) {
      wr[mu] = w[mu] / p.scale;
      p.hsum += h[mu] / p.scale;
    }
  }
  std::vector<double> acc(with_sum ? n : 0, 0.0), sacc(with_sum && l1 ? n : 0, 0.0);
  for (int64_t mu = 0; mu < k; ++mu) {
    const double e = wr[mu];
    p.wsum += e;
    if (!with_sum || e == 0.0) continue;
    const float* row = patterns_.row(mu);
    for (int i = 0; i < n; ++i) acc[i] += e * row[i];
    if (!l1) continue;
    for (int i = 0; i < n; ++i) {
      const double d = double{row[i]} - x[i];  // dS/dx_i = sign(xi_i - x_i)
      sacc[i] += e * ((d > 0) - (d < 0));
    }
  }
  for (size_t i = 0; i < acc.size(); ++i) p.sum[i] = static_cast<float>(acc[i]);
  for (size_t i = 0; i < sacc.size(); ++i) p.sign_sum[i] = static_cast<float>(sacc[i]);
  return p;
}

absl::Status EnergyFunction::PartialBatch(const float* x, int64_t b, bool with_sum,
                                          std::vector<StepPartial>* out) const {
  const int n = patterns_.dim;
  out->clear();
  // The checks, and the one-state path where UpdateTargetBatch takes it.
  if (b == 0) return Partial(x, with_sum, false).status();
  if (patterns_.rows == 0 || b < internal::BatchMinStates(patterns_) ||
      patterns_.log_prior != nullptr || HasWholeRowForm(config_) ||
      EffectiveSimilarity(config_) == SimilarityKind::kNegL1) {
    out->reserve(b);
    for (int64_t q = 0; q < b; ++q) {
      ENGRAM_ASSIGN_OR_RETURN(StepPartial p, Partial(x + q * n, with_sum, false));
      out->push_back(std::move(p));
    }
    return absl::OkStatus();
  }
  ENGRAM_RETURN_IF_ERROR(Partial(x, false, false).status());  // the same refusals
  const SimilarityKind sim = EffectiveSimilarity(config_);
  std::unique_ptr<internal::RowWeights> rule = internal::MakeRowWeights(config_);
  std::vector<float> acc(with_sum ? b * n : 0);
  std::vector<internal::FusedSums> sums(b);
  internal::FusedPassBatch(patterns_, sim, x, b, *rule, with_sum ? acc.data() : nullptr,
                           sums.data(), false, nullptr);
  const bool log_domain = rule->domain() == internal::WeightDomain::kLog;
  out->resize(b);
  for (int64_t q = 0; q < b; ++q) {
    StepPartial& p = (*out)[q];
    p.log_domain = log_domain;
    p.rows = patterns_.rows;
    internal::SumsToPartial(sums[q], &p);
    if (with_sum) p.sum.assign(acc.begin() + q * n, acc.begin() + (q + 1) * n);
  }
  return absl::OkStatus();
}

absl::StatusOr<double> EnergyFunction::FinishPartial(const StepPartial& partial, const float* x,
                                                     float* target, float* grad) const {
  const int n = patterns_.dim;
  if ((target != nullptr || grad != nullptr) && partial.sum.size() != static_cast<size_t>(n)) {
    return absl::InvalidArgumentError(
        "a target or gradient needs a partial with the weighted sum of its rows");
  }
  if (partial.form == PartialForm::kSparsemax || partial.form == PartialForm::kEntmax15) {
    return absl::InvalidArgumentError(
        "a sparse separation's candidates finish only after their threshold (ThresholdPartial)");
  }
  const bool l1 = EffectiveSimilarity(config_) == SimilarityKind::kNegL1;
  if (grad != nullptr && l1 && partial.rows > 0 && partial.form != PartialForm::kTop &&
      partial.sign_sum.size() != static_cast<size_t>(n)) {
    return absl::InvalidArgumentError(
        "an L1 gradient needs a partial with the weighted sum of its rows' signs");
  }
  if (partial.rows > 0 && HasWholeRowForm(config_)) {
    return FinishWholeRow(config_, partial, x, target, grad);
  }
  const bool lse = config_.family == EnergyFamily::kLse;
  if (partial.rows == 0 || !(partial.wsum != 0.0 || partial.scale > 0.0 ||
                             std::isfinite(partial.log_scale))) {
    // No rows: the empty bank's answers (ReferenceUpdateTarget and
    // ReferenceValueAndGradient with k = 0): the state stays, and only lse
    // has a term, R(x) = |x|^2 / 2.
    if (target != nullptr) std::copy(x, x + n, target);
    if (grad != nullptr) {
      for (int i = 0; i < n; ++i) grad[i] = lse ? x[i] : 0.f;
    }
    return lse ? 0.5 * internal::SquaredNorm(x, n) : 0.0;
  }
  internal::FusedSums sums;
  sums.log_scale = partial.log_scale;
  sums.scale = partial.scale;
  sums.wsum = partial.wsum;
  sums.hsum = partial.hsum;
  sums.energy_terms = partial.energy_terms;
  sums.sq_x = partial.sq_x;
  double energy = 0.0;
  if (target != nullptr) {
    std::copy(partial.sum.begin(), partial.sum.end(), target);
    FinishFused(sums, partial.log_domain, x, target, nullptr, &energy);
  }
  if (grad != nullptr) {
    // L1: dS/dx = sign(xi - x), so the gradient sums the signs (no x term).
    const std::vector<float>& g = l1 ? partial.sign_sum : partial.sum;
    std::copy(g.begin(), g.end(), grad);
    FinishFused(sums, partial.log_domain, x, nullptr, grad, &energy);
  }
  if (target == nullptr && grad == nullptr) {
    FinishFused(sums, partial.log_domain, x, nullptr, nullptr, &energy);
  }
  return energy;
}

bool EnergyFunction::CompactEvaluate(const float* x, float* target, float* grad,
                                     double* energy, int64_t* nearest_row) const {
  internal::CompactSums sums;
  if (!internal::CompactPass(patterns_, config_, x, target != nullptr ? target : grad, &sums)) {
    return false;
  }
  const int n = patterns_.dim;
  *energy = sums.energy;
  if (nearest_row != nullptr) *nearest_row = sums.nearest_row;
  if (target != nullptr && sums.wsum == 0.0) {
    std::copy(x, x + n, target);  // no pattern in support: the state stays
  }
  if (grad != nullptr) {
    // -sum_mu w_mu dS_mu/dx with dS/dx = xi (kDot) or xi - x (kNegHalfSqL2).
    const float f = static_cast<float>(-sums.gradient_scale);
    for (int i = 0; i < n; ++i) grad[i] *= f;
    if (config_.similarity == SimilarityKind::kNegHalfSqL2) {
      const float ws = static_cast<float>(sums.gradient_scale * sums.wsum);
      for (int i = 0; i < n; ++i) grad[i] += ws * x[i];
    }
  }
  return true;
}

void EnergyFunction::FinishFused(const internal::FusedSums& sums, bool log_domain,
                                 const float* x, float* target, float* grad,
                                 double* energy) const {
  const int n = patterns_.dim;
  const SimilarityKind sim = EffectiveSimilarity(config_);
  // The pass's |x|^2 when it computed one (the same function, so the same value).
  const double sq_x = std::isnan(sums.sq_x) ? internal::SquaredNorm(x, n) : sums.sq_x;
  const double beta = config_.beta;
  // lse(beta s) for the softmax families.
  const double lse = log_domain ? sums.log_scale + std::log(sums.wsum) : 0.0;
  switch (config_.family) {
    case EnergyFamily::kExponential: *energy = -std::exp(lse); break;
    case EnergyFamily::kLse: *energy = -lse / beta + 0.5 * sq_x; break;
    default: *energy = log_domain ? -lse / beta : sums.energy_terms; break;
  }
  if (target == nullptr && grad == nullptr) return;
  const bool sign_invariant = config_.family == EnergyFamily::kClassical ||
                              config_.family == EnergyFamily::kPolynomial ||
                              config_.family == EnergyFamily::kExponential;
  // The pass left acc = sum_mu w_mu xi_mu / scale, with w = exp(beta s)
  // (softmax families) or F'(s) (the others).
  double to_exact;  // multiplies acc into sum_mu w_mu xi_mu with w = -dE/dS
  double wsum_exact;
  if (log_domain) {
    // -dE/dS is softmax(beta s) (lse, gaussian, UHN softmax) or
    // beta exp(beta s) = beta exp(lse) softmax (exponential).
    const double norm = config_.family == EnergyFamily::kExponential ? beta * std::exp(lse) : 1.0;
    to_exact = norm / sums.wsum;
    wsum_exact = norm;
  } else {
    to_exact = std::exp(sums.log_scale);
    wsum_exact = sums.wsum * to_exact;
  }
  if (target != nullptr) {
    // Sign-invariant bipolar families may return any positive multiple; the
    // softmax families return the normalised weighted sum.
    double f = to_exact;
    if (sign_invariant) f = log_domain ? 1.0 / sums.wsum : 1.0;
    if (f != 1.0) {
      const float ff = static_cast<float>(f);
      for (int i = 0; i < n; ++i) target[i] *= ff;
    }
    return;
  }
  // grad = -sum w xi (+ (sum w) x for the L2 similarity) (+ x for lse).
  const float g = static_cast<float>(-to_exact);
  double x_coeff = sim == SimilarityKind::kNegHalfSqL2 ? wsum_exact : 0.0;
  if (config_.family == EnergyFamily::kLse) x_coeff += 1.0;
  const float xc = static_cast<float>(x_coeff);
  for (int i = 0; i < n; ++i) grad[i] = g * grad[i] + xc * x[i];
}

void EnergyFunction::UpdateTargetBatch(const float* x, int64_t b, float* targets,
                                       double* energies, int64_t* nearest_rows) const {
  const int n = patterns_.dim;
  const SimilarityKind sim = EffectiveSimilarity(config_);
  std::unique_ptr<internal::RowWeights> rule = internal::MakeRowWeights(config_);
  // Few states: one streaming pass each is faster (BatchMinStates).
  if (patterns_.rows == 0 || rule == nullptr || sim == SimilarityKind::kNegL1 ||
      b < internal::BatchMinStates(patterns_) || patterns_.log_prior != nullptr) {
    for (int64_t q = 0; q < b; ++q) {
      double e;
      if (FusedEvaluate(x + q * n, targets != nullptr ? targets + q * n : nullptr, nullptr, &e,
                        nearest_rows != nullptr ? nearest_rows + q : nullptr)) {
        energies[q] = e;
      } else {
        if (nearest_rows != nullptr) nearest_rows[q] = -1;
        energies[q] = targets != nullptr ? ReferenceUpdateTarget(x + q * n, targets + q * n)
                                         : ReferenceValue(x + q * n);
      }
    }
    return;
  }
  std::vector<internal::FusedSums> sums(b);
  internal::FusedPassBatch(patterns_, sim, x, b, *rule, targets, sums.data(),
                           nearest_rows != nullptr, nearest_rows);
  const bool log_domain = rule->domain() == internal::WeightDomain::kLog;
  // Per state a few passes over its n values; both cores take states (the
  // pass's threads are idle here).
  int used = 1;
  internal::ParallelRows(b, int64_t{n} * 12, [&](int, int64_t q_begin, int64_t q_end) {
    for (int64_t q = q_begin; q < q_end; ++q) {
      if (nearest_rows != nullptr) nearest_rows[q] = sums[q].nearest_row;
      FinishFused(sums[q], log_domain, x + q * n, targets != nullptr ? targets + q * n : nullptr,
                  nullptr, &energies[q]);
    }
  }, &used);
}

double EnergyFunction::Value(const float* x) const {
  double e;
  if (FusedEvaluate(x, nullptr, nullptr, &e)) return e;
  return ReferenceValue(x);
}

double EnergyFunction::ValueAndNearest(const float* x, int64_t* nearest_row) const {
  double e;
  if (FusedEvaluate(x, nullptr, nullptr, &e, nearest_row)) return e;
  *nearest_row = -1;
  return ReferenceValue(x);
}

double EnergyFunction::ValueAndGradient(const float* x, float* grad) const {
  double e;
  if (FusedEvaluate(x, nullptr, grad, &e)) return e;
  return ReferenceValueAndGradient(x, grad);
}

double EnergyFunction::UpdateTarget(const float* x, float* target) const {
  double e;
  if (FusedEvaluate(x, target, nullptr, &e)) return e;
  return ReferenceUpdateTarget(x, target);
}

double EnergyFunction::UpdateTarget(const float* x, float* target, int64_t* nearest_row) const {
  double e;
  if (FusedEvaluate(x, target, nullptr, &e, nearest_row)) return e;
  *nearest_row = -1;
  return ReferenceUpdateTarget(x, target);
}

}  // namespace engram::core
