#include "engram/core/compute.h"

#include "kernels/kernels.h"
#include "parallel.h"

extern "C" {
#include <cblas.h>
}

namespace engram::core {

std::string SimdLevelInUse() { return kernels::SimdLevelName(kernels::Kernels().level); }

int ComputeThreadsInUse() { return internal::ComputeThreads(); }

std::string BlasKernelInUse() { return openblas_get_corename(); }

}  // namespace engram::core
