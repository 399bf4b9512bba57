#include "fused.h"

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
#include "screened.h"
#include "state_loops.h"

namespace engram::core::internal {

FusedSums FusedPass(const PatternView& view, SimilarityKind similarity, const float* x,
                    const RowWeights& rule, float* acc, bool track_nearest, int64_t hint_row) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const int64_t rows = view.rows;
  const bool log_domain = rule.domain() == WeightDomain::kLog;
  FusedSums out;
  if (log_domain && view.screen != nullptr && view.bf16 == nullptr &&
      rule.log_weight_slope() > 0.0 &&
      (similarity == SimilarityKind::kDot || similarity == SimilarityKind::kNegHalfSqL2) &&
      !(view.bits != nullptr && IsBipolar(x, n)) &&
      ScreenedPass(view, similarity, x, rule.log_weight_slope(), acc, track_nearest, &out)) {
    return out;
  }

  std::vector<uint64_t> xbits;
  out.x_bipolar = view.bits != nullptr && IsBipolar(x, n);
  if (out.x_bipolar) {
    xbits.assign(kernels::BitWords(n), 0);
    for (int i = 0; i < n; ++i) xbits[i >> 6] |= uint64_t{x[i] > 0} << (i & 63);
  }
  const bool use_bf16 = !out.x_bipolar && view.bf16 != nullptr;
  const int64_t row_bytes = out.x_bipolar ? kernels::BitWords(n) * 8
                            : use_bf16    ? int64_t{n} * 2
                                          : int64_t{n} * 4;
  // Nearest-pattern keys use exactly Bank::Nearest's expression, so both
  // pick the same row; bf16 scores are not exact, so not there.
  const bool nearest = track_nearest && !use_bf16;
  const double sqx =
      similarity == SimilarityKind::kNegHalfSqL2 || nearest ? SquaredNorm(x, n) : 0.0;
  if (similarity == SimilarityKind::kNegHalfSqL2 || nearest) out.sq_x = sqx;
  // bf16 blocks are 4x larger: the bf16 dot kernel splits the state once
  // per call (4096 values at N = 4096 against 16 rows of a 128 KB block),
  // and the block is still re-read from L2 by the weighted sum.
  const int64_t block_bytes = use_bf16 ? 4 * kBlockBytes : kBlockBytes;
  const int64_t block = std::clamp<int64_t>(block_bytes / std::max<int64_t>(row_bytes, 1), 8, 1024);
  // Weights (relative to the running scale, which only grows) below this
  // are left out of the weighted sum; see kNegligibleWeightMass.
  const double negligible_mass = kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1));
  const float negligible = static_cast<float>(negligible_mass);
  const double log_negligible = std::log(negligible_mass);
  auto score_rows = [&](int64_t b, int64_t count, float* sc) {
    if (out.x_bipolar) {
      k.dot_rows_bits(view.bits + b * kernels::BitWords(n), count, n, xbits.data(), sc);
    } else if (use_bf16) {
      k.dot_rows_bf16(view.bf16 + b * n, count, n, x, sc);
    } else {
      k.dot_rows(view.data + b * n, count, n, x, sc);
    }
  };
  auto similarity_of = [&](float sc, int64_t row) {
    return similarity == SimilarityKind::kNegHalfSqL2
               ? double{sc} - 0.5 * view.sq_norms[row] - 0.5 * sqx
               : double{sc};
  };
  // Log domain: a lower bound on the largest log-weight of the whole pass,
  // shared by the threads (each raises it to its running max) and seeded
  // with the hint row's log-weight. Rows more than log(negligible) below
  // it are negligible against the final scale too, long before a thread's
  // own running max reaches the winner.
  std::atomic<double> floor{-INFINITY};
  if (log_domain && hint_row >= 0 && hint_row < rows) {
    float sc1;
    score_rows(hint_row, 1, &sc1);
    const double s1 = similarity_of(sc1, hint_row);
    double w1 = -INFINITY, h1 = 0.0;
    rule.Block(&s1, 1, &w1, &h1);
    if (!std::isnan(w1)) floor.store(w1, std::memory_order_relaxed);
  }
  // On bits the scores cost ~1/30 of the masked adds of the weighted sum:
  // a scores-only pre-pass finds the exact largest log-weight, so the main
  // pass adds only the rows that matter even before it meets the winner.
  // The pre-pass keeps the scores (4 bytes a row against the row's ~N/8),
  // and the main pass reads them instead of scoring again. On bf16 rows the
  // same holds for the widening weighted sum (without it, a sharp softmax
  // adds every row before the winner, half the bank on average): the main
  // pass then reads only the significant rows again, so a bf16 pass reads
  // the bank once, plus those rows. (Without a hint row only: a hint already
  // bounds the scale from the first block on.)
  std::vector<float> prescores;
  // Log-weights increasing in the raw score (slope * dot product): a
  // block's largest one comes from its largest score alone.
  const bool monotone = log_domain && rule.log_weight_slope() > 0.0 &&
                        similarity == SimilarityKind::kDot;
  if (log_domain && acc != nullptr &&
      (out.x_bipolar || (use_bf16 && !(hint_row >= 0 && hint_row < rows)))) {
    prescores.resize(rows);
    std::vector<double> maxima(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)),
                               -INFINITY);
    int used_ranges = 1;
    ParallelRows(rows, row_bytes, [&](int part, int64_t begin, int64_t end) {
      BlockScratch& bs = ThreadScratch(block);
      std::vector<double>& s = bs.s;
      std::vector<double>& w = bs.w;
      std::vector<double>& h = bs.h;
      double m = -INFINITY;
      for (int64_t b = begin; b < end; b += block) {
        const int64_t count = std::min(block, end - b);
        float* sc = prescores.data() + b;
        score_rows(b, count, sc);
        if (monotone) {  // the largest log-weight is slope times the largest score
          float fm = -INFINITY;
          for (int64_t i = 0; i < count; ++i) fm = sc[i] > fm ? sc[i] : fm;
          const double s1 = fm;
          double w1 = -INFINITY, h1 = 0.0;
          rule.Block(&s1, 1, &w1, &h1);
          m = std::max(m, w1);
          continue;
        }
        for (int64_t i = 0; i < count; ++i) s[i] = similarity_of(sc[i], b + i);
        rule.Block(s.data(), count, w.data(), h.data());
        for (int64_t i = 0; i < count; ++i) m = std::max(m, w[i]);
      }
      maxima[part] = m;
    }, &used_ranges);
    double m = floor.load(std::memory_order_relaxed);
    for (int i = 0; i < used_ranges; ++i) m = std::max(m, maxima[i]);
    floor.store(m, std::memory_order_relaxed);
  }

  // Bit-packed rows with an affine integer rule (classical, quadratic,
  // identity: every weight significant): a block's weights, sums, nearest
  // row and weighted sum come exactly from the integer overlaps d in the
  // kernels' vector code, with no per-row work in double. The weights
  // a d + b share the power of two 2^shift (d has n's parity, so a d + b =
  // (a n + b) - 2 a p for integer p); over it they take the 16-bit kernel
  // when (|a| n + |b|) / 2^shift <= 32767.
  AffineIntegerForm form;
  int shift = 0;
  bool integer_rule = out.x_bipolar && !log_domain && similarity == SimilarityKind::kDot &&
                      rule.affine_integer_form(&form);
  const int64_t w_bound = std::abs(int64_t{form.a}) * n + std::abs(int64_t{form.b});  // >= |w|
  integer_rule = integer_rule && w_bound <= INT32_MAX;
  if (integer_rule && acc != nullptr) {
    const uint32_t lead = static_cast<uint32_t>(std::abs(form.a * n + form.b));
    const uint32_t step = static_cast<uint32_t>(std::abs(2 * form.a));
    const uint32_t both = lead | step;
    shift = both == 0 ? 0 : __builtin_ctz(both);
    integer_rule = k.axpy_rows_bits_i16 != nullptr && (w_bound >> shift) <= 32767;
  }
  auto add_integer_block = [&](int64_t b, int64_t count, int64_t end, const float* sc,
                               std::vector<int16_t>* w16, Partial* p) {
    kernels::OverlapStats st;
    k.overlap_weights(sc, count, form.a, form.b, shift, acc != nullptr ? w16->data() : nullptr, &st);
    p->integer = true;
    p->energy += form.e2 * st.sum_sq + form.e1 * static_cast<double>(st.sum);
    p->iwsum += int64_t{form.a} * st.sum + int64_t{form.b} * count;
    p->ihsum += int64_t{form.c} * count;
    const int64_t wmax = std::max(std::abs(int64_t{form.a} * static_cast<int64_t>(st.max) + form.b),
                                  std::abs(int64_t{form.a} * static_cast<int64_t>(st.min) + form.b));
    p->imax = std::max({p->imax, wmax, std::abs(int64_t{form.c})});
    if (nearest) {
      // Bit rows are +-1 patterns (|xi|^2 = n for each): the nearest row of
      // the block is its first row of largest overlap.
      const int64_t r = b + st.argmax;
      const double key = double{sc[st.argmax]} - 0.5 * view.sq_norms[r] - 0.5 * sqx;
      if (key > p->nearest_key) {
        p->nearest_key = key;
        p->nearest_row = r;
      }
    }
    if (acc == nullptr || wmax == 0) return;
    // The weighted sum adds into 32-bit sums across blocks while they
    // cannot overflow (a bound of count * max |w| / 2^shift per block).
    const int64_t bound = count * (wmax >> shift);
    if (p->ibound + bound > INT32_MAX) p->FlushInt32(shift);
    p->ibound += bound;
    // The weighted sum re-reads the block from L2 and is compute-bound: the
    // kernel asks for the next block's rows one by one as it adds these, so
    // the memory system is not idle meanwhile (a burst of prefetches before
    // the call mostly waited for them: 7.0 against 6.0 ms a step at
    // 784 x 10^6).
    const int64_t words = kernels::BitWords(n);
    k.axpy_rows_bits_i16(view.bits + b * words, count, n, w16->data(), p->iacc32.data(),
                         view.bits + (b + count) * words, std::min(block, end - b - count));
  };
  std::vector<Partial> partials(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)));
  auto run = [&](int part, int64_t begin, int64_t end) {
    Partial& p = partials[part];
    if (acc != nullptr) p.acc.assign(n, 0.f);
    BlockScratch& bs = ThreadScratch(block);
    std::vector<float>& sc_buf = bs.sc;
    std::vector<float>& wf = bs.wf;
    std::vector<double>& s = bs.s;
    std::vector<double>& w = bs.w;
    std::vector<double>& h = bs.h;
    std::vector<std::pair<int64_t, int64_t>>& runs = bs.runs;  // [first, last) rows to add
    std::vector<int16_t>& wi = bs.wi;
    if (integer_rule && acc != nullptr) {
      p.iacc.assign(n, 0);
      p.iacc32.assign(n, 0);
    }
    for (int64_t b = begin; b < end; b += block) {
      const int64_t count = std::min(block, end - b);
      const float* sc = prescores.empty() ? sc_buf.data() : prescores.data() + b;
      if (prescores.empty()) score_rows(b, count, sc_buf.data());
      if (integer_rule) {
        add_integer_block(b, count, end, sc, &wi, &p);
        continue;
      }
      if (nearest) {
        // A branch-free f32 screen of the block; only a block that may hold
        // a better row runs the exact double comparison (the f32 key is off
        // by at most 2^-22 (|sc| + |xi|^2 / 2) from the exact one).
        float block_best = -INFINITY, block_mag = 0.f;
        for (int64_t i = 0; i < count; ++i) {
          const float half_sq = 0.5f * view.sq_norms[b + i];
          const float key = sc[i] - half_sq;
          block_best = key > block_best ? key : block_best;
          const float mag = std::fabs(sc[i]) + half_sq;
          block_mag = mag > block_mag ? mag : block_mag;
        }
        if (double{block_best} + 0x1p-20 * double{block_mag} >= p.nearest_key + 0.5 * sqx ||
            p.nearest_row < 0) {
          for (int64_t i = 0; i < count; ++i) {
            const double key = double{sc[i]} - 0.5 * view.sq_norms[b + i] - 0.5 * sqx;
            if (key > p.nearest_key) {
              p.nearest_key = key;
              p.nearest_row = b + i;
            }
          }
        }
      }
      if (!prescores.empty() && monotone) {
        // As below, from the block's largest score, before any per-row work.
        float fm = -INFINITY;
        bool nan = false;
        for (int64_t i = 0; i < count; ++i) {
          fm = sc[i] > fm ? sc[i] : fm;
          nan |= std::isnan(sc[i]);
        }
        const double s1 = fm;
        double w1 = -INFINITY, h1 = 0.0;
        rule.Block(&s1, 1, &w1, &h1);
        if (!nan && w1 < floor.load(std::memory_order_relaxed) - 50.0) continue;
      }
      for (int64_t i = 0; i < count; ++i) s[i] = similarity_of(sc[i], b + i);
      p.energy += rule.Block(s.data(), count, w.data(), h.data());
      if (!prescores.empty()) {
        // The pre-pass made the floor the exact largest log-weight: a block
        // whose every log-weight is more than 50 below it adds nothing to
        // the sums (FoldBlock would cut each of its terms) nor to acc. A NaN
        // weight is never skipped: it must reach the sums.
        double bm = -INFINITY;
        bool nan = false;
        for (int64_t i = 0; i < count; ++i) {
          bm = w[i] > bm ? w[i] : bm;
          nan |= std::isnan(w[i]);
        }
        if (!nan && bm < floor.load(std::memory_order_relaxed) - 50.0) continue;
      }
      if (!FoldBlock(log_domain, w.data(), h.data(), count, &p.sums,
                     acc != nullptr ? p.acc.data() : nullptr, n, wf.data(),
                     floor.load(std::memory_order_relaxed))) {
        continue;
      }
      if (acc == nullptr) continue;
      if (log_domain) {
        // Publish this thread's running max; cut at the best bound known.
        double f = floor.load(std::memory_order_relaxed);
        while (p.sums.log_scale > f &&
               !floor.compare_exchange_weak(f, p.sums.log_scale, std::memory_order_relaxed)) {
        }
        const double cut = std::max(f, p.sums.log_scale) + log_negligible;
        for (int64_t i = 0; i < count; ++i) {
          if (w[i] < cut) wf[i] = 0.f;
        }
      }
      // Integer weights on bits (classical, polynomial) take one exact
      // integer pass over the block, with no negligible runs to find.
      const bool integer_bits = out.x_bipolar && !log_domain && k.axpy_rows_bits_i16 != nullptr;
      auto find_runs = [&] {
        runs.clear();
        for (int64_t i = 0; i < count;) {
          if (!(std::fabs(wf[i]) >= negligible)) {
            ++i;
            continue;
          }
          int64_t j = i + 1;
          while (j < count && std::fabs(wf[j]) >= negligible) ++j;
          runs.emplace_back(i, j);
          i = j;
        }
      };
      if (!integer_bits) {
        find_runs();
        if (runs.empty()) continue;
      }
      if (integer_bits) {
        if (AddIntegerBitRows(k, view.bits + b * kernels::BitWords(n), count, n, w.data(),
                              p.sums.scale, &bs.wide, &wi, &bs.iacc, p.acc.data())) {
          continue;
        }
        find_runs();  // weights that are not integers: the float kernel
      }
      for (const auto& [first, last] : runs) {
        const int64_t r = b + first, len = last - first;
        if (out.x_bipolar) {
          k.axpy_rows_bits(view.bits + r * kernels::BitWords(n), len, n, wf.data() + first,
                           p.acc.data());
        } else if (use_bf16) {
          k.axpy_rows_bf16(view.bf16 + r * n, len, n, wf.data() + first, p.acc.data());
        } else {
          k.axpy_rows(view.data + r * n, len, n, wf.data() + first, p.acc.data());
        }
      }
    }
    if (p.integer) FoldIntegerSums(&p, acc != nullptr, n, shift);
  };
  int used = 1;
  // A bit-packed pass whose weights are all significant (the linear domain:
  // classical, polynomial) costs one masked add per 16 values of every row,
  // about what streaming an f32 row's n values costs in bytes / 4 (measured
  // 12 ns a row at N = 784 on AVX-512): it is split over threads from far
  // fewer rows than its n / 8 bytes a row would suggest.
  const int64_t cost_per_row =
      out.x_bipolar && !log_domain && acc != nullptr ? std::max<int64_t>(row_bytes, n) : row_bytes;
  ParallelRows(rows, cost_per_row, run, &used);

  // Exact merge: rescale every partial to the largest scale.
  double top = -INFINITY, top_scale = 0.0;
  for (int i = 0; i < used; ++i) {
    top = std::max(top, partials[i].sums.LogScale(log_domain));
    top_scale = std::max(top_scale, partials[i].sums.scale);
  }
  out.log_scale = top;
  if (acc != nullptr) std::fill(acc, acc + n, 0.f);
  for (int i = 0; i < used; ++i) {
    const Partial& p = partials[i];
    out.energy_terms += p.energy;
    if (nearest && p.nearest_key > out.nearest_key) {  // ranges are in row order
      out.nearest_key = p.nearest_key;
      out.nearest_row = p.nearest_row;
    }
    if (!std::isfinite(p.sums.LogScale(log_domain))) continue;
    const double f = MergeFactor(p.sums, log_domain, top, top_scale);
    out.wsum += f * p.sums.wsum;
    out.hsum += f * p.sums.hsum;
    if (acc != nullptr) {
      const float ff = static_cast<float>(f);
      for (int j = 0; j < n; ++j) acc[j] += ff * p.acc[j];
    }
  }
  if (acc != nullptr && out.x_bipolar) {
    // The bit kernel summed w * [xi = +1]; xi = 2 [xi = +1] - 1.
    const float ws = static_cast<float>(out.wsum);
    for (int j = 0; j < n; ++j) acc[j] = 2.f * acc[j] - ws;
  }
  return out;
}

void FastSimilarities(const PatternView& view, SimilarityKind similarity, const float* x,
                      double* s) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const double sqx = similarity == SimilarityKind::kNegHalfSqL2 ? SquaredNorm(x, n) : 0.0;
  int used = 1;
  ParallelRows(view.rows, int64_t{n} * 4, [&](int, int64_t begin, int64_t end) {
    constexpr int64_t kChunk = 256;
    float sc[kChunk];
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      k.dot_rows(view.data + b * n, count, n, x, sc);
      for (int64_t i = 0; i < count; ++i) {
        s[b + i] = similarity == SimilarityKind::kNegHalfSqL2
                       ? double{sc[i]} - 0.5 * view.sq_norms[b + i] - 0.5 * sqx
                       : double{sc[i]};
      }
    }
  }, &used);
}

}  // namespace engram::core::internal
