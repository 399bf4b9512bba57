// AVX2 + FMA kernels (built with -mavx2 -mfma -mpopcnt; called only when
// the CPU reports those features). Tails shorter than 8 lanes use masked
// loads and stores, so no read or write leaves the row.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "kernels/kernels.h"

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

template <typename L>
void DotRowsT(const typename L::T* rows, int64_t count, int n, const float* x, float* out) {
  const int full = n & ~7;
  const int rem = n - full;
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const typename L::T* p0 = rows + r * n;
    const typename L::T* p1 = p0 + n;
    const typename L::T* p2 = p1 + n;
    const typename L::T* p3 = p2 + n;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int i = 0; i < full; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      a0 = _mm256_fmadd_ps(L::Load(p0 + i), xv, a0);
      a1 = _mm256_fmadd_ps(L::Load(p1 + i), xv, a1);
      a2 = _mm256_fmadd_ps(L::Load(p2 + i), xv, a2);
      a3 = _mm256_fmadd_ps(L::Load(p3 + i), xv, a3);
    }
    if (rem) {
      const __m256 xv = _mm256_maskload_ps(x + full, TailMask(rem));
      a0 = _mm256_fmadd_ps(L::LoadTail(p0 + full, rem), xv, a0);
      a1 = _mm256_fmadd_ps(L::LoadTail(p1 + full, rem), xv, a1);
      a2 = _mm256_fmadd_ps(L::LoadTail(p2 + full, rem), xv, a2);
      a3 = _mm256_fmadd_ps(L::LoadTail(p3 + full, rem), xv, a3);
    }
    out[r] = HorizontalSum(a0);
    out[r + 1] = HorizontalSum(a1);
    out[r + 2] = HorizontalSum(a2);
    out[r + 3] = HorizontalSum(a3);
  }
  // Left-over rows sum in the same order as the rows above, so a row's
  // score does not depend on where a block boundary falls.
  for (; r < count; ++r) {
    const typename L::T* p = rows + r * n;
    __m256 a0 = _mm256_setzero_ps();
    for (int i = 0; i < full; i += 8) a0 = _mm256_fmadd_ps(L::Load(p + i), _mm256_loadu_ps(x + i), a0);
    if (rem) {
      a0 = _mm256_fmadd_ps(L::LoadTail(p + full, rem),
                           _mm256_maskload_ps(x + full, TailMask(rem)), a0);
    }
    out[r] = HorizontalSum(a0);
  }
}

template <typename L>
void AxpyRowsT(const typename L::T* rows, int64_t count, int n, const float* w, float* acc) {
  const int full = n & ~7;
  const int rem = n - full;
  const __m256i tail = TailMask(rem);
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    if (w[r] == 0.f && w[r + 1] == 0.f && w[r + 2] == 0.f && w[r + 3] == 0.f) continue;
    const typename L::T* p0 = rows + r * n;
    const typename L::T* p1 = p0 + n;
    const typename L::T* p2 = p1 + n;
    const typename L::T* p3 = p2 + n;
    const __m256 w0 = _mm256_set1_ps(w[r]), w1 = _mm256_set1_ps(w[r + 1]);
    const __m256 w2 = _mm256_set1_ps(w[r + 2]), w3 = _mm256_set1_ps(w[r + 3]);
    for (int i = 0; i < full; i += 8) {
      __m256 a = _mm256_loadu_ps(acc + i);
      a = _mm256_fmadd_ps(w0, L::Load(p0 + i), a);
      a = _mm256_fmadd_ps(w1, L::Load(p1 + i), a);
      a = _mm256_fmadd_ps(w2, L::Load(p2 + i), a);
      a = _mm256_fmadd_ps(w3, L::Load(p3 + i), a);
      _mm256_storeu_ps(acc + i, a);
    }
    if (rem) {
      __m256 a = _mm256_maskload_ps(acc + full, tail);
      a = _mm256_fmadd_ps(w0, L::LoadTail(p0 + full, rem), a);
      a = _mm256_fmadd_ps(w1, L::LoadTail(p1 + full, rem), a);
      a = _mm256_fmadd_ps(w2, L::LoadTail(p2 + full, rem), a);
      a = _mm256_fmadd_ps(w3, L::LoadTail(p3 + full, rem), a);
      _mm256_maskstore_ps(acc + full, tail, a);
    }
  }
  for (; r < count; ++r) {
    if (w[r] == 0.f) continue;
    const typename L::T* p = rows + r * n;
    const __m256 wv = _mm256_set1_ps(w[r]);
    for (int i = 0; i < full; i += 8) {
      _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(wv, L::Load(p + i), _mm256_loadu_ps(acc + i)));
    }
    if (rem) {
      __m256 a = _mm256_maskload_ps(acc + full, tail);
      _mm256_maskstore_ps(acc + full, tail,
                          _mm256_fmadd_ps(wv, L::LoadTail(p + full, rem), a));
    }
  }
}

void DotRows(const float* rows, int64_t count, int n, const float* x, float* out) {
  DotRowsT<F32>(rows, count, n, x, out);
}
void AxpyRows(const float* rows, int64_t count, int n, const float* w, float* acc) {
  AxpyRowsT<F32>(rows, count, n, w, acc);
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
  std::unique_ptr<float[]> heap;
  float* xs = stack_buf;
  if (full > kStack) {
    heap.reset(new float[full]);
    xs = heap.get();
  }
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
  AxpyRowsT<Bf16>(rows, count, n, w, acc);
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

}  // namespace

const KernelTable& Avx2Kernels() {
  static const KernelTable t{SimdLevel::kAvx2, DotRows,     AxpyRows,     DotRowsBf16,
                             AxpyRowsBf16,     DotRowsBits, AxpyRowsBits};
  return t;
}

}  // namespace engram::core::kernels
