#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/kernels.h"

namespace engram::core::kernels {

std::string SimdLevelName(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar: return "scalar";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx512Bf16: return "avx512_bf16";
  }
  return "unknown";
}

SimdLevel DetectedSimdLevel() {
  static const SimdLevel level = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vpopcntdq")) {
      return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")
                 ? SimdLevel::kAvx512Bf16
                 : SimdLevel::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("popcnt")) {
      return SimdLevel::kAvx2;
    }
#endif
    return SimdLevel::kScalar;
  }();
  return level;
}

const KernelTable* KernelsFor(SimdLevel level) {
  if (static_cast<int>(level) > static_cast<int>(DetectedSimdLevel())) return nullptr;
  switch (level) {
    case SimdLevel::kScalar: return &ScalarKernels();
    case SimdLevel::kAvx2: return &Avx2Kernels();
    case SimdLevel::kAvx512: return &Avx512Kernels();
    case SimdLevel::kAvx512Bf16: return &Avx512Bf16Kernels();
  }
  return nullptr;
}

const KernelTable& Kernels() {
  static const KernelTable* table = [] {
    SimdLevel level = DetectedSimdLevel();
    if (const char* cap = std::getenv("ENGRAM_SIMD")) {
      SimdLevel want = level;
      if (std::strcmp(cap, "scalar") == 0) want = SimdLevel::kScalar;
      if (std::strcmp(cap, "avx2") == 0) want = SimdLevel::kAvx2;
      if (std::strcmp(cap, "avx512") == 0) want = SimdLevel::kAvx512;
      if (static_cast<int>(want) < static_cast<int>(level)) level = want;
    }
    return KernelsFor(level);
  }();
  return *table;
}

void ActiveRowsOfStateGroups(const float* w, int64_t count, int64_t b, int32_t* lists,
                             int64_t* sizes) {
  for (int64_t g = 0; 4 * g < b; ++g) {
    const int64_t q = 4 * g, states = b - q < 4 ? b - q : 4;
    int32_t* list = lists + g * count;
    int64_t m = 0;
    for (int64_t r = 0; r < count; ++r) {
      bool any = false;
      for (int64_t s = 0; s < states; ++s) any |= w[(q + s) * count + r] != 0.f;
      if (any) list[m++] = static_cast<int32_t>(r);
    }
    sizes[g] = m;
  }
}

float QuantizeToInt8(const float* v, int n, int8_t* q) {
  // Eight independent maxima, and rounding by adding and subtracting 1.5 2^23
  // (round to nearest even, as nearbyint in the default mode, for |t| < 2^22):
  // no libm call or dependency chain per value.
  constexpr int kLanes = 8;
  float lane[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLanes; ++j) {
      const float a = std::fabs(v[i + j]);
      lane[j] = a > lane[j] ? a : lane[j];
    }
  }
  for (; i < n; ++i) lane[0] = std::max(lane[0], std::fabs(v[i]));
  float m = 0.f;
  for (float a : lane) m = std::max(m, a);
  const float scale = m / 127.f;
  if (!(scale > 0.f)) {  // zero, or so small that m / 127 underflows
    std::fill(q, q + n, int8_t{0});
    return 0.f;
  }
  constexpr float kRound = 0x1.8p23f;
  for (int k = 0; k < n; ++k) {
    const float t = (v[k] / scale + kRound) - kRound;
    q[k] = static_cast<int8_t>(t > 127.f ? 127.f : t < -127.f ? -127.f : t);
  }
  return scale;
}

uint16_t FloatToBf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float Bf16ToFloat(uint16_t v) {
  const uint32_t u = uint32_t{v} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace engram::core::kernels
