// The running sums of one pass and their exact merge: how a block's weights
// fold into a thread's partial sums relative to a running scale, and how the
// threads' partials merge. Shared by the single-state pass (fused.cc), the
// screened pass (screened.cc) and the batched pass (batch.cc).
//
// The scale is the running max of the log-weights in the log domain (the
// online log-sum-exp) and the running max |w| (a power of two) in the linear
// domain; rescaling to a larger scale, and merging partials at the largest
// one, are exact up to the rounding of one multiply per value (exact in the
// linear domain).
#ifndef ENGRAM_CORE_SRC_FOLD_H_
#define ENGRAM_CORE_SRC_FOLD_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fused.h"
#include "kernels/kernels.h"

namespace engram::core::internal {

// Block size target: the block is re-read from L2 by the weighted sum.
inline constexpr int64_t kBlockBytes = int64_t{128} << 10;

inline bool IsBipolar(const float* x, int n) {
  bool bipolar = true;  // no early exit: the loop vectorises
  for (int i = 0; i < n; ++i) bipolar &= std::fabs(x[i]) == 1.f;
  return bipolar;
}

inline void ScaleInPlace(float* v, int n, double f) {
  const float ff = static_cast<float>(f);
  for (int i = 0; i < n; ++i) v[i] *= ff;
}

// One state's weights so far, relative to a running scale: in the log
// domain the running max of the log-weights (online log-sum-exp), in the
// linear domain the running max |w|, |h|.
struct RunningSums {
  double log_scale = -INFINITY;  // log domain
  double scale = 0.0;            // linear domain
  double wsum = 0.0;             // sum of weights / scale
  double hsum = 0.0;             // sum of h / scale (linear domain)

  // log of the common scale, as FusedSums::log_scale.
  double LogScale(bool log_domain) const {
    if (log_domain) return log_scale;
    return scale > 0.0 ? std::log(scale) : -INFINITY;
  }
};

// The least power of two >= v (v > 0). Linear-domain scales are powers of
// two, so dividing integer weights by them, rescaling sums when the scale
// grows and merging partials are all exact: the Krotov-Hopfield drive of a
// bipolar state is then exactly 0 at a tie (a flip that leaves the energy
// unchanged) on every path, while its integer sums stay below 2^24.
inline double PowerOfTwoCeil(double v) {
  int e = 0;
  const double m = std::frexp(v, &e);  // v = m 2^e, m in [0.5, 1)
  return m == 0.5 ? v : std::ldexp(1.0, e);
}

// The factor that brings a partial with `sums` to the merged scale: `top`
// (the largest LogScale) in the log domain, `top_scale` (the largest scale,
// a power of two, so the ratio is exact) in the linear domain.
inline double MergeFactor(const RunningSums& sums, bool log_domain, double top, double top_scale) {
  if (!log_domain) return sums.scale / top_scale;
  return std::exp(sums.log_scale - top);
}

// Log domain: raises r's scale to `bm` when that is larger, rescaling the
// sum of weights and `acc` (n floats, may be null) to it.
inline void RaiseLogScale(double bm, RunningSums* r, float* acc, int n) {
  if (!(bm > r->log_scale)) return;
  if (std::isfinite(r->log_scale)) {
    const double f = std::exp(r->log_scale - bm);
    r->wsum *= f;
    if (acc != nullptr) ScaleInPlace(acc, n, f);
  }
  r->log_scale = bm;
}

// Folds a block's weights w (and h) into `r`: when the scale grows, the
// sums and `acc` (n floats, may be null) are rescaled to it; `wf` receives
// the block's weights divided by the scale. Returns false (wf all zero)
// while every weight so far is zero.
inline bool FoldBlock(bool log_domain, const double* w, const double* h, int64_t count, RunningSums* r,
               float* acc, int n, float* wf, double log_floor = -INFINITY) {
  if (log_domain) {
    double bm = -INFINITY;
    for (int64_t i = 0; i < count; ++i) bm = std::max(bm, w[i]);
    RaiseLogScale(bm, r, acc, n);
    if (!std::isfinite(r->log_scale)) {
      std::fill(wf, wf + count, 0.f);
      return false;
    }
    // Terms below e^-50 of the running scale, or of `log_floor` (a lower
    // bound on the final scale), cannot change wsum (>= 1 at the end of
    // every block) even summed over 10^9 rows: skip their exp.
    const double cut = std::max(r->log_scale, log_floor) - 50.0;
    r->wsum += kernels::Kernels().exp_weights(w, count, r->log_scale, cut, wf);
    return true;
  }
  double bm = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const double aw = std::fabs(w[i]), ah = std::fabs(h[i]);
    bm = aw > bm ? aw : bm;
    bm = ah > bm ? ah : bm;
  }
  if (bm > r->scale) {
    const double scale = PowerOfTwoCeil(bm);
    if (r->scale > 0.0) {
      const double f = r->scale / scale;
      r->wsum *= f;
      r->hsum *= f;
      if (acc != nullptr) ScaleInPlace(acc, n, f);
    }
    r->scale = scale;
  }
  if (r->scale == 0.0) {
    std::fill(wf, wf + count, 0.f);
    return false;
  }
  const double inv = 1.0 / r->scale;
  // Four partial sums each (the block's terms in a fixed order), so the
  // adds do not wait on one another.
  double ws[4] = {0.0, 0.0, 0.0, 0.0}, hs[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    for (int j = 0; j < 4; ++j) {
      const double v = w[i + j] * inv;
      wf[i + j] = static_cast<float>(v);
      ws[j] += v;
      hs[j] += h[i + j] * inv;
    }
  }
  for (; i < count; ++i) {
    const double v = w[i] * inv;
    wf[i] = static_cast<float>(v);
    ws[0] += v;
    hs[0] += h[i] * inv;
  }
  r->wsum += (ws[0] + ws[1]) + (ws[2] + ws[3]);
  r->hsum += (hs[0] + hs[1]) + (hs[2] + hs[3]);
  return true;
}

// The weighted sum of a block of bit rows in exact integers, when the
// block's weights are integers (the Krotov-Hopfield weights of the classical
// and polynomial energies are, for the integer overlaps of bipolar states):
// divided by the largest power of two g dividing them all, rows go through
// the 16-bit kernel, and acc receives (g / scale) times the exact sum. Returns false, adding
// nothing, when a weight is not an integer or a single |w / g| exceeds 32767.
inline bool AddIntegerBitRows(const kernels::KernelTable& k, const uint64_t* bits, int64_t count, int n,
                       const double* w, double scale, std::vector<int64_t>* wide,
                       std::vector<int16_t>* wi, std::vector<int32_t>* iacc, float* acc) {
  if (static_cast<int64_t>(wide->size()) < count) wide->resize(count);
  uint64_t bits_or = 0;
  bool integers = true;
  for (int64_t r = 0; r < count; ++r) {
    const double v = w[r];
    const bool in_range = std::fabs(v) < 0x1p52;  // false for NaN
    const int64_t q = in_range ? static_cast<int64_t>(v) : 0;
    integers &= in_range && static_cast<double>(q) == v;
    (*wide)[r] = q;
    bits_or |= static_cast<uint64_t>(q < 0 ? -q : q);
  }
  if (!integers) return false;
  if (bits_or == 0) return true;  // every weight is zero
  // The largest power of two dividing every weight (2d for the classical
  // energy, d of N's parity: 4 for even N) stands for the gcd.
  const uint64_t g = bits_or & (~bits_or + 1);
  const int shift = __builtin_ctzll(bits_or);
  if (static_cast<int64_t>(wi->size()) < count) wi->resize(count);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t q = (*wide)[r] >> shift;  // exact: 2^shift divides w_r
    if (q > 32767 || q < -32767) return false;
    (*wi)[r] = static_cast<int16_t>(q);
  }
  iacc->assign(n, 0);
  k.axpy_rows_bits_i16(bits, count, n, wi->data(), iacc->data(), nullptr, 0);
  const double f = static_cast<double>(g) / scale;
  for (int i = 0; i < n; ++i) acc[i] += static_cast<float>((*iacc)[i] * f);
  return true;
}

// One range's share of one state's pass, as MergeRanges reads it.
struct RangeSums {
  const RunningSums* sums;
  double energy;
  int64_t nearest_row;
  double nearest_key;
  const float* acc;  // n floats; null when the pass forms no weighted sum
};

// Merges the ranges 0..ranges-1 of one state's pass (range_at(i) returns
// range i's RangeSums; ranges are in row order, so the first of equal
// nearest keys wins) into out's scale, sums, energy and nearest row, and
// into acc (n floats, overwritten; may be null). Each range is rescaled to
// the largest scale: exactly in the linear domain (powers of two), with one
// rounding per value in the log domain.
template <typename RangeAt>
void MergeRanges(int ranges, const RangeAt& range_at, bool log_domain, bool track_nearest, int n,
                 FusedSums* out, float* acc) {
  double top = -INFINITY, top_scale = 0.0;
  for (int i = 0; i < ranges; ++i) {
    const RangeSums r = range_at(i);
    top = std::max(top, r.sums->LogScale(log_domain));
    top_scale = std::max(top_scale, r.sums->scale);
  }
  out->log_scale = top;
  out->scale = top_scale;
  if (acc != nullptr) std::fill(acc, acc + n, 0.f);
  for (int i = 0; i < ranges; ++i) {
    const RangeSums r = range_at(i);
    out->energy_terms += r.energy;
    if (track_nearest && r.nearest_key > out->nearest_key) {
      out->nearest_key = r.nearest_key;
      out->nearest_row = r.nearest_row;
    }
    if (!std::isfinite(r.sums->LogScale(log_domain))) continue;
    const double f = MergeFactor(*r.sums, log_domain, top, top_scale);
    out->wsum += f * r.sums->wsum;
    out->hsum += f * r.sums->hsum;
    if (acc != nullptr) {
      const float ff = static_cast<float>(f);
      for (int j = 0; j < n; ++j) acc[j] += ff * r.acc[j];
    }
  }
}

// A thread's share of a FusedPass.
struct Partial {
  RunningSums sums;
  double energy = 0.0;
  int64_t nearest_row = -1;
  double nearest_key = -INFINITY;
  std::vector<float> acc;
  // The blocks summed in integers (an affine integer rule on bits),
  // unscaled: folded into sums and acc at the end of the range.
  bool integer = false;
  int64_t iwsum = 0, ihsum = 0, imax = 0;  // sums of w, h; max |w|, |h|
  std::vector<int64_t> iacc;                // sum of w * bit_i (with acc)
  // The blocks since the last flush into iacc, in units of the pass's
  // power of two, and a bound on their magnitude (kept below 2^31).
  std::vector<int32_t> iacc32;
  int64_t ibound = 0;

  RangeSums Range() const {
    return {&sums, energy, nearest_row, nearest_key, acc.empty() ? nullptr : acc.data()};
  }

  void FlushInt32(int shift) {
    const int64_t g = int64_t{1} << shift;
    for (size_t j = 0; j < iacc32.size(); ++j) {
      iacc[j] += iacc32[j] * g;
      iacc32[j] = 0;
    }
    ibound = 0;
  }
};

// Folds a range's integer sums into its running sums (and acc, n floats,
// when `with_acc`), as FoldBlock folds a block of those weights.
inline void FoldIntegerSums(Partial* p, bool with_acc, int n, int shift) {
  if (with_acc) p->FlushInt32(shift);
  RunningSums& r = p->sums;
  const double bm = static_cast<double>(p->imax);
  if (bm > r.scale) {
    const double scale = PowerOfTwoCeil(bm);
    if (r.scale > 0.0) {
      const double f = r.scale / scale;
      r.wsum *= f;
      r.hsum *= f;
      if (with_acc) ScaleInPlace(p->acc.data(), n, f);
    }
    r.scale = scale;
  }
  if (r.scale == 0.0) return;  // every weight so far is zero
  const double inv = 1.0 / r.scale;
  r.wsum += static_cast<double>(p->iwsum) * inv;
  r.hsum += static_cast<double>(p->ihsum) * inv;
  if (with_acc) {
    for (int j = 0; j < n; ++j) p->acc[j] += static_cast<float>(static_cast<double>(p->iacc[j]) * inv);
  }
}


// A pass's per-block buffers, one set per thread, kept between passes
// (allocating and zeroing ~55 KB per chunk on bits costs ~8 % of a
// 784 x 10^4 bit-packed step). Every use writes a block's entries before it
// reads them. A thread runs one chunk at a time, and no chunk
// starts a pass of its own.
struct BlockScratch {
  std::vector<float> sc, wf;
  std::vector<double> s, w, h;
  std::vector<std::pair<int64_t, int64_t>> runs;
  std::vector<int64_t> wide;  // AddIntegerBitRows's
  std::vector<int16_t> wi;
  std::vector<int32_t> iacc;
};

inline BlockScratch& ThreadScratch(int64_t block) {
  thread_local BlockScratch scratch;
  const size_t size = static_cast<size_t>(block);
  if (scratch.sc.size() < size) {
    scratch.sc.resize(size);
    scratch.wf.resize(size);
    scratch.s.resize(size);
    scratch.w.resize(size);
    scratch.h.resize(size);
    scratch.wi.resize(size);
  }
  return scratch;
}

}  // namespace engram::core::internal

#endif  // ENGRAM_CORE_SRC_FOLD_H_
