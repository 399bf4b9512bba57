// The rows a single-state pass reads, and the scores it takes from them.
//
//   RowSource src(view, x);
//   src.Score(first, count, sc);      // sc[i] = <row first+i, x>
//   src.Axpy(first, count, w, acc);   // acc += sum_i w[i] row first+i
//
// Which rows: the bit-packed ones when the bank has them and x is bipolar
// (scores are then exact integer overlaps, and Axpy adds w * [xi = +1], see
// FinishBitSum), else the bf16 rows when the bank holds them, else the f32
// rows. Similarity turns a raw score into S(xi, x) (kDot or kNegHalfSqL2).
//
// Thread-safety: const methods may be called from any number of threads.
#ifndef ENGRAM_CORE_SRC_ROW_SOURCE_H_
#define ENGRAM_CORE_SRC_ROW_SOURCE_H_

#include <cstdint>
#include <vector>

#include "engram/core/compute.h"
#include "engram/core/energy_config.h"
#include "engram/core/pattern_view.h"
#include "fold.h"
#include "kernels/kernels.h"

namespace engram::core::internal {

class RowSource {
 public:
  RowSource(const PatternView& view, const float* x)
      : k_(kernels::Kernels()), view_(view), x_(x), n_(view.dim),
        bits_(view.bits != nullptr && IsBipolar(x, view.dim)),
        bf16_(!bits_ && view.bf16 != nullptr) {
    if (bits_) {
      xbits_.assign(kernels::BitWords(n_), 0);
      for (int i = 0; i < n_; ++i) xbits_[i >> 6] |= uint64_t{x[i] > 0} << (i & 63);
    }
  }

  bool bits() const { return bits_; }
  bool bf16() const { return bf16_; }
  int64_t row_bytes() const {
    return bits_ ? int64_t{kernels::BitWords(n_)} * 8 : bf16_ ? int64_t{n_} * 2 : int64_t{n_} * 4;
  }
  // Rows per block, so that a block stays in L2 while the weighted sum
  // re-reads it. bf16 blocks are 4x larger: the bf16 dot kernel splits the
  // state once per call, and the block is still re-read from L2.
  int64_t BlockRows() const {
    const int64_t bytes = bf16_ ? 4 * kBlockBytes : kBlockBytes;
    return std::clamp<int64_t>(bytes / std::max<int64_t>(row_bytes(), 1), 8, 1024);
  }
  const uint64_t* bit_rows(int64_t first) const {
    return view_.bits + first * kernels::BitWords(n_);
  }

  void Score(int64_t first, int64_t count, float* sc) const {
    if (bits_) {
      k_.dot_rows_bits(bit_rows(first), count, n_, xbits_.data(), sc);
    } else if (bf16_) {
      k_.dot_rows_bf16(view_.bf16 + first * n_, count, n_, x_, sc);
    } else {
      k_.dot_rows(view_.data + first * n_, count, n_, x_, sc);
    }
  }

  void Axpy(int64_t first, int64_t count, const float* w, float* acc) const {
    if (bits_) {
      k_.axpy_rows_bits(bit_rows(first), count, n_, w, acc);
    } else if (bf16_) {
      k_.axpy_rows_bf16(view_.bf16 + first * n_, count, n_, w, acc);
    } else {
      k_.axpy_rows(view_.data + first * n_, count, n_, w, acc);
    }
  }

  // On bit rows Axpy summed w * [xi = +1]; xi = 2 [xi = +1] - 1 turns the
  // merged sum (n floats) with total weight `wsum` into sum w xi.
  void FinishBitSum(double wsum, float* acc) const {
    if (!bits_) return;
    const float ws = static_cast<float>(wsum);
    for (int j = 0; j < n_; ++j) acc[j] = 2.f * acc[j] - ws;
  }

 private:
  const kernels::KernelTable& k_;
  const PatternView& view_;
  const float* x_;
  int n_;
  bool bits_;
  bool bf16_;
  std::vector<uint64_t> xbits_;
};

// S(xi_mu, x) from a raw score <xi_mu, x>: the score itself (kDot), or
// score - |xi_mu|^2 / 2 - |x|^2 / 2 (kNegHalfSqL2).
struct Similarity {
  const float* sq_norms;
  bool half_sq_l2;
  double sqx;  // |x|^2 when half_sq_l2 (or the nearest row is tracked)

  double Of(float sc, int64_t row) const {
    return half_sq_l2 ? double{sc} - 0.5 * sq_norms[row] - 0.5 * sqx : double{sc};
  }
  void Block(const float* sc, int64_t first, int64_t count, double* s) const {
    for (int64_t i = 0; i < count; ++i) s[i] = Of(sc[i], first + i);
  }
};

}  // namespace engram::core::internal

#endif  // ENGRAM_CORE_SRC_ROW_SOURCE_H_
