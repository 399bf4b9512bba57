// AVX-512 kernels with the BF16 and VNNI extensions (built with the AVX-512
// flags plus -mavx512bf16 -mavx512vnni; called only when the CPU reports
// both). Everything but the bf16 and int8 dot products is the AVX-512
// table's.
//
// The int8 dot product runs on VPDPBUSD, which multiplies unsigned by signed
// bytes and adds groups of four products into int32 lanes: x + 128 as
// unsigned bytes (x XOR 0x80) against the row, minus 128 times the row's sum,
// is the exact sum_i x_i row_i (each lane gains at most 4 * 255 * 127 a
// group). Four rows share each 64-byte group of x; the row is read in its
// one stored byte a value.
//
// The bf16 dot product runs on VDPBF16PS, which multiplies pairs of bf16
// values exactly and adds them into f32 lanes. The state is split once per
// call into two bf16 vectors, x 2^-e = hi + lo + r with |r_i| <= 2^-16 |x_i|
// 2^-e (hi the rounding of x 2^-e, lo the rounding of the exact remainder;
// 2^-e puts the largest |x_i| in [1/2, 1)), and each group of 32 row values
// costs one load and two VDPBF16PS: the row is read in its stored 2 bytes a
// value, with no widening. The dot product is 2^e (<row, hi> + <row, lo>),
// so it differs from the f32 kernel's (which uses x exactly) by at most
// 2^-16 sum |row_i x_i| beyond the f32 accumulation error (n/16 + 5
// roundings per lane), plus what VDPBF16PS's flush of subnormal inputs to
// zero costs: rows' entries below 2^-126 (at most 2^-126 sqrt(n) |x|) and
// state entries below 2^-117 of the largest (at most 2^-116 sqrt(n)
// |row| |x|).
#include <immintrin.h>

#include <cmath>

#include "kernels/kernels.h"
#include "kernels/scratch.h"

namespace engram::core::kernels {
namespace {


inline __m512bh AsBh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

inline __mmask16 Tail16(int rem) { return static_cast<__mmask16>((1u << rem) - 1u); }

// The state scaled by a power of two 2^-e (so its largest finite |x_i| is in
// [1/2, 1) and no part underflows but entries below 2^-117 of the largest),
// split as hi[i] + lo[i] for i < n and zero up to `padded` (a multiple of
// 32). Returns 2^e. An entry that is not finite keeps lo = 0, so inf * row
// gives what the f32 kernel gives.
double SplitState(const float* x, int n, int padded, uint16_t* hi, uint16_t* lo) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 inf = _mm512_set1_ps(INFINITY);
  __m512 mv = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? 0xFFFF : Tail16(n - i);
    const __m512 a = _mm512_and_ps(_mm512_maskz_loadu_ps(lanes, x + i), abs_mask);
    mv = _mm512_mask_max_ps(mv, _mm512_cmp_ps_mask(a, inf, _CMP_LT_OQ), mv, a);
  }
  const float m = _mm512_reduce_max_ps(mv);
  int e = 0;
  if (m > 0.f) __builtin_frexpf(m, &e);
  if (e < -125) {  // 2^-e is not a normal float: scale in two exact steps
    for (int i = 0; i < n; ++i) {
      const float v = __builtin_ldexpf(x[i], -e);
      const uint16_t h = FloatToBf16(v);
      const float hf = Bf16ToFloat(h);
      hi[i] = h;
      lo[i] = __builtin_isfinite(hf) ? FloatToBf16(v - hf) : 0;
    }
    for (int i = n; i < padded; ++i) hi[i] = lo[i] = 0;
    return __builtin_ldexp(1.0, e);
  }
  const __m512 scale = _mm512_set1_ps(__builtin_ldexpf(1.f, -e));
  for (int i = 0; i < padded; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? 0xFFFF : n > i ? Tail16(n - i) : 0;
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + i), scale);
    const __m256bh h = _mm512_cvtneps_pbh(v);
    const __m512 hf = _mm512_cvtpbh_ps(h);
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_and_ps(hf, abs_mask), inf, _CMP_LT_OQ);
    const __m256bh l = _mm512_cvtneps_pbh(_mm512_maskz_sub_ps(finite, v, hf));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + i), reinterpret_cast<const __m256i&>(h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i), reinterpret_cast<const __m256i&>(l));
  }
  return __builtin_ldexp(1.0, e);
}

void DotRowsBf16(const uint16_t* rows, int64_t count, int n, const float* x, float* out) {
  const int full = n & ~31;
  const int rem = n - full;
  const int padded = (n + 31) & ~31;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << rem) - 1u);
  constexpr int kStack = 4096;
  alignas(64) uint16_t stack_buf[2 * kStack];
  Scratch<uint16_t> heap(padded > kStack ? 2 * int64_t{padded} : 0);
  uint16_t* xh = padded > kStack ? heap.get() : stack_buf;
  uint16_t* xl = xh + padded;
  const double unscale = SplitState(x, n, padded, xh, xl);
  auto result = [&](__m512 h, __m512 l) {
    return static_cast<float>(double{_mm512_reduce_add_ps(_mm512_add_ps(h, l))} * unscale);
  };
  auto group = [&](const uint16_t* p, int i, __m512& h, __m512& l) {
    const __m512bh v = AsBh(_mm512_loadu_si512(p + i));
    h = _mm512_dpbf16_ps(h, v, AsBh(_mm512_loadu_si512(xh + i)));
    l = _mm512_dpbf16_ps(l, v, AsBh(_mm512_loadu_si512(xl + i)));
  };
  auto last = [&](const uint16_t* p, __m512& h, __m512& l) {
    const __m512bh v = AsBh(_mm512_maskz_loadu_epi16(tail, p + full));
    h = _mm512_dpbf16_ps(h, v, AsBh(_mm512_loadu_si512(xh + full)));
    l = _mm512_dpbf16_ps(l, v, AsBh(_mm512_loadu_si512(xl + full)));
  };
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const uint16_t* p0 = rows + r * n;
    const uint16_t* p1 = p0 + n;
    const uint16_t* p2 = p1 + n;
    const uint16_t* p3 = p2 + n;
    __m512 h0 = _mm512_setzero_ps(), h1 = _mm512_setzero_ps();
    __m512 h2 = _mm512_setzero_ps(), h3 = _mm512_setzero_ps();
    __m512 l0 = _mm512_setzero_ps(), l1 = _mm512_setzero_ps();
    __m512 l2 = _mm512_setzero_ps(), l3 = _mm512_setzero_ps();
    // The next four rows (contiguous, 8n bytes), 256 bytes per group of 32
    // values: 2-byte rows are consumed faster than the hardware prefetcher
    // ramps up.
    const char* next = reinterpret_cast<const char*>(p3 + n);
    for (int i = 0; i < full; i += 32) {
      const char* a = next + 8 * i;
      _mm_prefetch(a, _MM_HINT_T0);
      _mm_prefetch(a + 64, _MM_HINT_T0);
      _mm_prefetch(a + 128, _MM_HINT_T0);
      _mm_prefetch(a + 192, _MM_HINT_T0);
      group(p0, i, h0, l0);
      group(p1, i, h1, l1);
      group(p2, i, h2, l2);
      group(p3, i, h3, l3);
    }
    if (rem) {
      last(p0, h0, l0);
      last(p1, h1, l1);
      last(p2, h2, l2);
      last(p3, h3, l3);
    }
    out[r] = result(h0, l0);
    out[r + 1] = result(h1, l1);
    out[r + 2] = result(h2, l2);
    out[r + 3] = result(h3, l3);
  }
  for (; r < count; ++r) {  // the same order as above
    const uint16_t* p = rows + r * n;
    __m512 h = _mm512_setzero_ps(), l = _mm512_setzero_ps();
    for (int i = 0; i < full; i += 32) group(p, i, h, l);
    if (rem) last(p, h, l);
    out[r] = result(h, l);
  }
}

void DotRowsI8(const int8_t* rows, int64_t count, int n, const int8_t* x, const int32_t* row_sums,
               int32_t* out) {
  const int full = n & ~63;
  const int rem = n - full;
  const __mmask64 tail = rem ? (uint64_t{1} << rem) - 1u : 0;
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  // Masked-off bytes of the tail are 0 in the row, so what x holds there
  // does not count.
  const __m512i xt = _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, x + full), bias);
  auto dot = [&](__m512i a, const int8_t* p, int g, __m512i xv) {
    return _mm512_dpbusd_epi32(a, xv, _mm512_loadu_si512(p + g));
  };
  auto last = [&](__m512i a, const int8_t* p) {
    return _mm512_dpbusd_epi32(a, xt, _mm512_maskz_loadu_epi8(tail, p + full));
  };
  // The lanes' sum of (x + 128) row wraps modulo 2^32 when it passes 2^31
  // (vector adds, no signed overflow in C++); the difference, which fits
  // int32, comes out right in unsigned arithmetic.
  auto result = [&](__m512i a, int64_t row) {
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4E));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xB1));
    return static_cast<int32_t>(static_cast<uint32_t>(_mm_cvtsi128_si32(q)) -
                                static_cast<uint32_t>(128 * row_sums[row]));
  };
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const int8_t* p0 = rows + r * n;
    const int8_t* p1 = p0 + n;
    const int8_t* p2 = p1 + n;
    const int8_t* p3 = p2 + n;
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
    // The next four rows (contiguous, 4n bytes), 256 bytes per group.
    const char* next = reinterpret_cast<const char*>(p3 + n);
    for (int g = 0; g < full; g += 64) {
      const char* a = next + 4 * g;
      _mm_prefetch(a, _MM_HINT_T0);
      _mm_prefetch(a + 64, _MM_HINT_T0);
      _mm_prefetch(a + 128, _MM_HINT_T0);
      _mm_prefetch(a + 192, _MM_HINT_T0);
      const __m512i xv = _mm512_xor_si512(_mm512_loadu_si512(x + g), bias);
      a0 = dot(a0, p0, g, xv);
      a1 = dot(a1, p1, g, xv);
      a2 = dot(a2, p2, g, xv);
      a3 = dot(a3, p3, g, xv);
    }
    if (rem) {
      a0 = last(a0, p0);
      a1 = last(a1, p1);
      a2 = last(a2, p2);
      a3 = last(a3, p3);
    }
    out[r] = result(a0, r);
    out[r + 1] = result(a1, r + 1);
    out[r + 2] = result(a2, r + 2);
    out[r + 3] = result(a3, r + 3);
  }
  for (; r < count; ++r) {
    const int8_t* p = rows + r * n;
    __m512i a = _mm512_setzero_si512();
    for (int g = 0; g < full; g += 64) {
      a = dot(a, p, g, _mm512_xor_si512(_mm512_loadu_si512(x + g), bias));
    }
    if (rem) a = last(a, p);
    out[r] = result(a, r);
  }
}

}  // namespace

const KernelTable& Avx512Bf16Kernels() {
  static const KernelTable t = [] {
    KernelTable k = Avx512Kernels();
    k.level = SimdLevel::kAvx512Bf16;
    k.dot_rows_bf16 = DotRowsBf16;
    k.dot_rows_i8 = DotRowsI8;
    return k;
  }();
  return t;
}

}  // namespace engram::core::kernels
