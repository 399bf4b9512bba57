#include "state_loops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace engram::core::internal {


double SquaredNorm(const float* x, int64_t n) {
  double s[kLoopLanes] = {};
  int64_t i = 0;
  for (; i + kLoopLanes <= n; i += kLoopLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLoopLanes; ++j) s[j] += double{x[i + j]} * x[i + j];
  }
  for (; i < n; ++i) s[0] += double{x[i]} * x[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

float MaxAbsDiff(const float* a, const float* b, int64_t n) {
  float m[kLoopLanes] = {};
  auto step = [&](int j, int64_t at) {
    const float d = std::fabs(a[at] - b[at]);
    m[j] = d > m[j] ? d : m[j];
  };
  int64_t i = 0;
  for (; i + kLoopLanes <= n; i += kLoopLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLoopLanes; ++j) step(j, i + j);
  }
  for (; i < n; ++i) step(0, i);
  return *std::max_element(m, m + kLoopLanes);
}

bool AllFinite(const float* v, int64_t n) {
  // An exponent field of all ones carries into bit 31 when 2^23 is added.
  uint32_t carry[kLoopLanes] = {};
  auto step = [&](int j, int64_t at) {
    uint32_t bits;
    std::memcpy(&bits, v + at, sizeof bits);
    carry[j] |= (bits & 0x7f800000u) + 0x00800000u;
  };
  int64_t i = 0;
  for (; i + kLoopLanes <= n; i += kLoopLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLoopLanes; ++j) step(j, i + j);
  }
  for (; i < n; ++i) step(0, i);
  uint32_t all = 0;
  for (uint32_t c : carry) all |= c;
  return (all & 0x80000000u) == 0;
}

}  // namespace engram::core::internal
