// How a single-state pass (FusedPass) consumes a block of scores. Each way
// is its own small type, and each writes into its thread's Partial (fold.h):
//
//   ScanNearest     the nearest pattern in L2 among the block's rows;
//   IntegerBitFold  an affine integer rule over bit rows (classical,
//                   quadratic, identity): weights, sums and weighted sum in
//                   exact integers, no per-row work in double;
//   WeightFold      any other rule: weights in double, folded relative to a
//                   running scale (FoldBlock), the rows whose weight is not
//                   negligible added to the weighted sum.
//
// LogFloor is the lower bound on the pass's largest log-weight that the
// threads share: rows far below it are negligible against the final scale
// before a thread's own running max meets the winner.
//
// Thread-safety: the folds are const and may be shared by the threads of
// one pass; each thread passes its own Partial and BlockScratch.
#ifndef ENGRAM_CORE_SRC_PASS_FOLDS_H_
#define ENGRAM_CORE_SRC_PASS_FOLDS_H_

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fold.h"
#include "fused.h"
#include "row_source.h"

namespace engram::core::internal {

class LogFloor {
 public:
  double Get() const { return v_.load(std::memory_order_relaxed); }
  void Set(double v) { v_.store(v, std::memory_order_relaxed); }
  // Raises the floor to v when v is larger; returns the floor's value after
  // (>= v).
  double Raise(double v) {
    double f = Get();
    while (v > f && !v_.compare_exchange_weak(f, v, std::memory_order_relaxed)) {
    }
    return std::max(f, v);
  }

 private:
  std::atomic<double> v_{-INFINITY};
};

// The log-weight of the block's largest score (count > 0), for log-weights
// increasing in the raw score (slope * dot product); *nan is set when a
// score is NaN (the result is then NaN or meaningless).
double MaxScoreLogWeight(const RowWeights& rule, const float* sc, int64_t count, bool* nan);

// Keeps in p the block's nearest row (largest sc - |xi|^2 / 2, the first on
// ties, with exactly Bank::Nearest's key) when it beats p's.
void ScanNearest(const float* sc, int64_t first, int64_t count, const float* sq_norms, double sqx,
                 Partial* p);

class IntegerBitFold {
 public:
  // Active when `src` reads bit rows for a kDot, kLinear rule of affine
  // integer form whose weights fit int32 and, with a weighted sum, the
  // 16-bit kernel exists and the weights over their power of two fit it.
  IntegerBitFold(const RowSource& src, SimilarityKind similarity, const RowWeights& rule, int n,
                 bool with_acc, bool nearest, const Similarity& sim, int64_t block);
  bool active() const { return active_; }
  // Clears p's integer sums before a range.
  void Start(Partial* p) const;
  // Folds rows [first, first + count) of a range ending at `end`, with raw
  // scores sc; w16 is scratch of `count` entries.
  void Block(int64_t first, int64_t count, int64_t end, const float* sc, std::vector<int16_t>* w16,
             Partial* p) const;
  // Folds the range's integer sums into its running sums.
  void Finish(Partial* p) const;

 private:
  const kernels::KernelTable& k_;
  const RowSource& src_;
  const Similarity& sim_;
  int n_;
  bool with_acc_;
  bool nearest_;
  int64_t block_;
  AffineIntegerForm form_;
  int shift_ = 0;
  bool active_ = false;
};

class WeightFold {
 public:
  // `prescored`: the floor holds the exact largest log-weight of the pass
  // (a scores-only pre-pass ran), so blocks far below it are skipped whole.
  // `monotone`: log-weights increase with the raw score (slope * dot).
  WeightFold(const RowSource& src, const Similarity& sim, const RowWeights& rule, int n,
             int64_t rows, bool with_acc, bool prescored, bool monotone, LogFloor* floor);
  void Block(int64_t first, int64_t count, const float* sc, BlockScratch* bs, Partial* p) const;

 private:
  // Adds the block's rows whose weight wf (relative to p's scale) is not
  // negligible to p's weighted sum.
  void AddRows(int64_t first, int64_t count, BlockScratch* bs, Partial* p) const;

  const kernels::KernelTable& k_;
  const RowSource& src_;
  const Similarity& sim_;
  const RowWeights& rule_;
  int n_;
  bool log_domain_;
  bool with_acc_;
  bool prescored_;
  bool monotone_;
  // Integer weights on bits (classical, polynomial): one exact integer pass
  // over the block when they are integers.
  bool integer_bits_;
  float negligible_;
  double log_negligible_;
  LogFloor* floor_;
};

// Scores every row once and returns the scores, raising `floor` to the
// pass's exact largest log-weight.
std::vector<float> PreScore(const RowSource& src, const Similarity& sim, const RowWeights& rule,
                            int64_t rows, int64_t block, bool monotone, LogFloor* floor);

}  // namespace engram::core::internal

#endif  // ENGRAM_CORE_SRC_PASS_FOLDS_H_
