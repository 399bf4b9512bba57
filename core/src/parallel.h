// Compute threads: one team of threads, shared by every pass of the
// process, over which a pass splits its rows.
//
//   int used = 1;
//   ParallelRows(rows, bytes_per_row, [&](int range, int64_t begin, int64_t end) {
//     ... rows [begin, end) ...
//   }, &used);
//
// The team has ComputeThreads() - 1 threads (the caller is the last one);
// they are created on first use and live as long as the process. An idle
// thread spins briefly for the next pass before it sleeps, so the passes of
// one retrieval keep it awake.
//
// Thread-safety: ParallelRows may be called from any number of threads at
// once; calls share the team. `fn` must not call ParallelRows.
#ifndef ENGRAM_CORE_SRC_PARALLEL_H_
#define ENGRAM_CORE_SRC_PARALLEL_H_

#include <cstdint>
#include <functional>

namespace engram::core::internal {

// Runs fn(range, begin, end) over [0, rows) split into at most
// 4 * ComputeThreads() contiguous ranges (claimed by the caller and the
// team) when rows * cost_per_row is large enough to pay for the hand-off;
// otherwise fn(0, 0, rows) inline. *used_ranges receives the number of
// ranges (range indices are < *used_ranges).
void ParallelRows(int64_t rows, int64_t cost_per_row,
                  const std::function<void(int, int64_t, int64_t)>& fn, int* used_ranges);

// Threads used for one pass (ENGRAM_THREADS, default: the CPUs this process
// may run on).
int ComputeThreads();

}  // namespace engram::core::internal

#endif  // ENGRAM_CORE_SRC_PARALLEL_H_
