// AVX-512 kernels (F, BW, VL, DQ, VPOPCNTDQ; built with those -m flags and
// called only when the CPU reports them). Tails use lane masks.
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "kernels/kernels.h"
#include "kernels/rows_simd.h"
#include "kernels/scratch.h"

namespace engram::core::kernels {
namespace {


inline __mmask16 Tail(int rem) { return static_cast<__mmask16>((1u << rem) - 1u); }

// The ISA traits of kernels/rows_simd.h: 16 lanes, tails by lane masks.
struct Avx512 {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static V Zero() { return _mm512_setzero_ps(); }
  static V Set1(float v) { return _mm512_set1_ps(v); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static Mask TailMask(int rem) { return Tail(rem); }
  static V LoadMasked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void StoreMasked(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V LoadTail(const float* p, int rem) { return LoadMasked(p, Tail(rem)); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void StoreTail(float* p, int rem, V v) { StoreMasked(p, Tail(rem), v); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float Sum(V v) { return _mm512_reduce_add_ps(v); }
};

struct F32 {
  using T = float;
  static __m512 Load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 LoadTail(const float* p, int rem) { return _mm512_maskz_loadu_ps(Tail(rem), p); }
};
struct Bf16 {
  using T = uint16_t;
  static __m512 Widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m512 Load(const uint16_t* p) {
    return Widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 LoadTail(const uint16_t* p, int rem) {
    return Widen(_mm256_maskz_loadu_epi16(Tail(rem), p));
  }
};

void DotRows(const float* rows, int64_t count, int n, const float* x, float* out) {
  simd::DotRows<Avx512, F32>(rows, count, n, x, out);
}
void AxpyRows(const float* rows, int64_t count, int n, const float* w, float* acc) {
  simd::AxpyRows<Avx512, F32>(rows, count, n, w, acc);
}
void DotRowsBf16(const uint16_t* rows, int64_t count, int n, const float* x, float* out) {
  simd::DotRows<Avx512, Bf16>(rows, count, n, x, out);
}
void AxpyRowsBf16(const uint16_t* rows, int64_t count, int n, const float* w, float* acc) {
  simd::AxpyRows<Avx512, Bf16>(rows, count, n, w, acc);
}

// int8 rows without VNNI: 32 values of a row and of x sign-extended to 16
// bits, one VPMADDWD into 16 int32 lanes (exact); four rows share each group
// of x, and the last n mod 32 values are a masked load.
void DotRowsI8(const int8_t* rows, int64_t count, int n, const int8_t* x, const int32_t*,
               int32_t* out) {
  const int full = n & ~31;
  const int rem = n - full;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << rem) - 1u);
  auto wide = [](const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  auto wide_tail = [&](const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(tail, p + full));
  };
  const __m512i xt = rem ? wide_tail(x) : _mm512_setzero_si512();
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const int8_t* p0 = rows + r * n;
    const int8_t* p1 = p0 + n;
    const int8_t* p2 = p1 + n;
    const int8_t* p3 = p2 + n;
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
    const char* next = reinterpret_cast<const char*>(p3 + n);
    for (int g = 0; g < full; g += 32) {
      _mm_prefetch(next + 4 * g, _MM_HINT_T0);  // the next four rows, 128 bytes a group
      _mm_prefetch(next + 4 * g + 64, _MM_HINT_T0);
      const __m512i xv = wide(x + g);
      a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(wide(p0 + g), xv));
      a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(wide(p1 + g), xv));
      a2 = _mm512_add_epi32(a2, _mm512_madd_epi16(wide(p2 + g), xv));
      a3 = _mm512_add_epi32(a3, _mm512_madd_epi16(wide(p3 + g), xv));
    }
    if (rem) {
      a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(wide_tail(p0), xt));
      a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(wide_tail(p1), xt));
      a2 = _mm512_add_epi32(a2, _mm512_madd_epi16(wide_tail(p2), xt));
      a3 = _mm512_add_epi32(a3, _mm512_madd_epi16(wide_tail(p3), xt));
    }
    out[r] = _mm512_reduce_add_epi32(a0);
    out[r + 1] = _mm512_reduce_add_epi32(a1);
    out[r + 2] = _mm512_reduce_add_epi32(a2);
    out[r + 3] = _mm512_reduce_add_epi32(a3);
  }
  for (; r < count; ++r) {
    const int8_t* p = rows + r * n;
    __m512i a = _mm512_setzero_si512();
    for (int g = 0; g < full; g += 32) a = _mm512_add_epi32(a, _mm512_madd_epi16(wide(p + g), wide(x + g)));
    if (rem) a = _mm512_add_epi32(a, _mm512_madd_epi16(wide_tail(p), xt));
    out[r] = _mm512_reduce_add_epi32(a);
  }
}

// Eight rows' popcount vectors (8 lanes each) to their eight sums, in row
// order: a transposing add tree (3 levels of unpack / lane shuffles and
// adds) in place of eight horizontal reductions.
inline __m512i SumEightRows(const __m512i d[8]) {
  __m512i p[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    p[j] = _mm512_add_epi64(_mm512_unpacklo_epi64(d[2 * j], d[2 * j + 1]),
                            _mm512_unpackhi_epi64(d[2 * j], d[2 * j + 1]));
  }
  const __m512i ab = _mm512_add_epi64(_mm512_shuffle_i64x2(p[0], p[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_i64x2(p[0], p[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i ce = _mm512_add_epi64(_mm512_shuffle_i64x2(p[2], p[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_i64x2(p[2], p[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_epi64(_mm512_shuffle_i64x2(ab, ce, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i64x2(ab, ce, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The popcount scores of `count` rows of `words` words from row(p), the 8
// popcount lanes of row p XOR x: eight rows at a time through the
// transposing add tree. Rows of a few words are consumed faster than the
// hardware prefetcher ramps up: the rows 64 ahead are asked for once per 8
// rows, a line at a time (as the AVX2 kernel).
template <typename Row>
inline void ScoreRowsBits(const uint64_t* rows, int64_t count, int n, int words, Row row,
                          float* out) {
  const __m512i vn = _mm512_set1_epi64(n);
  const int group_bytes = 8 * words * 8;
  int64_t r = 0;
  for (; r + 8 <= count; r += 8) {
    const char* ahead = reinterpret_cast<const char*>(rows + (r + 64) * words);
    for (int off = 0; off < group_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    __m512i d[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) d[j] = row(rows + (r + j) * words);
    const __m512i dist = SumEightRows(d);
    const __m512i dot = _mm512_sub_epi64(vn, _mm512_add_epi64(dist, dist));  // exact integers
    _mm256_storeu_ps(out + r, _mm512_cvtepi64_ps(dot));
  }
  for (; r < count; ++r) {
    out[r] = static_cast<float>(n - 2 * _mm512_reduce_add_epi64(row(rows + r * words)));
  }
}

// Rows of at most 16 words (n <= 1024, e.g. 13 at n = 784): x in two
// registers, each row one or two masked loads.
template <bool kTwo>
void DotRowsBitsShort(const uint64_t* rows, int64_t count, int n, const uint64_t* x, float* out) {
  const int words = BitWords(n);
  const __mmask8 m0 = kTwo || words == 8 ? static_cast<__mmask8>(0xFF)
                                         : static_cast<__mmask8>((1u << words) - 1u);
  const __mmask8 m1 = kTwo ? static_cast<__mmask8>((1u << (words - 8)) - 1u) : 0;
  const __m512i x0 = _mm512_maskz_loadu_epi64(m0, x);
  const __m512i x1 = kTwo ? _mm512_maskz_loadu_epi64(m1, x + 8) : _mm512_setzero_si512();
  ScoreRowsBits(rows, count, n, words, [&](const uint64_t* p) {
    __m512i d = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_maskz_loadu_epi64(m0, p), x0));
    if (kTwo) {
      d = _mm512_add_epi64(
          d, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_maskz_loadu_epi64(m1, p + 8), x1)));
    }
    return d;
  }, out);
}

void DotRowsBits(const uint64_t* rows, int64_t count, int n, const uint64_t* x, float* out) {
  const int words = BitWords(n);
  if (words <= 8) return DotRowsBitsShort<false>(rows, count, n, x, out);
  if (words <= 16) return DotRowsBitsShort<true>(rows, count, n, x, out);
  const int full = words & ~7;
  const __mmask8 tail = static_cast<__mmask8>((1u << (words - full)) - 1u);
  ScoreRowsBits(rows, count, n, words, [&](const uint64_t* p) {
    __m512i d = _mm512_setzero_si512();
    for (int w = 0; w < full; w += 8) {
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(p + w), _mm512_loadu_si512(x + w));
      d = _mm512_add_epi64(d, _mm512_popcnt_epi64(v));
    }
    if (tail) {
      const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi64(tail, p + full),
                                         _mm512_maskz_loadu_epi64(tail, x + full));
      d = _mm512_add_epi64(d, _mm512_popcnt_epi64(v));
    }
    return d;
  }, out);
}

// Columns [16 h, 16 (h + C)) of acc held in C registers while every row with
// a nonzero weight adds it to the columns whose bit is set (one masked add
// per 16 columns, the mask read straight from the row's bits); the column
// block is the outer loop, so its slice of the rows' bits stays in L1. The
// last block may be partial: `last` masks its final vector.
template <int C>
inline void AxpyBitsBlock(const uint16_t* halves, int64_t stride, int64_t count, int h,
                          const float* w, float* acc, __mmask16 last) {
  __m512 a[C];
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    const __mmask16 lanes = c == C - 1 ? last : static_cast<__mmask16>(0xFFFF);
    a[c] = _mm512_maskz_loadu_ps(lanes, acc + 16 * (h + c));
  }
  for (int64_t r = 0; r < count; ++r) {
    if (w[r] == 0.f) continue;
    const uint16_t* m = halves + r * stride + h;
    const __m512 wv = _mm512_set1_ps(w[r]);
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const __mmask16 bits = c == C - 1 ? static_cast<__mmask16>(m[c] & last) : m[c];
      a[c] = _mm512_mask_add_ps(a[c], bits, a[c], wv);
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    const __mmask16 lanes = c == C - 1 ? last : static_cast<__mmask16>(0xFFFF);
    _mm512_mask_storeu_ps(acc + 16 * (h + c), lanes, a[c]);
  }
}

void AxpyRowsBits(const uint64_t* rows, int64_t count, int n, const float* w, float* acc) {
  const int64_t stride = int64_t{BitWords(n)} * 4;  // 16-bit halves per row
  const uint16_t* halves = reinterpret_cast<const uint16_t*>(rows);
  const int vectors = (n + 15) / 16;
  const int rem = n & 15;
  int h = 0;
  // Blocks of 16 vectors (256 columns), then one block of what is left.
  for (; h + 16 < vectors || (h + 16 == vectors && rem == 0); h += 16) {
    AxpyBitsBlock<16>(halves, stride, count, h, w, acc, 0xFFFF);
  }
  const int left = vectors - h;
  if (left == 0) return;
  const __mmask16 last = rem ? Tail(rem) : static_cast<__mmask16>(0xFFFF);
  switch (left) {
#define ENGRAM_BITS_BLOCK(C) \
  case C: AxpyBitsBlock<C>(halves, stride, count, h, w, acc, last); break;
    ENGRAM_BITS_BLOCK(1) ENGRAM_BITS_BLOCK(2) ENGRAM_BITS_BLOCK(3) ENGRAM_BITS_BLOCK(4)
    ENGRAM_BITS_BLOCK(5) ENGRAM_BITS_BLOCK(6) ENGRAM_BITS_BLOCK(7) ENGRAM_BITS_BLOCK(8)
    ENGRAM_BITS_BLOCK(9) ENGRAM_BITS_BLOCK(10) ENGRAM_BITS_BLOCK(11) ENGRAM_BITS_BLOCK(12)
    ENGRAM_BITS_BLOCK(13) ENGRAM_BITS_BLOCK(14) ENGRAM_BITS_BLOCK(15) ENGRAM_BITS_BLOCK(16)
#undef ENGRAM_BITS_BLOCK
  }
}

// dst[0, cols) += the first cols (<= 32) 16-bit lanes of a, widened.
inline void AddI16LanesToInt32(__m512i a, int32_t* dst, int cols) {
  const __mmask16 lo_lanes = cols >= 16 ? static_cast<__mmask16>(0xFFFF) : Tail(cols);
  const __mmask16 hi_lanes = cols >= 32 ? static_cast<__mmask16>(0xFFFF)
                             : cols > 16 ? Tail(cols - 16) : static_cast<__mmask16>(0);
  const __m512i lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a));
  const __m512i hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a, 1));
  _mm512_mask_storeu_epi32(dst, lo_lanes,
                           _mm512_add_epi32(_mm512_maskz_loadu_epi32(lo_lanes, dst), lo));
  _mm512_mask_storeu_epi32(dst + 16, hi_lanes,
                           _mm512_add_epi32(_mm512_maskz_loadu_epi32(hi_lanes, dst + 16), hi));
}

// Row r of next (r < next_count) is prefetched while row r is added.
// Always inlined: GCC deems a function whose only effect is a prefetch
// const, and drops the calls it does not inline.
[[gnu::always_inline]] inline void PrefetchRow(const uint64_t* next, int64_t next_count,
                                               int64_t stride, int64_t r) {
  if (r >= next_count) return;
  const char* p = reinterpret_cast<const char*>(next + r * stride);
  for (int64_t off = 0; off < stride * 8; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
  _mm_prefetch(p + stride * 8 - 1, _MM_HINT_T1);
}

// The integer form in two tiers, for columns [64 h, 64 (h + C)): rows add
// their weight into 8-bit lanes (one masked add per 64 columns, the mask
// read straight from the row's bits), which are widened into 16-bit lanes
// whenever the |w| added since reach 127; a row with |w| > 127 adds into
// the 16-bit lanes itself. The 16-bit lanes are widened into the int32 acc
// once at the end: the caller keeps the group's sum |w| <= 32767, so no
// lane leaves its range.
template <int C>
inline void AxpyBitsI8Block(const uint64_t* words, int64_t stride, int64_t count, int h,
                            const int16_t* w, int32_t* acc, int last_cols,
                            const uint64_t* next, int64_t next_count) {
  __m512i a8[C], a16[2 * C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    a8[c] = _mm512_setzero_si512();
    a16[2 * c] = _mm512_setzero_si512();
    a16[2 * c + 1] = _mm512_setzero_si512();
  }
  const uint64_t last = last_cols == 64 ? ~uint64_t{0} : (uint64_t{1} << last_cols) - 1;
  auto widen = [&] {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      a16[2 * c] = _mm512_add_epi16(a16[2 * c], _mm512_cvtepi8_epi16(_mm512_castsi512_si256(a8[c])));
      a16[2 * c + 1] =
          _mm512_add_epi16(a16[2 * c + 1], _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(a8[c], 1)));
      a8[c] = _mm512_setzero_si512();
    }
  };
  // Rows with |w| <= 127 first, in segments whose |w| sum to at most 127
  // (then widened), and the (few) larger ones after: loops without a branch
  // to another path keep every accumulator in its register.
  bool large = false;
  for (int64_t r = 0; r < count;) {
    int64_t e = r;
    for (int budget = 0; e < count; ++e) {
      const int m = w[e] < 0 ? -w[e] : w[e];
      if (m > 127) {
        large = true;
        continue;
      }
      if (budget + m > 127) break;
      budget += m;
    }
    for (; r < e; ++r) {
      PrefetchRow(next, next_count, stride, r);
      const int wr = w[r];
      if (wr == 0 || wr > 127 || wr < -127) continue;
      const uint64_t* bits = words + r * stride + h;
      const __m512i wv = _mm512_set1_epi8(static_cast<char>(wr));
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        const uint64_t k = c == C - 1 ? bits[c] & last : bits[c];
        a8[c] = _mm512_mask_add_epi8(a8[c], static_cast<__mmask64>(k), a8[c], wv);
      }
    }
    widen();
  }
  for (int64_t r = 0; large && r < count; ++r) {
    const int wr = w[r];
    if (wr >= -127 && wr <= 127) continue;
    const uint64_t* bits = words + r * stride + h;
    const __m512i wv = _mm512_set1_epi16(static_cast<int16_t>(wr));
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const uint64_t k = c == C - 1 ? bits[c] & last : bits[c];
      a16[2 * c] = _mm512_mask_add_epi16(a16[2 * c], static_cast<__mmask32>(k), a16[2 * c], wv);
      a16[2 * c + 1] =
          _mm512_mask_add_epi16(a16[2 * c + 1], static_cast<__mmask32>(k >> 32), a16[2 * c + 1], wv);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < 2 * C; ++v) {
    int32_t* dst = acc + 64 * h + 32 * v;
    const int cols = v < 2 * C - 2 ? 32 : std::min(32, std::max(0, last_cols - 32 * (v - (2 * C - 2))));
    if (cols > 0) AddI16LanesToInt32(a16[v], dst, cols);
  }
}

// One group of rows whose |w| sum to at most 32767, so no 16-bit lane
// leaves range: column blocks of 512 outer, so a block's slice of the rows
// stays in L1. The first column block prefetches the next rows.
void AxpyRowsBitsI16Group(const uint64_t* rows, int64_t stride, int64_t count, int n,
                          const int16_t* w, int32_t* acc, const uint64_t* next,
                          int64_t next_count) {
  const int vectors = (n + 63) / 64;
  const int rem = n & 63;
  int h = 0;
  for (; h + 8 < vectors || (h + 8 == vectors && rem == 0); h += 8) {
    AxpyBitsI8Block<8>(rows, stride, count, h, w, acc, 64, next, h == 0 ? next_count : 0);
  }
  const int left = vectors - h;
  if (left == 0) return;
  const int last_cols = rem ? rem : 64;
  switch (left) {
#define ENGRAM_BITS_I8_BLOCK(C) \
  case C:                          \
    AxpyBitsI8Block<C>(rows, stride, count, h, w, acc, last_cols, next, h == 0 ? next_count : 0); \
    break;
    ENGRAM_BITS_I8_BLOCK(1) ENGRAM_BITS_I8_BLOCK(2) ENGRAM_BITS_I8_BLOCK(3)
    ENGRAM_BITS_I8_BLOCK(4) ENGRAM_BITS_I8_BLOCK(5) ENGRAM_BITS_I8_BLOCK(6)
    ENGRAM_BITS_I8_BLOCK(7) ENGRAM_BITS_I8_BLOCK(8)
#undef ENGRAM_BITS_I8_BLOCK
  }
}

void AxpyRowsBitsI16(const uint64_t* rows, int64_t count, int n, const int16_t* w,
                     int32_t* acc, const uint64_t* next, int64_t next_count) {
  const int64_t stride = BitWords(n);
  // Groups of consecutive rows whose |w| sum to at most 32767 (every
  // |w| <= 32767, so each group takes at least one row).
  int64_t first = 0;
  while (first < count) {
    int64_t r = first, budget = 0;
    while (r < count) {
      const int32_t m = w[r] < 0 ? -int32_t{w[r]} : int32_t{w[r]};
      if (budget + m > 32767) break;
      budget += m;
      ++r;
    }
    if (r == first) ++r;  // |w| = 32768 (-32768): outside the contract
    AxpyRowsBitsI16Group(rows + first * stride, stride, r - first, n, w + first, acc,
                         next != nullptr ? next + first * stride : nullptr, next_count - first);
    first = r;
  }
}

// Overlap statistics, 16 rows a step: sums in double lanes (exact: every
// partial sum is an integer below 2^53), max / min in float lanes (the
// overlaps are exact integers), the first row at the max from a second
// compare-only scan, and the weights as (a d + b) >> shift narrowed to int16.
void OverlapWeights(const float* d, int64_t count, int32_t a, int32_t b, int shift, int16_t* w16,
                    OverlapStats* stats) {
  __m512d s_lo = _mm512_setzero_pd(), s_hi = _mm512_setzero_pd();
  __m512d q_lo = _mm512_setzero_pd(), q_hi = _mm512_setzero_pd();
  __m512 mx = _mm512_set1_ps(-INFINITY), mn = _mm512_set1_ps(INFINITY);
  const __m512i av = _mm512_set1_epi32(a), bv = _mm512_set1_epi32(b);
  const __m128i sh = _mm_cvtsi32_si128(shift);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 m = count - i >= 16 ? static_cast<__mmask16>(0xFFFF) : Tail(static_cast<int>(count - i));
    const __m512 v = _mm512_maskz_loadu_ps(m, d + i);
    mx = _mm512_mask_max_ps(mx, m, mx, v);
    mn = _mm512_mask_min_ps(mn, m, mn, v);
    const __m512i vi = _mm512_cvttps_epi32(v);  // masked-off lanes are 0
    const __m512d lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(vi));
    const __m512d hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(vi, 1));
    s_lo = _mm512_add_pd(s_lo, lo);
    s_hi = _mm512_add_pd(s_hi, hi);
    q_lo = _mm512_fmadd_pd(lo, lo, q_lo);
    q_hi = _mm512_fmadd_pd(hi, hi, q_hi);
    if (w16 != nullptr) {
      const __m512i w = _mm512_sra_epi32(_mm512_add_epi32(_mm512_mullo_epi32(av, vi), bv), sh);
      _mm256_mask_storeu_epi16(w16 + i, m, _mm512_cvtepi32_epi16(w));
    }
  }
  OverlapStats st;
  st.sum = static_cast<int64_t>(_mm512_reduce_add_pd(_mm512_add_pd(s_lo, s_hi)));
  st.sum_sq = _mm512_reduce_add_pd(_mm512_add_pd(q_lo, q_hi));
  st.max = _mm512_reduce_max_ps(mx);
  st.min = _mm512_reduce_min_ps(mn);
  const __m512 target = _mm512_set1_ps(st.max);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 m = count - i >= 16 ? static_cast<__mmask16>(0xFFFF) : Tail(static_cast<int>(count - i));
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, d + i), target, _CMP_EQ_OQ);
    if (hit != 0) {
      st.argmax = i + __builtin_ctz(hit);
      break;
    }
  }
  *stats = st;
}

// ActiveRowsOfStateGroups, 16 rows at a time: per group of four states,
// the rows any of them weights with a nonzero (or NaN) w, compressed into
// the group's list.
void ActiveRowsOfGroups(const float* w, int64_t count, int64_t b, int32_t* lists,
                        int64_t* sizes) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t g = 0; 4 * g < b; ++g) {
    const int64_t q = 4 * g, states = b - q < 4 ? b - q : 4;
    int32_t* list = lists + g * count;
    int64_t m = 0, r = 0;
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; r + 16 <= count; r += 16) {
      __mmask16 any = 0;
      for (int64_t s = 0; s < states; ++s) {
        any |= _mm512_cmp_ps_mask(_mm512_loadu_ps(w + (q + s) * count + r), zero, _CMP_NEQ_UQ);
      }
      if (any != 0) {  // a full store: m <= r, so list + m + 16 stays in the group's list
        _mm512_storeu_si512(list + m, _mm512_maskz_compress_epi32(any, iv));
        m += __builtin_popcount(any);
      }
      iv = _mm512_add_epi32(iv, step);
    }
    for (; r < count; ++r) {
      bool active = false;
      for (int64_t s = 0; s < states; ++s) active |= w[(q + s) * count + r] != 0.f;
      if (active) list[m++] = static_cast<int32_t>(r);
    }
    sizes[g] = m;
  }
}

void DotRowsMulti(const float* rows, int64_t count, int n, const float* x, int64_t b,
                  float* out) {
  simd::DotRowsMulti<Avx512, 6>(rows, count, n, x, b, out);
}

void AxpyRowsMulti(const float* rows, int64_t count, int n, const float* w, int64_t b,
                   float* acc) {
  simd::AxpyRowsMulti<Avx512, 6>(rows, count, n, w, b, acc, ActiveRowsOfGroups);
}

// exp(d) for d <= 0 (or NaN) as the AVX2 Exp4: d = k ln 2 + r with |r| <=
// ln 2 / 2 (ln 2 in two parts), the Taylor series to degree 12, then
// p * 2^k by VSCALEFPD.
inline __m512d Exp8(__m512d d) {
  d = _mm512_max_pd(_mm512_set1_pd(-700.0), d);  // NaN stays NaN
  const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(d, _mm512_set1_pd(kLog2E)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(kLn2Hi), d);
  r = _mm512_fnmadd_pd(k, _mm512_set1_pd(kLn2Lo), r);
  __m512d p = _mm512_set1_pd(kExpTaylor[0]);
#pragma GCC unroll 12
  for (int i = 1; i < 13; ++i) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(kExpTaylor[i]));
  return _mm512_scalef_pd(p, k);
}

// exp_weights, eight lanes at a time (the AVX2 kernel's maths).
double ExpWeights(const double* w, int64_t count, double shift, double cut, float* out) {
  const __m512d vshift = _mm512_set1_pd(shift), vcut = _mm512_set1_pd(cut);
  __m512d sum = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m512d wv = _mm512_loadu_pd(w + i);
    const __mmask8 keep = _mm512_cmp_pd_mask(wv, vcut, _CMP_NLT_UQ);  // NaN kept: exp gives NaN
    if (keep == 0) {  // a sharp softmax: most groups are all below the cut
      _mm256_storeu_ps(out + i, _mm256_setzero_ps());
      continue;
    }
    const __m512d e = _mm512_maskz_mov_pd(keep, Exp8(_mm512_sub_pd(wv, vshift)));
    _mm256_storeu_ps(out + i, _mm512_cvtpd_ps(e));
    sum = _mm512_add_pd(sum, e);
  }
  double total = _mm512_reduce_add_pd(sum);
  return total + ExpWeightsTail(w, i, count, shift, cut, out);
}

float MaxValue(const float* v, int64_t count) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, x);
  }
  if (i < count) {
    const __mmask16 t = static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(t, v + i);
    nan |= _mm512_mask_cmp_ps_mask(t, x, x, _CMP_UNORD_Q);
    m = _mm512_mask_max_ps(m, t, m, x);
  }
  return nan != 0 ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(m);
}

int64_t IndicesAtLeast(const float* v, int64_t count, float t, int32_t* idx) {
  const __m512 tv = _mm512_set1_ps(t);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t found = 0, i = 0;
  for (; i + 16 <= count; i += 16) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + i), tv, _CMP_GE_OQ);
    if (m != 0) {  // a full store (VPCOMPRESSD to memory is slow on Zen 4): found <= i
      _mm512_storeu_si512(idx + found, _mm512_maskz_compress_epi32(m, iv));
      found += __builtin_popcount(m);
    }
    iv = _mm512_add_epi32(iv, step);
  }
  for (; i < count; ++i) {
    idx[found] = static_cast<int32_t>(i);
    found += v[i] >= t;
  }
  return found;
}

void MaxNearestKey(const float* v, const float* sq_norms, int64_t count, double* key,
                   int64_t* row) {
  // Per lane the largest key and its first index; ties between lanes go to
  // the smaller index.
  const __m512d half = _mm512_set1_pd(0.5);
  __m512d best = _mm512_set1_pd(-INFINITY);
  __m512i best_i = _mm512_set1_epi64(-1);
  __m512i iv = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i step = _mm512_set1_epi64(8);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m512d k = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(v + i)),
                                    _mm512_mul_pd(half, _mm512_cvtps_pd(_mm256_loadu_ps(sq_norms + i))));
    const __mmask8 up = _mm512_cmp_pd_mask(k, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_pd(best, up, k);
    best_i = _mm512_mask_mov_epi64(best_i, up, iv);
    iv = _mm512_add_epi64(iv, step);
  }
  alignas(64) double lane_key[8];
  alignas(64) int64_t lane_row[8];
  _mm512_store_pd(lane_key, best);
  _mm512_store_si512(lane_row, best_i);
  double k0 = *key;
  int64_t r0 = -1;
  for (int l = 0; l < 8; ++l) {
    if (lane_row[l] >= 0 && (lane_key[l] > k0 || (lane_key[l] == k0 && r0 >= 0 && lane_row[l] < r0))) {
      k0 = lane_key[l];
      r0 = lane_row[l];
    }
  }
  for (; i < count; ++i) {
    const double k = double{v[i]} - 0.5 * double{sq_norms[i]};
    if (k > k0) {
      k0 = k;
      r0 = i;
    }
  }
  if (r0 >= 0) {
    *key = k0;
    *row = r0;
  }
}

}  // namespace

const KernelTable& Avx512Kernels() {
  static const KernelTable t{SimdLevel::kAvx512, DotRows,       AxpyRows,
                             DotRowsBf16,        AxpyRowsBf16,  DotRowsI8,
                             DotRowsBits,
                             AxpyRowsBits,       DotRowsMulti,  AxpyRowsMulti,
                             ExpWeights,         AxpyRowsBitsI16,
                             OverlapWeights,     MaxValue,      IndicesAtLeast,
                             MaxNearestKey};
  return t;
}

}  // namespace engram::core::kernels
