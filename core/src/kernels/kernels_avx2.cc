// AVX2 + FMA kernels (built with -mavx2 -mfma -mpopcnt; called only when
// the CPU reports those features). Tails shorter than 8 lanes use masked
// loads and stores, so no read or write leaves the row.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/rows_simd.h"
#include "kernels/scratch.h"

namespace engram::core::kernels {
namespace {


// Lanes [0, rem) set, rem in [0, 8].
inline __m256i TailMask(int rem) {
  alignas(32) static const int32_t kOnes[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kOnes + 8 - rem));
}

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

// 16 floats [v0 .. v15] -> [v0 v2 .. v14 | v1 v3 .. v15] (the layout of
// the even and odd halves of 16 bf16 values loaded as 8 32-bit lanes).
inline void SplitEvenOdd16(const float* src, float* dst) {
  const __m256 a = _mm256_loadu_ps(src), b = _mm256_loadu_ps(src + 8);
  const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  _mm256_storeu_ps(dst, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0))));
  _mm256_storeu_ps(dst + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0))));
}

// The ISA traits of kernels/rows_simd.h: 8 lanes, tails by mask vectors.
struct Avx2 {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  static V Zero() { return _mm256_setzero_ps(); }
  static V Set1(float v) { return _mm256_set1_ps(v); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static Mask TailMask(int rem) { return kernels::TailMask(rem); }
  static V LoadMasked(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void StoreMasked(float* p, Mask m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V LoadTail(const float* p, int rem) { return LoadMasked(p, TailMask(rem)); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void StoreTail(float* p, int rem, V v) { StoreMasked(p, TailMask(rem), v); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float Sum(V v) { return HorizontalSum(v); }
};

// Loaders: 8 consecutive values of a row as f32, full or masked.
struct F32 {
  using T = float;
  static __m256 Load(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 LoadTail(const float* p, int rem) {
    return _mm256_maskload_ps(p, TailMask(rem));
  }
};
struct Bf16 {
  using T = uint16_t;
  static __m256 Load(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static __m256 LoadTail(const uint16_t* p, int rem) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, sizeof(uint16_t) * rem);
    return Load(buf);
  }
};

void DotRows(const float* rows, int64_t count, int n, const float* x, float* out) {
  simd::DotRows<Avx2, F32>(rows, count, n, x, out);
}
void AxpyRows(const float* rows, int64_t count, int n, const float* w, float* acc) {
  simd::AxpyRows<Avx2, F32>(rows, count, n, w, acc);
}
// bf16 rows without a widening shuffle: a 32-bit lane of a 16-value load
// holds values 2l (low half) and 2l + 1 (high half); the high half masked
// and the low half shifted up are already those two values as f32. The
// state is split once per call into its even and odd coordinates per group
// of 16, so each group costs one load, one AND, one shift and two FMAs per
// row. The last n mod 16 values go through the widening loader.
void DotRowsBf16(const uint16_t* rows, int64_t count, int n, const float* x, float* out) {
  const int full = n & ~15;
  const int rem = n - full;
  constexpr int kStack = 4096;
  alignas(32) float stack_buf[kStack];
  Scratch<float> heap(full > kStack ? full : 0);
  float* xs = full > kStack ? heap.get() : stack_buf;
  for (int g = 0; g < full; g += 16) SplitEvenOdd16(x + g, xs + g);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  auto group = [&](const uint16_t* p, int g, __m256 a) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + g));
    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    a = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs + g), a);
    return _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs + g + 8), a);
  };
  auto tail = [&](const uint16_t* p, __m256 a) {
    int i = full;
    if (rem >= 8) {
      a = _mm256_fmadd_ps(Bf16::Load(p + i), _mm256_loadu_ps(x + i), a);
      i += 8;
    }
    if (n - i > 0) {
      a = _mm256_fmadd_ps(Bf16::LoadTail(p + i, n - i),
                          _mm256_maskload_ps(x + i, TailMask(n - i)), a);
    }
    return a;
  };
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const uint16_t* p0 = rows + r * n;
    const uint16_t* p1 = p0 + n;
    const uint16_t* p2 = p1 + n;
    const uint16_t* p3 = p2 + n;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    // The next four rows, two lines per group: without it the 2-byte rows
    // stream at ~2/3 of the f32 kernel's bytes per second (measured: f32
    // gains nothing from the same prefetch).
    const char* next = reinterpret_cast<const char*>(p3 + n);
    for (int g = 0; g < full; g += 16) {
      _mm_prefetch(next + 8 * g, _MM_HINT_T0);
      _mm_prefetch(next + 8 * g + 64, _MM_HINT_T0);
      a0 = group(p0, g, a0);
      a1 = group(p1, g, a1);
      a2 = group(p2, g, a2);
      a3 = group(p3, g, a3);
    }
    if (rem) {
      a0 = tail(p0, a0);
      a1 = tail(p1, a1);
      a2 = tail(p2, a2);
      a3 = tail(p3, a3);
    }
    out[r] = HorizontalSum(a0);
    out[r + 1] = HorizontalSum(a1);
    out[r + 2] = HorizontalSum(a2);
    out[r + 3] = HorizontalSum(a3);
  }
  for (; r < count; ++r) {  // same order as above
    const uint16_t* p = rows + r * n;
    __m256 a = _mm256_setzero_ps();
    for (int g = 0; g < full; g += 16) a = group(p, g, a);
    if (rem) a = tail(p, a);
    out[r] = HorizontalSum(a);
  }
}
void AxpyRowsBf16(const uint16_t* rows, int64_t count, int n, const float* w, float* acc) {
  simd::AxpyRows<Avx2, Bf16>(rows, count, n, w, acc);
}

// int8 rows: 16 values of a row and of x sign-extended to 16 bits, one
// VPMADDWD into 8 int32 lanes (exact: each pair sums to at most 2 * 127^2);
// four rows share each group of x. The last n mod 16 values are scalar.
void DotRowsI8(const int8_t* rows, int64_t count, int n, const int8_t* x, const int32_t*,
               int32_t* out) {
  const int full = n & ~15;
  auto wide = [](const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  auto sum = [&](__m256i a, const int8_t* p) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    int32_t t = _mm_cvtsi128_si32(s);
    for (int i = full; i < n; ++i) t += int32_t{p[i]} * x[i];
    return t;
  };
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const int8_t* p0 = rows + r * n;
    const int8_t* p1 = p0 + n;
    const int8_t* p2 = p1 + n;
    const int8_t* p3 = p2 + n;
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    __m256i a2 = _mm256_setzero_si256(), a3 = _mm256_setzero_si256();
    const char* next = reinterpret_cast<const char*>(p3 + n);
    for (int g = 0; g < full; g += 16) {
      _mm_prefetch(next + 4 * g, _MM_HINT_T0);  // the next four rows, a line per group
      const __m256i xv = wide(x + g);
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(wide(p0 + g), xv));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(wide(p1 + g), xv));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(wide(p2 + g), xv));
      a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(wide(p3 + g), xv));
    }
    out[r] = sum(a0, p0);
    out[r + 1] = sum(a1, p1);
    out[r + 2] = sum(a2, p2);
    out[r + 3] = sum(a3, p3);
  }
  for (; r < count; ++r) {
    const int8_t* p = rows + r * n;
    __m256i a = _mm256_setzero_si256();
    for (int g = 0; g < full; g += 16) a = _mm256_add_epi32(a, _mm256_madd_epi16(wide(p + g), wide(x + g)));
    out[r] = sum(a, p);
  }
}

void DotRowsBits(const uint64_t* rows, int64_t count, int n, const uint64_t* x, float* out) {
  const int words = BitWords(n);
  for (int64_t r = 0; r < count; ++r) {
    const uint64_t* p = rows + r * words;
    // Rows of a few words are consumed faster than the hardware prefetcher
    // ramps up: ask for the row 64 ahead (measured +30 % from memory).
    const char* ahead = reinterpret_cast<const char*>(p + 64 * words);
    for (int off = 0; off < words * 8; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    int64_t d0 = 0, d1 = 0;
    int w = 0;
    for (; w + 2 <= words; w += 2) {
      d0 += _mm_popcnt_u64(p[w] ^ x[w]);
      d1 += _mm_popcnt_u64(p[w + 1] ^ x[w + 1]);
    }
    if (w < words) d0 += _mm_popcnt_u64(p[w] ^ x[w]);
    out[r] = static_cast<float>(n - 2 * (d0 + d1));
  }
}

// Eight bits -> eight lanes of all-ones / zero.
inline __m256 ByteMask(uint32_t byte) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_set1_epi32(static_cast<int>(byte));
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, bits), bits));
}

void AxpyRowsBits(const uint64_t* rows, int64_t count, int n, const float* w, float* acc) {
  const int words = BitWords(n);
  const int full = n & ~7;
  for (int64_t r = 0; r < count; ++r) {
    if (w[r] == 0.f) continue;
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(rows + r * words);
    const __m256 wv = _mm256_set1_ps(w[r]);
    for (int i = 0; i < full; i += 8) {
      const __m256 add = _mm256_and_ps(ByteMask(bytes[i >> 3]), wv);
      _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), add));
    }
    for (int i = full; i < n; ++i) {
      if ((bytes[i >> 3] >> (i & 7)) & 1u) acc[i] += w[r];
    }
  }
}

// exp(d) for 4 lanes of d in [-700, 0], to ~1 ulp: d = k ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two so k ln2 is exact), e^r by its Taylor
// series to degree 12 (truncation below 2^-52), times 2^k built in the
// exponent bits.
inline __m256d Exp4(__m256d d) {
  d = _mm256_max_pd(_mm256_set1_pd(-700.0), d);  // NaN stays NaN
  const __m256d k = _mm256_round_pd(_mm256_mul_pd(d, _mm256_set1_pd(kLog2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(kLn2Hi), d);
  r = _mm256_fnmadd_pd(k, _mm256_set1_pd(kLn2Lo), r);
  __m256d p = _mm256_set1_pd(kExpTaylor[0]);
#pragma GCC unroll 12
  for (int i = 1; i < 13; ++i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kExpTaylor[i]));
  const __m256i e = _mm256_slli_epi64(
      _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k)), _mm256_set1_epi64x(1023)),
      52);
  return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

double ExpWeights(const double* w, int64_t count, double shift, double cut, float* out) {
  const __m256d vshift = _mm256_set1_pd(shift), vcut = _mm256_set1_pd(cut);
  __m256d sum = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const __m256d wv = _mm256_loadu_pd(w + i);
    const __m256d keep = _mm256_cmp_pd(wv, vcut, _CMP_NLT_UQ);  // NaN kept: exp gives NaN
    if (_mm256_movemask_pd(keep) == 0) {  // a sharp softmax: most groups are all below the cut
      _mm_storeu_ps(out + i, _mm_setzero_ps());
      continue;
    }
    const __m256d e = _mm256_and_pd(Exp4(_mm256_sub_pd(wv, vshift)), keep);
    const __m128 f = _mm256_cvtpd_ps(e);
    _mm_storeu_ps(out + i, f);
    sum = _mm256_add_pd(sum, e);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, sum);
  double total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  return total + ExpWeightsTail(w, i, count, shift, cut, out);
}

void DotRowsMulti(const float* rows, int64_t count, int n, const float* x, int64_t b,
                  float* out) {
  simd::DotRowsMulti<Avx2, 3>(rows, count, n, x, b, out);
}
void AxpyRowsMulti(const float* rows, int64_t count, int n, const float* w, int64_t b,
                   float* acc) {
  simd::AxpyRowsMulti<Avx2, 3>(rows, count, n, w, b, acc, ActiveRowsOfStateGroups);
}

}  // namespace

const KernelTable& Avx2Kernels() {
  static const KernelTable t{SimdLevel::kAvx2, DotRows,      AxpyRows,     DotRowsBf16,
                             AxpyRowsBf16,     DotRowsI8,    DotRowsBits,  AxpyRowsBits,
                             DotRowsMulti,
                             AxpyRowsMulti, ExpWeights,   /*axpy_rows_bits_i16=*/nullptr,
                             ScalarOverlapWeights, ScalarMaxValue, ScalarIndicesAtLeast,
                             ScalarMaxNearestKey};
  return t;
}

}  // namespace engram::core::kernels
