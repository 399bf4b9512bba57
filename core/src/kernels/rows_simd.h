// The row loops shared by the per-ISA kernel files, written once over an
// ISA traits struct. Each kernel file defines its traits in an anonymous
// namespace and instantiates these templates with them, so every
// instantiation has internal linkage and is compiled with that file's -m
// flags alone (no instantiation can be shared with another ISA level's
// object: see cmake/CheckIsaObjects.cmake).
//
// An ISA traits struct `I` provides, for float vectors of I::kLanes lanes:
//   using V;                      the vector type
//   V Zero(); V Set1(float);
//   V Load(const float*);         kLanes values
//   V LoadTail(const float*, int rem);   the first rem (< kLanes), 0 above
//   void Store(float*, V); void StoreTail(float*, int rem, V);
//   V Fma(V a, V b, V c);         a * b + c
//   float Sum(V);                 the sum of the lanes
// A row loader `L` (f32 or bf16 rows) provides `using T` (the stored value)
// and V Load(const T*), V LoadTail(const T*, int rem) as f32.
//
// Summation order: each row's dot product sums kLanes lanes, each lane over
// the row in order, then the lanes (I::Sum); rows are taken four at a time
// and left-over rows sum in the same order, so a row's score does not
// depend on where a block boundary falls.
#ifndef ENGRAM_CORE_SRC_KERNELS_ROWS_SIMD_H_
#define ENGRAM_CORE_SRC_KERNELS_ROWS_SIMD_H_

#include <cstdint>

namespace engram::core::kernels::simd {

// out[r] = <row r, x>, r < count.
template <typename I, typename L>
inline void DotRows(const typename L::T* rows, int64_t count, int n, const float* x, float* out) {
  using V = typename I::V;
  const int full = n & ~(I::kLanes - 1);  // kLanes is a power of two
  const int rem = n - full;
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const typename L::T* p0 = rows + r * n;
    const typename L::T* p1 = p0 + n;
    const typename L::T* p2 = p1 + n;
    const typename L::T* p3 = p2 + n;
    V a0 = I::Zero(), a1 = I::Zero(), a2 = I::Zero(), a3 = I::Zero();
    for (int i = 0; i < full; i += I::kLanes) {
      const V xv = I::Load(x + i);
      a0 = I::Fma(L::Load(p0 + i), xv, a0);
      a1 = I::Fma(L::Load(p1 + i), xv, a1);
      a2 = I::Fma(L::Load(p2 + i), xv, a2);
      a3 = I::Fma(L::Load(p3 + i), xv, a3);
    }
    if (rem) {
      const V xv = I::LoadTail(x + full, rem);
      a0 = I::Fma(L::LoadTail(p0 + full, rem), xv, a0);
      a1 = I::Fma(L::LoadTail(p1 + full, rem), xv, a1);
      a2 = I::Fma(L::LoadTail(p2 + full, rem), xv, a2);
      a3 = I::Fma(L::LoadTail(p3 + full, rem), xv, a3);
    }
    out[r] = I::Sum(a0);
    out[r + 1] = I::Sum(a1);
    out[r + 2] = I::Sum(a2);
    out[r + 3] = I::Sum(a3);
  }
  for (; r < count; ++r) {
    const typename L::T* p = rows + r * n;
    V a0 = I::Zero();
    for (int i = 0; i < full; i += I::kLanes) a0 = I::Fma(L::Load(p + i), I::Load(x + i), a0);
    if (rem) a0 = I::Fma(L::LoadTail(p + full, rem), I::LoadTail(x + full, rem), a0);
    out[r] = I::Sum(a0);
  }
}

// acc[i] += sum_r w[r] row r[i], i < n; rows of weight 0 are not read.
template <typename I, typename L>
inline void AxpyRows(const typename L::T* rows, int64_t count, int n, const float* w, float* acc) {
  using V = typename I::V;
  const int full = n & ~(I::kLanes - 1);  // kLanes is a power of two
  const int rem = n - full;
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    if (w[r] == 0.f && w[r + 1] == 0.f && w[r + 2] == 0.f && w[r + 3] == 0.f) continue;
    const typename L::T* p0 = rows + r * n;
    const typename L::T* p1 = p0 + n;
    const typename L::T* p2 = p1 + n;
    const typename L::T* p3 = p2 + n;
    const V w0 = I::Set1(w[r]), w1 = I::Set1(w[r + 1]);
    const V w2 = I::Set1(w[r + 2]), w3 = I::Set1(w[r + 3]);
    for (int i = 0; i < full; i += I::kLanes) {
      V a = I::Load(acc + i);
      a = I::Fma(w0, L::Load(p0 + i), a);
      a = I::Fma(w1, L::Load(p1 + i), a);
      a = I::Fma(w2, L::Load(p2 + i), a);
      a = I::Fma(w3, L::Load(p3 + i), a);
      I::Store(acc + i, a);
    }
    if (rem) {
      V a = I::LoadTail(acc + full, rem);
      a = I::Fma(w0, L::LoadTail(p0 + full, rem), a);
      a = I::Fma(w1, L::LoadTail(p1 + full, rem), a);
      a = I::Fma(w2, L::LoadTail(p2 + full, rem), a);
      a = I::Fma(w3, L::LoadTail(p3 + full, rem), a);
      I::StoreTail(acc + full, rem, a);
    }
  }
  for (; r < count; ++r) {
    if (w[r] == 0.f) continue;
    const typename L::T* p = rows + r * n;
    const V wv = I::Set1(w[r]);
    for (int i = 0; i < full; i += I::kLanes) {
      I::Store(acc + i, I::Fma(wv, L::Load(p + i), I::Load(acc + i)));
    }
    if (rem) {
      const V a = I::LoadTail(acc + full, rem);
      I::StoreTail(acc + full, rem, I::Fma(wv, L::LoadTail(p + full, rem), a));
    }
  }
}

}  // namespace engram::core::kernels::simd

#endif  // ENGRAM_CORE_SRC_KERNELS_ROWS_SIMD_H_
