#include "pass_folds.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "parallel.h"

namespace engram::core::internal {

double MaxScoreLogWeight(const RowWeights& rule, const float* sc, int64_t count, bool* nan) {
  const double s1 = kernels::Kernels().max_value(sc, count);  // NaN when a score is
  *nan = std::isnan(s1);
  double w1 = -INFINITY, h1 = 0.0;
  rule.Block(&s1, 1, &w1, &h1);
  return w1;
}

void ScanNearest(const float* sc, int64_t first, int64_t count, const float* sq_norms, double sqx,
                 Partial* p) {
  // A branch-free f32 screen of the block; only a block that may hold a
  // better row runs the exact double comparison (the f32 key is off by at
  // most 2^-22 (|sc| + |xi|^2 / 2) from the exact one).
  float block_best = -INFINITY, block_mag = 0.f;
  for (int64_t i = 0; i < count; ++i) {
    const float half_sq = 0.5f * sq_norms[first + i];
    const float key = sc[i] - half_sq;
    block_best = key > block_best ? key : block_best;
    const float mag = std::fabs(sc[i]) + half_sq;
    block_mag = mag > block_mag ? mag : block_mag;
  }
  if (!(double{block_best} + 0x1p-20 * double{block_mag} >= p->nearest_key + 0.5 * sqx) &&
      p->nearest_row >= 0) {
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const double key = double{sc[i]} - 0.5 * sq_norms[first + i] - 0.5 * sqx;
    if (key > p->nearest_key) {
      p->nearest_key = key;
      p->nearest_row = first + i;
    }
  }
}

// ---- IntegerBitFold ----------------------------------------------------------

IntegerBitFold::IntegerBitFold(const RowSource& src, SimilarityKind similarity,
                               const RowWeights& rule, int n, bool with_acc, bool nearest,
                               const Similarity& sim, int64_t block)
    : k_(kernels::Kernels()), src_(src), sim_(sim), n_(n), with_acc_(with_acc), nearest_(nearest),
      block_(block) {
  active_ = src.bits() && rule.domain() == WeightDomain::kLinear &&
            similarity == SimilarityKind::kDot && rule.affine_integer_form(&form_);
  const int64_t w_bound = std::abs(int64_t{form_.a}) * n + std::abs(int64_t{form_.b});  // >= |w|
  active_ = active_ && w_bound <= INT32_MAX;
  if (!active_ || !with_acc) return;
  // The weights a d + b share the power of two 2^shift (d has n's parity,
  // so a d + b = (a n + b) - 2 a p for integer p); over it they take the
  // 16-bit kernel when (|a| n + |b|) / 2^shift <= 32767.
  const uint32_t lead = static_cast<uint32_t>(std::abs(form_.a * n + form_.b));
  const uint32_t step = static_cast<uint32_t>(std::abs(2 * form_.a));
  const uint32_t both = lead | step;
  shift_ = both == 0 ? 0 : __builtin_ctz(both);
  active_ = k_.axpy_rows_bits_i16 != nullptr && (w_bound >> shift_) <= 32767;
}

void IntegerBitFold::Start(Partial* p) const {
  if (!with_acc_) return;
  p->iacc.assign(n_, 0);
  p->iacc32.assign(n_, 0);
}

void IntegerBitFold::Block(int64_t first, int64_t count, int64_t end, const float* sc,
                           std::vector<int16_t>* w16, Partial* p) const {
  kernels::OverlapStats st;
  k_.overlap_weights(sc, count, form_.a, form_.b, shift_, with_acc_ ? w16->data() : nullptr, &st);
  p->integer = true;
  p->energy += form_.e2 * st.sum_sq + form_.e1 * static_cast<double>(st.sum);
  p->iwsum += int64_t{form_.a} * st.sum + int64_t{form_.b} * count;
  p->ihsum += int64_t{form_.c} * count;
  const int64_t wmax = std::max(std::abs(int64_t{form_.a} * static_cast<int64_t>(st.max) + form_.b),
                                std::abs(int64_t{form_.a} * static_cast<int64_t>(st.min) + form_.b));
  p->imax = std::max({p->imax, wmax, std::abs(int64_t{form_.c})});
  if (nearest_) {
    // Bit rows are +-1 patterns (|xi|^2 = n for each): the nearest row of
    // the block is its first row of largest overlap.
    const int64_t r = first + st.argmax;
    const double key = double{sc[st.argmax]} - 0.5 * sim_.sq_norms[r] - 0.5 * sim_.sqx;
    if (key > p->nearest_key) {
      p->nearest_key = key;
      p->nearest_row = r;
    }
  }
  if (!with_acc_ || wmax == 0) return;
  // The weighted sum adds into 32-bit sums across blocks while they cannot
  // overflow (a bound of count * max |w| / 2^shift per block).
  const int64_t bound = count * (wmax >> shift_);
  if (p->ibound + bound > INT32_MAX) p->FlushInt32(shift_);
  p->ibound += bound;
  // The weighted sum re-reads the block from L2 and is compute-bound: the
  // kernel asks for the next block's rows one by one as it adds these, so
  // the memory system is not idle meanwhile.
  k_.axpy_rows_bits_i16(src_.bit_rows(first), count, n_, w16->data(), p->iacc32.data(),
                        src_.bit_rows(first + count), std::min(block_, end - first - count));
}

void IntegerBitFold::Finish(Partial* p) const {
  if (p->integer) FoldIntegerSums(p, with_acc_, n_, shift_);
}

// ---- WeightFold --------------------------------------------------------------

WeightFold::WeightFold(const RowSource& src, const Similarity& sim, const RowWeights& rule, int n,
                       int64_t rows, bool with_acc, bool prescored, bool monotone, LogFloor* floor)
    : k_(kernels::Kernels()), src_(src), sim_(sim), rule_(rule), n_(n),
      log_domain_(rule.domain() == WeightDomain::kLog), with_acc_(with_acc),
      prescored_(prescored), monotone_(monotone), floor_(floor) {
  integer_bits_ = src.bits() && !log_domain_ && k_.axpy_rows_bits_i16 != nullptr;
  // Weights (relative to the running scale, which only grows) below this
  // are left out of the weighted sum; see kNegligibleWeightMass.
  const double negligible_mass =
      kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1));
  negligible_ = static_cast<float>(negligible_mass);
  log_negligible_ = std::log(negligible_mass);
}

void WeightFold::Block(int64_t first, int64_t count, const float* sc, BlockScratch* bs,
                       Partial* p) const {
  // With a pre-pass the floor is the exact largest log-weight: a block
  // whose every log-weight is more than 50 below it adds nothing to the
  // sums (FoldBlock would cut each of its terms) nor to acc. A NaN is never
  // skipped: it must reach the sums.
  bool nan = false;
  if (prescored_ && monotone_ && MaxScoreLogWeight(rule_, sc, count, &nan) < floor_->Get() - 50.0 &&
      !nan) {
    return;  // from the block's largest score, before any per-row work
  }
  double* s = bs->s.data();
  double* w = bs->w.data();
  float* wf = bs->wf.data();
  sim_.Block(sc, first, count, s);
  p->energy += rule_.Block(s, count, w, bs->h.data());
  if (prescored_) {
    double bm = -INFINITY;
    nan = false;
    for (int64_t i = 0; i < count; ++i) {
      bm = w[i] > bm ? w[i] : bm;
      nan |= std::isnan(w[i]);
    }
    if (!nan && bm < floor_->Get() - 50.0) return;
  }
  if (!FoldBlock(log_domain_, w, bs->h.data(), count, &p->sums,
                 with_acc_ ? p->acc.data() : nullptr, n_, wf, floor_->Get())) {
    return;
  }
  if (!with_acc_) return;
  if (log_domain_) {
    // Publish this thread's running max; cut at the best bound known.
    const double cut = floor_->Raise(p->sums.log_scale) + log_negligible_;
    for (int64_t i = 0; i < count; ++i) {
      if (w[i] < cut) wf[i] = 0.f;
    }
  }
  AddRows(first, count, bs, p);
}

void WeightFold::AddRows(int64_t first, int64_t count, BlockScratch* bs, Partial* p) const {
  if (integer_bits_ &&
      AddIntegerBitRows(k_, src_.bit_rows(first), count, n_, bs->w.data(), p->sums.scale,
                        &bs->wide, &bs->wi, &bs->iacc, p->acc.data())) {
    return;
  }
  // Runs of rows whose weight is not negligible, [i, j).
  const float* wf = bs->wf.data();
  for (int64_t i = 0; i < count;) {
    if (!(std::fabs(wf[i]) >= negligible_)) {
      ++i;
      continue;
    }
    int64_t j = i + 1;
    while (j < count && std::fabs(wf[j]) >= negligible_) ++j;
    src_.Axpy(first + i, j - i, wf + i, p->acc.data());
    i = j;
  }
}

std::vector<float> PreScore(const RowSource& src, const Similarity& sim, const RowWeights& rule,
                            int64_t rows, int64_t block, bool monotone, LogFloor* floor) {
  std::vector<float> scores(rows);
  std::vector<double> maxima(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)),
                             -INFINITY);
  int used = 1;
  ParallelRows(rows, src.row_bytes(), [&](int part, int64_t begin, int64_t end) {
    BlockScratch& bs = ThreadScratch(block);
    double m = -INFINITY;
    for (int64_t b = begin; b < end; b += block) {
      const int64_t count = std::min(block, end - b);
      float* sc = scores.data() + b;
      src.Score(b, count, sc);
      if (monotone) {  // the largest log-weight is slope times the largest score
        bool nan = false;
        m = std::max(m, MaxScoreLogWeight(rule, sc, count, &nan));
        continue;
      }
      sim.Block(sc, b, count, bs.s.data());
      rule.Block(bs.s.data(), count, bs.w.data(), bs.h.data());
      for (int64_t i = 0; i < count; ++i) m = std::max(m, bs.w[i]);
    }
    maxima[part] = m;
  }, &used);
  double m = floor->Get();
  for (int i = 0; i < used; ++i) m = std::max(m, maxima[i]);
  floor->Set(m);
  return scores;
}

}  // namespace engram::core::internal
