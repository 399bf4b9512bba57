// AVX-512 kernels (F, BW, VL, DQ, VPOPCNTDQ; built with those -m flags and
// called only when the CPU reports them). Tails use lane masks.
#include <immintrin.h>

#include "kernels/kernels.h"

namespace engram::core::kernels {
namespace {

inline __mmask16 Tail(int rem) { return static_cast<__mmask16>((1u << rem) - 1u); }

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

template <typename L>
void DotRowsT(const typename L::T* rows, int64_t count, int n, const float* x, float* out) {
  const int full = n & ~15;
  const int rem = n - full;
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const typename L::T* p0 = rows + r * n;
    const typename L::T* p1 = p0 + n;
    const typename L::T* p2 = p1 + n;
    const typename L::T* p3 = p2 + n;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int i = 0; i < full; i += 16) {
      const __m512 xv = _mm512_loadu_ps(x + i);
      a0 = _mm512_fmadd_ps(L::Load(p0 + i), xv, a0);
      a1 = _mm512_fmadd_ps(L::Load(p1 + i), xv, a1);
      a2 = _mm512_fmadd_ps(L::Load(p2 + i), xv, a2);
      a3 = _mm512_fmadd_ps(L::Load(p3 + i), xv, a3);
    }
    if (rem) {
      const __m512 xv = _mm512_maskz_loadu_ps(Tail(rem), x + full);
      a0 = _mm512_fmadd_ps(L::LoadTail(p0 + full, rem), xv, a0);
      a1 = _mm512_fmadd_ps(L::LoadTail(p1 + full, rem), xv, a1);
      a2 = _mm512_fmadd_ps(L::LoadTail(p2 + full, rem), xv, a2);
      a3 = _mm512_fmadd_ps(L::LoadTail(p3 + full, rem), xv, a3);
    }
    out[r] = _mm512_reduce_add_ps(a0);
    out[r + 1] = _mm512_reduce_add_ps(a1);
    out[r + 2] = _mm512_reduce_add_ps(a2);
    out[r + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; r < count; ++r) {
    const typename L::T* p = rows + r * n;
    __m512 a0 = _mm512_setzero_ps();
    for (int i = 0; i < full; i += 16) {
      a0 = _mm512_fmadd_ps(L::Load(p + i), _mm512_loadu_ps(x + i), a0);
    }
    if (rem) {
      a0 = _mm512_fmadd_ps(L::LoadTail(p + full, rem),
                           _mm512_maskz_loadu_ps(Tail(rem), x + full), a0);
    }
    out[r] = _mm512_reduce_add_ps(a0);
  }
}

template <typename L>
void AxpyRowsT(const typename L::T* rows, int64_t count, int n, const float* w, float* acc) {
  const int full = n & ~15;
  const int rem = n - full;
  const __mmask16 tail = Tail(rem);
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    if (w[r] == 0.f && w[r + 1] == 0.f && w[r + 2] == 0.f && w[r + 3] == 0.f) continue;
    const typename L::T* p0 = rows + r * n;
    const typename L::T* p1 = p0 + n;
    const typename L::T* p2 = p1 + n;
    const typename L::T* p3 = p2 + n;
    const __m512 w0 = _mm512_set1_ps(w[r]), w1 = _mm512_set1_ps(w[r + 1]);
    const __m512 w2 = _mm512_set1_ps(w[r + 2]), w3 = _mm512_set1_ps(w[r + 3]);
    for (int i = 0; i < full; i += 16) {
      __m512 a = _mm512_loadu_ps(acc + i);
      a = _mm512_fmadd_ps(w0, L::Load(p0 + i), a);
      a = _mm512_fmadd_ps(w1, L::Load(p1 + i), a);
      a = _mm512_fmadd_ps(w2, L::Load(p2 + i), a);
      a = _mm512_fmadd_ps(w3, L::Load(p3 + i), a);
      _mm512_storeu_ps(acc + i, a);
    }
    if (rem) {
      __m512 a = _mm512_maskz_loadu_ps(tail, acc + full);
      a = _mm512_fmadd_ps(w0, L::LoadTail(p0 + full, rem), a);
      a = _mm512_fmadd_ps(w1, L::LoadTail(p1 + full, rem), a);
      a = _mm512_fmadd_ps(w2, L::LoadTail(p2 + full, rem), a);
      a = _mm512_fmadd_ps(w3, L::LoadTail(p3 + full, rem), a);
      _mm512_mask_storeu_ps(acc + full, tail, a);
    }
  }
  for (; r < count; ++r) {
    if (w[r] == 0.f) continue;
    const typename L::T* p = rows + r * n;
    const __m512 wv = _mm512_set1_ps(w[r]);
    for (int i = 0; i < full; i += 16) {
      _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(wv, L::Load(p + i), _mm512_loadu_ps(acc + i)));
    }
    if (rem) {
      const __m512 a = _mm512_maskz_loadu_ps(tail, acc + full);
      _mm512_mask_storeu_ps(acc + full, tail, _mm512_fmadd_ps(wv, L::LoadTail(p + full, rem), a));
    }
  }
}

void DotRows(const float* rows, int64_t count, int n, const float* x, float* out) {
  DotRowsT<F32>(rows, count, n, x, out);
}
void AxpyRows(const float* rows, int64_t count, int n, const float* w, float* acc) {
  AxpyRowsT<F32>(rows, count, n, w, acc);
}
void DotRowsBf16(const uint16_t* rows, int64_t count, int n, const float* x, float* out) {
  DotRowsT<Bf16>(rows, count, n, x, out);
}
void AxpyRowsBf16(const uint16_t* rows, int64_t count, int n, const float* w, float* acc) {
  AxpyRowsT<Bf16>(rows, count, n, w, acc);
}

void DotRowsBits(const uint64_t* rows, int64_t count, int n, const uint64_t* x, float* out) {
  const int words = BitWords(n);
  const int full = words & ~7;
  const __mmask8 tail = static_cast<__mmask8>((1u << (words - full)) - 1u);
  for (int64_t r = 0; r < count; ++r) {
    const uint64_t* p = rows + r * words;
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
    out[r] = static_cast<float>(n - 2 * _mm512_reduce_add_epi64(d));
  }
}

void AxpyRowsBits(const uint64_t* rows, int64_t count, int n, const float* w, float* acc) {
  const int words = BitWords(n);
  const int full = n & ~15;
  const int rem = n - full;
  for (int64_t r = 0; r < count; ++r) {
    if (w[r] == 0.f) continue;
    const uint16_t* halves = reinterpret_cast<const uint16_t*>(rows + r * words);
    const __m512 wv = _mm512_set1_ps(w[r]);
    for (int i = 0; i < full; i += 16) {
      const __mmask16 m = halves[i >> 4];
      _mm512_storeu_ps(acc + i, _mm512_mask_add_ps(_mm512_loadu_ps(acc + i), m,
                                                  _mm512_loadu_ps(acc + i), wv));
    }
    if (rem) {
      const __mmask16 m = static_cast<__mmask16>(halves[full >> 4] & Tail(rem));
      const __m512 a = _mm512_maskz_loadu_ps(Tail(rem), acc + full);
      _mm512_mask_storeu_ps(acc + full, Tail(rem), _mm512_mask_add_ps(a, m, a, wv));
    }
  }
}

}  // namespace

const KernelTable& Avx512Kernels() {
  static const KernelTable t{SimdLevel::kAvx512, DotRows,         AxpyRows,
                             DotRowsBf16,        AxpyRowsBf16,    DotRowsBits,
                             AxpyRowsBits,       Avx2DotRowsMulti, Avx2AxpyRowsMulti,
                             Avx2ExpWeights};
  return t;
}

}  // namespace engram::core::kernels
