// Helpers shared by the per-ISA kernel files, with internal linkage on
// purpose: each file gets its own copy, built with its own -m flags. A
// per-ISA file must not define inline code with external linkage (a
// std::vector member, say): the linker keeps one copy of it for the whole
// program, and if it keeps the AVX-512 one, baseline code calls it on CPUs
// without AVX-512. tests/kernels checks the objects for such symbols.
#ifndef ENGRAM_CORE_SRC_KERNELS_SCRATCH_H_
#define ENGRAM_CORE_SRC_KERNELS_SCRATCH_H_

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

}  // namespace
}  // namespace engram::core::kernels

#endif  // ENGRAM_CORE_SRC_KERNELS_SCRATCH_H_
