// ParallelRows and its compute threads: every row of every job runs exactly
// once, with callers on many threads at once, and after the workers have
// gone to sleep. Label stress: the ThreadSanitizer stage runs it too.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <sched.h>
#include <set>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include <gtest/gtest.h>

#include "fused.h"
#include "parallel.h"

namespace engram::core::internal {
namespace {

// More threads than this machine's cores, so jobs overlap and queue.
class ParallelRowsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { setenv("ENGRAM_THREADS", "4", 1); }
};

// Runs one job over `rows` rows and checks that each ran once and the ranges
// tile [0, rows); returns the threads that ran its chunks.
std::set<std::thread::id> RunJob(int64_t rows, std::chrono::microseconds per_chunk = {}) {
  std::vector<std::atomic<int>> hits(rows);
  std::mutex mu;
  std::set<std::thread::id> ran_on;
  std::vector<int> ranges_seen;
  int used = 0;
  ParallelRows(rows, int64_t{1} << 20, [&](int part, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) hits[r].fetch_add(1, std::memory_order_relaxed);
    if (per_chunk.count() > 0) std::this_thread::sleep_for(per_chunk);
    std::lock_guard<std::mutex> lock(mu);
    ran_on.insert(std::this_thread::get_id());
    ranges_seen.push_back(part);
  }, &used);
  for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(hits[r].load(), 1) << "row " << r << " of " << rows;
  EXPECT_EQ(static_cast<int>(ranges_seen.size()), used);
  std::set<int> distinct(ranges_seen.begin(), ranges_seen.end());
  EXPECT_EQ(static_cast<int>(distinct.size()), used);
  EXPECT_EQ(used, std::min<int64_t>(4 * ComputeThreads(), rows));
  return ran_on;
}

TEST_F(ParallelRowsTest, SplitsLargeJobsAndRunsSmallOnesInline) {
  ASSERT_EQ(ComputeThreads(), 4);
  int used = -1;
  int64_t seen = 0;
  ParallelRows(1000, 1, [&](int part, int64_t begin, int64_t end) {
    EXPECT_EQ(part, 0);
    seen += end - begin;
  }, &used);
  EXPECT_EQ(used, 1);  // 1 000 bytes of work: not worth a hand-off
  EXPECT_EQ(seen, 1000);
  for (int64_t rows : {8, 9, 17, 1000, 12345}) RunJob(rows);
}

TEST_F(ParallelRowsTest, WorkersTakeChunksWhileTheCallerIsBusy) {
  // Each chunk sleeps, so the caller cannot run all 16 in time: the workers
  // take some, including after an idle spell long enough for them to sleep.
  std::set<std::thread::id> threads = RunJob(64, std::chrono::microseconds(2000));
  EXPECT_GT(threads.size(), 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  threads = RunJob(64, std::chrono::microseconds(2000));
  EXPECT_GT(threads.size(), 1u);
}

TEST_F(ParallelRowsTest, ConcurrentCallersEachGetEveryRowOnce) {
  constexpr int kCallers = 6, kJobs = 150;
  std::vector<std::thread> callers;
  std::atomic<int> finished{0};
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([c, &finished] {
      for (int j = 0; j < kJobs; ++j) {
        RunJob(8 + (c * 7919 + j * 104729) % 3000);
        if (j % 50 == 49) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      finished.fetch_add(1);
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(finished.load(), kCallers);
}

// Sets the CPUs every thread of this process but the main one may run on.
void SetOtherThreadsAffinity(const cpu_set_t& set) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
    const pid_t tid = std::stoi(entry.path().filename().string());
    if (tid != getpid()) sched_setaffinity(tid, sizeof(set), &set);
  }
}

TEST_F(ParallelRowsTest, WorkersLeaveTheCallersCpu) {
  cpu_set_t all;
  CPU_ZERO(&all);
  ASSERT_EQ(sched_getaffinity(0, sizeof(all), &all), 0);
  if (CPU_COUNT(&all) < 2) GTEST_SKIP() << "one CPU: nowhere else to go";
  int first = 0;
  while (!CPU_ISSET(first, &all)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  RunJob(64);  // the workers exist
  // The workers start on the caller's CPU, which the caller keeps: the
  // chunks they take run elsewhere.
  SetOtherThreadsAffinity(one);
  int by_workers = 0, on_callers_cpu = 0;
  std::thread caller([&] {
    ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
    const std::thread::id me = std::this_thread::get_id();
    std::mutex mu;
    for (int j = 0; j < 20; ++j) {
      int used = 0;
      ParallelRows(64, int64_t{1} << 20, [&](int, int64_t, int64_t) {
        std::this_thread::sleep_for(std::chrono::microseconds(300));
        const int cpu = sched_getcpu();
        std::lock_guard<std::mutex> lock(mu);
        if (std::this_thread::get_id() == me) return;
        ++by_workers;
        on_callers_cpu += cpu == first;
      }, &used);
    }
  });
  caller.join();
  SetOtherThreadsAffinity(all);
  EXPECT_GT(by_workers, 0);
  EXPECT_EQ(on_callers_cpu, 0) << "of " << by_workers << " chunks run by workers";
}

}  // namespace
}  // namespace engram::core::internal
