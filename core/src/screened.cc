#include "screened.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "engram/core/compute.h"
#include "fold.h"
#include "kernels/kernels.h"
#include "parallel.h"
#include "state_loops.h"

namespace engram::core::internal {
namespace {

// A state against a screened view: the state as int8 (x~ = t u), and each
// row's screened dot product with the bound on its distance to the f32
// pass's dot product (from ScreenRow's norms, rounded up).
class Screen {
 public:
  Screen(const PatternView& view, SimilarityKind similarity, const float* x)
      : view_(view), n_(view.dim), xq_(view.dim),
        l2_(similarity == SimilarityKind::kNegHalfSqL2) {
    sqx_ = SquaredNorm(x, n_);
    if (!std::isfinite(sqx_)) return;  // not screened: ScreenedPass gives up
    t_ = kernels::QuantizeToInt8(x, n_, xq_.data());
    double dx2_lanes[kLoopLanes] = {};
    int i = 0;
    for (; i + kLoopLanes <= n_; i += kLoopLanes) {
#pragma GCC unroll 8
      for (int j = 0; j < kLoopLanes; ++j) {
        const double d = double{x[i + j]} - t_ * xq_[i + j];
        dx2_lanes[j] += d * d;
      }
    }
    for (; i < n_; ++i) dx2_lanes[0] += (double{x[i]} - t_ * xq_[i]) * (double{x[i]} - t_ * xq_[i]);
    double dx2 = 0.0;
    for (double d : dx2_lanes) dx2 += d;
    const double up = 1.0 + 0x1p-30;  // covers the double sums' rounding (n <= 2^17)
    xnorm_ = std::sqrt(sqx_) * up;
    // The product scale t D (exact D, two floats) rounds by at most
    // 2^-52 |xi~| |x~| <= 2^-40 norm (|x| + |x - x~|).
    dxnorm_ = (std::sqrt(dx2) * up) * (1.0 + 0x1p-40) + 0x1p-40 * xnorm_;
  }

  double sqx() const { return sqx_; }
  // The int8 dots of rows [first, first + count).
  void Dots(int64_t first, int64_t count, int32_t* dots) const {
    kernels::Kernels().dot_rows_i8(view_.screen + first * n_, count, n_, xq_.data(),
                                   view_.screen_sums + first, dots);
  }
  // Row r's screened dot product from its int8 dot d, and its error bound.
  std::pair<double, double> Bounded(int64_t r, int32_t d) const {
    const ScreenRow& sr = view_.screen_rows[r];
    return {double{sr.scale} * t_ * d, double{sr.err} * xnorm_ + double{sr.norm} * dxnorm_};
  }
  // The similarity from a dot product (FusedPass's exact expression).
  double Sim(double dot, int64_t r) const {
    return l2_ ? dot - 0.5 * view_.sq_norms[r] - 0.5 * sqx_ : dot;
  }

 private:
  const PatternView& view_;
  int n_;
  std::vector<int8_t> xq_;
  bool l2_;
  double sqx_ = 0.0, t_ = 0.0, xnorm_ = 0.0, dxnorm_ = 0.0;
};

constexpr int64_t kChunk = 1024;

// Phase 1: every row's int8 dot into dots, and the largest lower bound of
// a log-weight (*w_lo) and of a nearest key x.xi - |xi|^2 / 2 (*key_lo).
void ScreenAll(const PatternView& view, const Screen& screen, double beta, int32_t* dots,
               double* w_lo, double* key_lo) {
  const int parts = static_cast<int>(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(view.rows, 1)));
  std::vector<double> wls(parts, -INFINITY), kls(parts, -INFINITY);
  int used = 1;
  ParallelRows(view.rows, int64_t{view.dim}, [&](int part, int64_t begin, int64_t end) {
    double wl = -INFINITY, kl = -INFINITY;
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      screen.Dots(b, count, &dots[b]);
      for (int64_t r = b; r < b + count; ++r) {
        const auto [s, e] = screen.Bounded(r, dots[r]);
        wl = std::max(wl, beta * screen.Sim(s - e, r));
        kl = std::max(kl, s - e - 0.5 * view.sq_norms[r]);
      }
    }
    wls[part] = wl;
    kls[part] = kl;
  }, &used);
  *w_lo = -INFINITY;
  *key_lo = -INFINITY;
  for (int i = 0; i < used; ++i) {
    *w_lo = std::max(*w_lo, wls[i]);
    *key_lo = std::max(*key_lo, kls[i]);
  }
}

// Phase 2: the rows that can matter, in row order (log-weight upper bound
// within log(negligible) of wl, or with track_nearest a nearest key upper
// bound at or above kl); *rest_sum receives the others' screened weights
// relative to wl. False when more than max(1024, rows / 16) rows can matter.
bool SelectCandidates(const PatternView& view, const Screen& screen, double beta,
                      const int32_t* dots, double wl, double kl, bool track_nearest,
                      std::vector<int64_t>* cand, double* rest_sum) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int64_t rows = view.rows;
  const double log_negligible =
      std::log(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1)));
  const int64_t max_candidates = std::max<int64_t>(1024, rows / 16);
  const int parts = static_cast<int>(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)));
  std::vector<std::vector<int64_t>> found(parts);
  std::vector<double> rest(parts, 0.0);
  std::atomic<int64_t> total{0};
  int used = 1;
  ParallelRows(rows, 64, [&](int part, int64_t begin, int64_t end) {
    std::vector<int64_t>& mine = found[part];
    double sum = 0.0;
    double w[kChunk];
    float unused[kChunk];
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r = b + i;
        const auto [sr, e] = screen.Bounded(r, dots[r]);
        const double hi = sr + e;
        if (beta * screen.Sim(hi, r) >= wl + log_negligible ||
            (track_nearest && hi - 0.5 * view.sq_norms[r] >= kl)) {
          mine.push_back(r);
          if (total.fetch_add(1, std::memory_order_relaxed) >= max_candidates) return;
          w[i] = -INFINITY;  // a candidate: weighed from its f32 row
          continue;
        }
        w[i] = beta * screen.Sim(sr, r) - wl;
      }
      sum += k.exp_weights(w, count, 0.0, -50.0, unused);
    }
    rest[part] = sum;
  }, &used);
  if (total.load() > max_candidates) return false;
  *rest_sum = 0.0;
  for (int i = 0; i < used; ++i) {
    cand->insert(cand->end(), found[i].begin(), found[i].end());
    *rest_sum += rest[i];
  }
  return true;
}

// Phase 3: the candidates' exact f32 scores, as the f32 pass computes them,
// their weights and weighted sum, and the nearest row among them. False
// when no candidate has a finite log-weight.
bool WeighCandidates(const PatternView& view, const Screen& screen, const float* x, double beta,
                     const std::vector<int64_t>& cand, double wl, double rest_sum, float* acc,
                     bool track_nearest, FusedSums* out) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  std::vector<double> w(cand.size());
  double top = -INFINITY;
  out->nearest_row = -1;
  out->nearest_key = -INFINITY;
  for (size_t c = 0; c < cand.size(); ++c) {
    const int64_t r = cand[c];
    float dot;
    k.dot_rows(view.data + r * n, 1, n, x, &dot);
    w[c] = beta * screen.Sim(double{dot}, r);
    top = std::max(top, w[c]);
    if (track_nearest) {
      const double key = double{dot} - 0.5 * view.sq_norms[r] - 0.5 * screen.sqx();
      if (key > out->nearest_key) {  // candidates are in row order
        out->nearest_key = key;
        out->nearest_row = r;
      }
    }
  }
  if (!std::isfinite(top)) return false;
  const float negligible =
      static_cast<float>(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(view.rows, 1)));
  if (acc != nullptr) std::fill(acc, acc + n, 0.f);
  double wsum = rest_sum * std::exp(wl - top);
  for (size_t c = 0; c < cand.size(); ++c) {
    const double e = std::exp(w[c] - top);
    wsum += e;
    const float ef = static_cast<float>(e);
    if (acc != nullptr && ef >= negligible) k.axpy_rows(view.data + cand[c] * n, 1, n, &ef, acc);
  }
  out->log_scale = top;
  out->wsum = wsum;
  return true;
}

}  // namespace

bool ScreenedPass(const PatternView& view, SimilarityKind similarity, const float* x,
                  double beta, float* acc, bool track_nearest, FusedSums* out) {
  const Screen screen(view, similarity, x);
  if (!std::isfinite(screen.sqx())) return false;
  // The int8 dots, in a buffer of the calling thread kept between passes (a
  // fresh one is an mmap above ~128 KB, whose pages fault in on every pass).
  // No pass starts inside another on the same thread.
  thread_local std::vector<int32_t> dot_buffer;
  if (dot_buffer.size() < static_cast<size_t>(view.rows)) dot_buffer.resize(view.rows);
  int32_t* const dots = dot_buffer.data();
  double wl, kl;
  ScreenAll(view, screen, beta, dots, &wl, &kl);
  if (!std::isfinite(wl)) return false;
  std::vector<int64_t> cand;
  double rest_sum = 0.0;
  if (!SelectCandidates(view, screen, beta, dots, wl, kl, track_nearest, &cand, &rest_sum) ||
      !WeighCandidates(view, screen, x, beta, cand, wl, rest_sum, acc, track_nearest, out)) {
    return false;
  }
  out->hsum = 0.0;
  out->energy_terms = 0.0;
  out->x_bipolar = false;
  out->sq_x = screen.sqx();
  return true;
}

}  // namespace engram::core::internal
