// What the fast kernels run on: the SIMD level chosen for this CPU and the
// threads one pass over a bank may use.
//
//   LOG(INFO) << "kernels: " << engram::core::SimdLevelInUse();
//
// Thread-safety: thread-safe (values fixed at first use).
#ifndef ENGRAM_CORE_COMPUTE_H_
#define ENGRAM_CORE_COMPUTE_H_

#include <string>

namespace engram::core {

// "scalar", "avx2" or "avx512": the widest level the CPU supports, capped
// by the environment variable ENGRAM_SIMD.
std::string SimdLevelInUse();

// Threads per pass: ENGRAM_THREADS, default the hardware threads.
int ComputeThreadsInUse();

// The OpenBLAS kernel family batched steps run on (e.g. "Cooperlake"): the
// library's choice for this CPU, or OPENBLAS_CORETYPE when that is set.
std::string BlasKernelInUse();

}  // namespace engram::core

#endif  // ENGRAM_CORE_COMPUTE_H_
