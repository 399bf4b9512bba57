// Helpers shared by the per-ISA kernel files, with internal linkage on
// purpose: each file gets its own copy, built with its own -m flags. A
// per-ISA file must not define inline code with external linkage (a
// std::vector member, say): the linker keeps one copy of it for the whole
// program, and if it keeps the AVX-512 one, baseline code calls it on CPUs
// without AVX-512. tests/kernels checks the objects for such symbols.
#ifndef ENGRAM_CORE_SRC_KERNELS_SCRATCH_H_
#define ENGRAM_CORE_SRC_KERNELS_SCRATCH_H_

#include <cmath>
#include <cstdint>

namespace engram::core::kernels {
namespace {  // NOLINT(build/namespaces): internal linkage per ISA file, see above

// Per-call scratch memory of n values (at least one).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : p_(new T[n > 0 ? n : 1]) {}
  ~Scratch() { delete[] p_; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

// The vector exp of exp_weights: d = k ln 2 + r with |r| <= ln 2 / 2 (ln 2
// in two parts, the first exact in 16 bits), then the Taylor series of e^r
// to degree 12 (truncation below 2^-52): 1/12!, 1/11!, ..., 1/1!, 1/0!.
constexpr double kLog2E = 1.4426950408889634;
constexpr double kLn2Hi = 0.693145751953125;
constexpr double kLn2Lo = 1.42860682030941723212e-6;
constexpr double kExpTaylor[13] = {
    1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
    1.0 / 5040.0,      1.0 / 720.0,      1.0 / 120.0,     1.0 / 24.0,     1.0 / 6.0,
    1.0 / 2.0,         1.0,              1.0};

// exp_weights over w[i, count) one value at a time (the vector kernels'
// tails); returns the sum of the exps.
inline double ExpWeightsTail(const double* w, int64_t i, int64_t count, double shift, double cut,
                             float* out) {
  double total = 0.0;
  for (; i < count; ++i) {
    if (w[i] < cut) {
      out[i] = 0.f;
      continue;
    }
    const double e = std::exp(w[i] - shift);
    out[i] = static_cast<float>(e);
    total += e;
  }
  return total;
}

}  // namespace
}  // namespace engram::core::kernels

#endif  // ENGRAM_CORE_SRC_KERNELS_SCRATCH_H_
