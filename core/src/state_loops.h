// Loops over one state's values, without a branch or a chain of dependent
// adds per value (a batch runs them over 256 states of 4 096 values at every
// step).
#ifndef ENGRAM_CORE_SRC_STATE_LOOPS_H_
#define ENGRAM_CORE_SRC_STATE_LOOPS_H_

#include <cstdint>

namespace engram::core::internal {

// Eight independent lanes in each: a chain of dependent double adds would
// take 4 cycles a value. The lane loops are unrolled so the lanes stay in
// registers (rolled, GCC kept them on the stack: a store and a reload per
// add, ~1.5 cycles a value).
inline constexpr int kLoopLanes = 8;

// |x|^2 accumulated in double.
double SquaredNorm(const float* x, int64_t n);
// max_i |a_i - b_i|, a NaN difference leaving the max as it was (as
// std::max(m, NaN) = m), 0 when n = 0.
float MaxAbsDiff(const float* a, const float* b, int64_t n);
// Whether every value is finite.
bool AllFinite(const float* v, int64_t n);

}  // namespace engram::core::internal

#endif  // ENGRAM_CORE_SRC_STATE_LOOPS_H_
