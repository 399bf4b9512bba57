// Portable kernels (the reference for the wider levels; plain C++ that the
// compiler may vectorise with the baseline x86-64 SSE2).
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/scratch.h"

namespace engram::core::kernels {
namespace {

void DotRows(const float* rows, int64_t count, int n, const float* x, float* out) {
  for (int64_t r = 0; r < count; ++r) {
    const float* p = rows + r * n;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int j = 0; j < 4; ++j) acc[j] += p[i + j] * x[i + j];
    }
    for (; i < n; ++i) acc[0] += p[i] * x[i];
    out[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

void AxpyRows(const float* rows, int64_t count, int n, const float* w, float* acc) {
  for (int64_t r = 0; r < count; ++r) {
    const float c = w[r];
    if (c == 0.f) continue;
    const float* p = rows + r * n;
    for (int i = 0; i < n; ++i) acc[i] += c * p[i];
  }
}

inline float Widen(uint16_t v) {
  const uint32_t u = uint32_t{v} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void DotRowsBf16(const uint16_t* rows, int64_t count, int n, const float* x, float* out) {
  for (int64_t r = 0; r < count; ++r) {
    const uint16_t* p = rows + r * n;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int j = 0; j < 4; ++j) acc[j] += Widen(p[i + j]) * x[i + j];
    }
    for (; i < n; ++i) acc[0] += Widen(p[i]) * x[i];
    out[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

void AxpyRowsBf16(const uint16_t* rows, int64_t count, int n, const float* w, float* acc) {
  for (int64_t r = 0; r < count; ++r) {
    const float c = w[r];
    if (c == 0.f) continue;
    const uint16_t* p = rows + r * n;
    for (int i = 0; i < n; ++i) acc[i] += c * Widen(p[i]);
  }
}

void DotRowsI8(const int8_t* rows, int64_t count, int n, const int8_t* x, const int32_t*,
               int32_t* out) {
  for (int64_t r = 0; r < count; ++r) {
    const int8_t* p = rows + r * n;
    // 16 independent lanes (the integer sum is exact in any order), which
    // the compiler's straight-line vectoriser turns into SSE2 multiplies.
    int32_t lane[16] = {};
    int i = 0;
    for (; i + 16 <= n; i += 16) {
      for (int j = 0; j < 16; ++j) lane[j] += int16_t{p[i + j]} * int16_t{x[i + j]};
    }
    int32_t acc = 0;
    for (; i < n; ++i) acc += int32_t{p[i]} * x[i];
    for (int32_t l : lane) acc += l;
    out[r] = acc;
  }
}

void DotRowsBits(const uint64_t* rows, int64_t count, int n, const uint64_t* x, float* out) {
  const int words = BitWords(n);
  for (int64_t r = 0; r < count; ++r) {
    const uint64_t* p = rows + r * words;
    int64_t differ = 0;
    for (int w = 0; w < words; ++w) differ += __builtin_popcountll(p[w] ^ x[w]);
    out[r] = static_cast<float>(n - 2 * differ);
  }
}

// acc[i] += sum_r w[r] * bit_i(row_r), for float or integer weights (the
// integer form accumulates in int32, exactly).
template <typename W, typename A>
void AxpyRowsBitsT(const uint64_t* rows, int64_t count, int n, const W* w, A* acc) {
  const int words = BitWords(n);
  for (int64_t r = 0; r < count; ++r) {
    const A c = static_cast<A>(w[r]);
    if (c == A{0}) continue;
    const uint64_t* p = rows + r * words;
    for (int i = 0; i < n; ++i) {
      if ((p[i >> 6] >> (i & 63)) & 1u) acc[i] += c;
    }
  }
}

void AxpyRowsBitsI16(const uint64_t* rows, int64_t count, int n, const int16_t* w,
                     int32_t* acc, const uint64_t* /*next*/, int64_t /*next_count*/) {
  AxpyRowsBitsT(rows, count, n, w, acc);
}

void AxpyRowsBits(const uint64_t* rows, int64_t count, int n, const float* w, float* acc) {
  AxpyRowsBitsT(rows, count, n, w, acc);
}

void DotRowsMulti(const float* rows, int64_t count, int n, const float* x, int64_t b,
                  float* out) {
  for (int64_t q = 0; q < b; ++q) DotRows(rows, count, n, x + q * n, out + q * count);
}

void AxpyRowsMulti(const float* rows, int64_t count, int n, const float* w, int64_t b,
                   float* acc) {
  for (int64_t q = 0; q < b; ++q) AxpyRows(rows, count, n, w + q * count, acc + q * n);
}

double ExpWeights(const double* w, int64_t count, double shift, double cut, float* out) {
  return ExpWeightsTail(w, 0, count, shift, cut, out);
}

}  // namespace

void ScalarOverlapWeights(const float* d, int64_t count, int32_t a, int32_t b, int shift,
                          int16_t* w16, OverlapStats* stats) {
  OverlapStats st;
  for (int64_t i = 0; i < count; ++i) {
    const int32_t v = static_cast<int32_t>(d[i]);
    st.sum += v;
    st.sum_sq += static_cast<double>(v) * v;
    if (d[i] > st.max) {
      st.max = d[i];
      st.argmax = i;
    }
    st.min = d[i] < st.min ? d[i] : st.min;
    if (w16 != nullptr) w16[i] = static_cast<int16_t>((a * v + b) >> shift);
  }
  *stats = st;
}

float ScalarMaxValue(const float* v, int64_t count) {
  float m = v[0];
  for (int64_t i = 0; i < count; ++i) {
    if (std::isnan(v[i])) return v[i];
    m = v[i] > m ? v[i] : m;
  }
  return m;
}

int64_t ScalarIndicesAtLeast(const float* v, int64_t count, float t, int32_t* idx) {
  int64_t found = 0;
  for (int64_t i = 0; i < count; ++i) {
    idx[found] = static_cast<int32_t>(i);
    found += v[i] >= t;
  }
  return found;
}

void ScalarMaxNearestKey(const float* v, const float* sq_norms, int64_t count, double* key,
                         int64_t* row) {
  for (int64_t i = 0; i < count; ++i) {
    const double k = double{v[i]} - 0.5 * double{sq_norms[i]};
    if (k > *key) {
      *key = k;
      *row = i;
    }
  }
}

const KernelTable& ScalarKernels() {
  static const KernelTable t{SimdLevel::kScalar, DotRows,      AxpyRows,     DotRowsBf16,
                             AxpyRowsBf16,       DotRowsI8,    DotRowsBits,  AxpyRowsBits, DotRowsMulti,
                             AxpyRowsMulti, ExpWeights,  AxpyRowsBitsI16, ScalarOverlapWeights,
                             ScalarMaxValue, ScalarIndicesAtLeast, ScalarMaxNearestKey};
  return t;
}

}  // namespace engram::core::kernels
