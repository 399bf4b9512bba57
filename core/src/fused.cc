#include "fused.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "engram/core/compute.h"
#include "fold.h"
#include "kernels/kernels.h"
#include "parallel.h"
#include "pass_folds.h"
#include "row_source.h"
#include "screened.h"
#include "state_loops.h"

namespace engram::core::internal {

namespace {

// A screened bank's softmax pass over kDot / kNegHalfSqL2 scores runs on the
// int8 screen first (screened.h), unless the state is bipolar on a bank with
// bit rows (those are exact and cheaper).
bool MayScreen(const PatternView& view, SimilarityKind similarity, const float* x,
               const RowWeights& rule) {
  return rule.domain() == WeightDomain::kLog && view.screen != nullptr && view.bf16 == nullptr &&
         rule.log_weight_slope() > 0.0 &&
         (similarity == SimilarityKind::kDot || similarity == SimilarityKind::kNegHalfSqL2) &&
         !(view.bits != nullptr && IsBipolar(x, view.dim));
}

// Log domain: seeds the floor with the hint row's log-weight.
void SeedFloor(const RowSource& src, const Similarity& sim, const RowWeights& rule,
               int64_t hint_row, LogFloor* floor) {
  float sc1;
  src.Score(hint_row, 1, &sc1);
  const double s1 = sim.Of(sc1, hint_row);
  double w1 = -INFINITY, h1 = 0.0;
  rule.Block(&s1, 1, &w1, &h1);
  if (!std::isnan(w1)) floor->Set(w1);
}

}  // namespace

FusedSums FusedPass(const PatternView& view, SimilarityKind similarity, const float* x,
                    const RowWeights& rule, float* acc, bool track_nearest, int64_t hint_row) {
  FusedSums out;
  if (MayScreen(view, similarity, x, rule) &&
      ScreenedPass(view, similarity, x, rule.log_weight_slope(), acc, track_nearest, &out)) {
    return out;
  }
  out = FusedSums{};  // nothing of a screened attempt that gave up is kept
  const int n = view.dim;
  const int64_t rows = view.rows;
  const bool log_domain = rule.domain() == WeightDomain::kLog;
  const bool with_acc = acc != nullptr;
  const RowSource src(view, x);
  out.x_bipolar = src.bits();
  // Nearest-pattern keys use exactly Bank::Nearest's expression, so both
  // pick the same row; bf16 scores are not exact, so not there.
  const bool nearest = track_nearest && !src.bf16();
  const bool half_sq_l2 = similarity == SimilarityKind::kNegHalfSqL2;
  const Similarity sim{view.sq_norms, half_sq_l2,
                       half_sq_l2 || nearest ? SquaredNorm(x, n) : 0.0};
  if (half_sq_l2 || nearest) out.sq_x = sim.sqx;
  const int64_t block = src.BlockRows();
  const bool hinted = log_domain && hint_row >= 0 && hint_row < rows;

  LogFloor floor;
  if (hinted) SeedFloor(src, sim, rule, hint_row, &floor);
  // On bits the scores cost ~1/30 of the masked adds of the weighted sum,
  // and on bf16 rows without a hint a sharp softmax would add every row
  // before the winner: a scores-only pre-pass finds the exact largest
  // log-weight first, so the main pass adds only the rows that matter, and
  // reads the kept scores (4 bytes a row) instead of scoring again.
  const bool monotone =
      log_domain && rule.log_weight_slope() > 0.0 && similarity == SimilarityKind::kDot;
  std::vector<float> prescores;
  if (log_domain && with_acc && (src.bits() || (src.bf16() && !hinted))) {
    prescores = PreScore(src, sim, rule, rows, block, monotone, &floor);
  }
  const IntegerBitFold integer(src, similarity, rule, n, with_acc, nearest, sim, block);
  const WeightFold fold(src, sim, rule, n, rows, with_acc, !prescores.empty(), monotone, &floor);

  std::vector<Partial> partials(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)));
  auto run = [&](int part, int64_t begin, int64_t end) {
    Partial& p = partials[part];
    BlockScratch& bs = ThreadScratch(block);
    if (with_acc) p.acc.assign(n, 0.f);
    if (integer.active()) integer.Start(&p);
    for (int64_t b = begin; b < end; b += block) {
      const int64_t count = std::min(block, end - b);
      const float* sc = prescores.empty() ? bs.sc.data() : prescores.data() + b;
      if (prescores.empty()) src.Score(b, count, bs.sc.data());
      if (integer.active()) {
        integer.Block(b, count, end, sc, &bs.wi, &p);
        continue;
      }
      if (nearest) ScanNearest(sc, b, count, view.sq_norms, sim.sqx, &p);
      fold.Block(b, count, sc, &bs, &p);
    }
    integer.Finish(&p);
  };
  // A bit-packed pass whose weights are all significant (the linear domain:
  // classical, polynomial) costs one masked add per 16 values of every row,
  // about what streaming an f32 row's n values costs in bytes / 4: it is
  // split over threads from far fewer rows than its n / 8 bytes a row would
  // suggest.
  const int64_t cost_per_row = src.bits() && !log_domain && with_acc
                                   ? std::max<int64_t>(src.row_bytes(), n)
                                   : src.row_bytes();
  int used = 1;
  ParallelRows(rows, cost_per_row, run, &used);

  MergeRanges(used, [&](int i) { return partials[i].Range(); }, log_domain, nearest, n, &out, acc);
  if (with_acc) src.FinishBitSum(out.wsum, acc);
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
