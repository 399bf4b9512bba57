#include "screened.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <sched.h>
#include <unistd.h>
#include <thread>
#include <vector>

#include "engram/core/compute.h"
#include "kernels/kernels.h"

extern "C" {
#include <cblas.h>
}
#include "fold.h"
#include "parallel.h"
#include "state_loops.h"

namespace engram::core::internal {

// The screened softmax pass (see FusedPass): false when too many rows can be
// significant for the screen to save reads.
bool ScreenedPass(const PatternView& view, SimilarityKind similarity, const float* x,
                  double beta, float* acc, bool track_nearest, FusedSums* out) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const int64_t rows = view.rows;
  const double sqx = SquaredNorm(x, n);
  if (!std::isfinite(sqx)) return false;
  // The state as int8 (x~ = t u) and the two norms of the screen's bound
  // (ScreenRow), rounded up.
  std::vector<int8_t> xq(n);
  const double t = kernels::QuantizeToInt8(x, n, xq.data());
  double dx2_lanes[kLoopLanes] = {};
  int i = 0;
  for (; i + kLoopLanes <= n; i += kLoopLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLoopLanes; ++j) {
      const double d = double{x[i + j]} - t * xq[i + j];
      dx2_lanes[j] += d * d;
    }
  }
  for (; i < n; ++i) dx2_lanes[0] += (double{x[i]} - t * xq[i]) * (double{x[i]} - t * xq[i]);
  double dx2 = 0.0;
  for (double d : dx2_lanes) dx2 += d;
  const double up = 1.0 + 0x1p-30;  // covers the double sums' rounding (n <= 2^17)
  const double xnorm = std::sqrt(sqx) * up;
  // The product scale t D (exact D, two floats) rounds by at most
  // 2^-52 |xi~| |x~| <= 2^-40 norm (|x| + |x - x~|).
  const double dxnorm = (std::sqrt(dx2) * up) * (1.0 + 0x1p-40) + 0x1p-40 * xnorm;
  const bool l2 = similarity == SimilarityKind::kNegHalfSqL2;
  // Similarity from a dot product (exact expression of FusedPass).
  auto sim = [&](double dot, int64_t r) {
    return l2 ? dot - 0.5 * view.sq_norms[r] - 0.5 * sqx : dot;
  };
  // Row r's screened dot product from its int8 dot D, and the bound on its
  // distance to the f32 pass's dot product.
  auto screened = [&](int64_t r, int32_t d) {
    const ScreenRow& sr = view.screen_rows[r];
    return std::pair{double{sr.scale} * t * d, double{sr.err} * xnorm + double{sr.norm} * dxnorm};
  };
  // The int8 dots, in a buffer of the calling thread kept between passes (a
  // fresh one is an mmap above ~128 KB, whose pages fault in on every pass).
  // No pass starts inside another on the same thread.
  thread_local std::vector<int32_t> dot_buffer;
  if (dot_buffer.size() < static_cast<size_t>(rows)) dot_buffer.resize(rows);
  int32_t* const dots = dot_buffer.data();
  // Phase 1: screened dots, and per range the largest lower bound of a
  // log-weight and of a nearest key (x.xi - |xi|^2 / 2).
  const int parts = static_cast<int>(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)));
  std::vector<double> w_lo(parts, -INFINITY), key_lo(parts, -INFINITY);
  constexpr int64_t kChunk = 1024;
  int used = 1;
  ParallelRows(rows, int64_t{n}, [&](int part, int64_t begin, int64_t end) {
    double wl = -INFINITY, kl = -INFINITY;
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      k.dot_rows_i8(view.screen + b * n, count, n, xq.data(), view.screen_sums + b, &dots[b]);
      for (int64_t r = b; r < b + count; ++r) {
        const auto [s, e] = screened(r, dots[r]);
        wl = std::max(wl, beta * sim(s - e, r));
        kl = std::max(kl, s - e - 0.5 * view.sq_norms[r]);
      }
    }
    w_lo[part] = wl;
    key_lo[part] = kl;
  }, &used);
  double wl = -INFINITY, kl = -INFINITY;
  for (int i = 0; i < used; ++i) {
    wl = std::max(wl, w_lo[i]);
    kl = std::max(kl, key_lo[i]);
  }
  if (!std::isfinite(wl)) return false;
  // Phase 2: the rows that can matter (log-weight upper bound within
  // log(negligible) of the largest lower bound, or a nearest key upper bound
  // at or above the best lower bound); the others' screened weights relative
  // to wl go into the sum of weights.
  const double log_negligible =
      std::log(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1)));
  const int64_t max_candidates = std::max<int64_t>(1024, rows / 16);
  std::vector<std::vector<int64_t>> found(parts);
  std::vector<double> rest(parts, 0.0);
  std::atomic<int64_t> total{0};
  ParallelRows(rows, 64, [&](int part, int64_t begin, int64_t end) {
    std::vector<int64_t>& mine = found[part];
    double sum = 0.0;
    double w[kChunk];
    float unused[kChunk];
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r = b + i;
        const auto [sr, e] = screened(r, dots[r]);
        const double hi = sr + e;
        if (beta * sim(hi, r) >= wl + log_negligible ||
            (track_nearest && hi - 0.5 * view.sq_norms[r] >= kl)) {
          mine.push_back(r);
          if (total.fetch_add(1, std::memory_order_relaxed) >= max_candidates) return;
          w[i] = -INFINITY;  // a candidate: weighed from its f32 row
          continue;
        }
        w[i] = beta * sim(sr, r) - wl;
      }
      sum += k.exp_weights(w, count, 0.0, -50.0, unused);
    }
    rest[part] = sum;
  }, &used);
  if (total.load() > max_candidates) return false;
  // Phase 3: the candidates' exact f32 scores, as the f32 pass computes them.
  std::vector<int64_t> cand;
  double rest_sum = 0.0;
  for (int i = 0; i < used; ++i) {
    cand.insert(cand.end(), found[i].begin(), found[i].end());
    rest_sum += rest[i];
  }
  std::vector<double> w(cand.size());
  double top = -INFINITY;
  out->nearest_row = -1;
  out->nearest_key = -INFINITY;
  for (size_t c = 0; c < cand.size(); ++c) {
    const int64_t r = cand[c];
    float dot;
    k.dot_rows(view.data + r * n, 1, n, x, &dot);
    w[c] = beta * sim(double{dot}, r);
    top = std::max(top, w[c]);
    if (track_nearest) {
      const double key = double{dot} - 0.5 * view.sq_norms[r] - 0.5 * sqx;
      if (key > out->nearest_key) {  // candidates are in row order
        out->nearest_key = key;
        out->nearest_row = r;
      }
    }
  }
  if (!std::isfinite(top)) return false;
  const float negligible =
      static_cast<float>(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1)));
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
  out->hsum = 0.0;
  out->energy_terms = 0.0;
  out->x_bipolar = false;
  out->sq_x = sqx;
  return true;
}

}  // namespace engram::core::internal
