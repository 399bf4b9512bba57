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
//   using Mask; Mask TailMask(int rem);  lanes [0, rem) of a vector
//   V LoadMasked(const float*, Mask); void StoreMasked(float*, Mask, V);
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

#include "kernels/scratch.h"

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


// ---- Many states against the same rows ------------------------------------
// Register tiles: R rows x Q states of dot products, or Q states x C vectors
// of columns of accumulators. Each tile streams its operands once from
// L1/L2 and does R*Q (Q*C) FMAs per R + Q (C + Q) loads, so the FMA units,
// not the loads, set the pace. R, Q and C are chosen per ISA to fit its
// register file. Every accumulator sums in the same order whatever tile it
// is in, so a row's score does not depend on R.

// out[q * ld + r] = <row r, x_q>, r < R, q < Q (rows and states n apart).
template <typename I, int R, int Q>
inline void DotTile(const float* rows, int n, const float* x, float* out, int64_t ld) {
  using V = typename I::V;
  const int full = n & ~(I::kLanes - 1);
  const int rem = n - full;
  V a[R][Q];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) a[r][q] = I::Zero();
  }
  for (int i = 0; i < full; i += I::kLanes) {
    V v[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) v[r] = I::Load(rows + r * n + i);
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
      const V xv = I::Load(x + q * n + i);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r][q] = I::Fma(v[r], xv, a[r][q]);
    }
  }
  if (rem) {
    const typename I::Mask mask = I::TailMask(rem);
    V v[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) v[r] = I::LoadMasked(rows + r * n + full, mask);
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
      const V xv = I::LoadMasked(x + q * n + full, mask);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r][q] = I::Fma(v[r], xv, a[r][q]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) out[q * ld + r] = I::Sum(a[r][q]);
  }
}

// out[q * count + r] = <row r, x_q> for b states, in tiles of kTileRows
// rows x 4 states.
template <typename I, int kTileRows>
inline void DotRowsMulti(const float* rows, int64_t count, int n, const float* x, int64_t b,
                         float* out) {
  auto states = [&](int64_t q, auto tile, auto tile1) {
    int64_t r = 0;
    for (; r + kTileRows <= count; r += kTileRows) {
      tile(rows + r * n, n, x + q * n, out + q * count + r, count);
    }
    for (; r < count; ++r) tile1(rows + r * n, n, x + q * n, out + q * count + r, count);
  };
  int64_t q = 0;
  for (; q + 4 <= b; q += 4) states(q, DotTile<I, kTileRows, 4>, DotTile<I, 1, 4>);
  for (; q < b; ++q) states(q, DotTile<I, kTileRows, 1>, DotTile<I, 1, 1>);
}

// acc_q[c] += sum_k w[q * ld + active[k]] row active[k][c] for Q states and
// the C vectors of columns at rows / acc (states n apart); with kMasked the
// last vector holds only the lanes of `last`.
template <typename I, int C, int Q, bool kMasked>
inline void AxpyTile(const float* rows, const int32_t* active, int64_t nactive, int n,
                     const float* w, int64_t ld, float* acc, typename I::Mask last) {
  using V = typename I::V;
  auto load = [&](const float* p, int c) {
    return kMasked && c == C - 1 ? I::LoadMasked(p, last) : I::Load(p);
  };
  V a[Q][C];
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) a[q][c] = load(acc + q * n + I::kLanes * c, c);
  }
  for (int64_t k = 0; k < nactive; ++k) {
    const int64_t r = active[k];
    const float* p = rows + r * n;
    V v[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) v[c] = load(p + I::kLanes * c, c);
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
      const V wv = I::Set1(w[q * ld + r]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) a[q][c] = I::Fma(v[c], wv, a[q][c]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      float* dst = acc + q * n + I::kLanes * c;
      if (kMasked && c == C - 1) {
        I::StoreMasked(dst, last, a[q][c]);
      } else {
        I::Store(dst, a[q][c]);
      }
    }
  }
}

// acc_q += sum_r w[q * count + r] row r for b states (acc: b x n), in
// column blocks of kTileVectors vectors outer, so a block's slab of rows
// stays in L1 for every group of four states. active_rows(w, count, b,
// lists, sizes) writes each group's rows of a nonzero (or NaN) weight (see
// ActiveRowsOfStateGroups), which are the only rows a group reads.
template <typename I, int kTileVectors, typename ActiveRows>
inline void AxpyRowsMulti(const float* rows, int64_t count, int n, const float* w, int64_t b,
                          float* acc, ActiveRows active_rows) {
  using Mask = typename I::Mask;
  const int64_t groups = (b + 3) / 4;
  Scratch<int32_t> lists(groups * (count > 1 ? count : 1));
  Scratch<int64_t> sizes_buf(groups);
  int64_t* sizes = sizes_buf.get();
  active_rows(w, count, b, lists.get(), sizes);
  auto block = [&](int j, auto tile4, auto tile1, Mask last) {
    for (int64_t g = 0; g < groups; ++g) {
      if (sizes[g] == 0) continue;
      const int64_t q = 4 * g;
      const int32_t* list = lists.get() + g * count;
      if (q + 4 <= b) {
        tile4(rows + j, list, sizes[g], n, w + q * count, count, acc + q * n + j, last);
      } else {
        for (int64_t s = q; s < b; ++s) {
          tile1(rows + j, list, sizes[g], n, w + s * count, count, acc + s * n + j, last);
        }
      }
    }
  };
  constexpr int kWide = kTileVectors * I::kLanes;
  const Mask none = I::TailMask(0);
  int j = 0;
  for (; j + kWide <= n; j += kWide) {
    block(j, AxpyTile<I, kTileVectors, 4, false>, AxpyTile<I, kTileVectors, 1, false>, none);
  }
  for (; j + I::kLanes <= n; j += I::kLanes) {
    block(j, AxpyTile<I, 1, 4, false>, AxpyTile<I, 1, 1, false>, none);
  }
  if (j < n) block(j, AxpyTile<I, 1, 4, true>, AxpyTile<I, 1, 1, true>, I::TailMask(n - j));
}

}  // namespace engram::core::kernels::simd

#endif  // ENGRAM_CORE_SRC_KERNELS_ROWS_SIMD_H_
