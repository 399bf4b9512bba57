#include "parallel.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace engram::core::internal {
namespace {

// Work below this many bytes of patterns runs on the caller's thread (a
// pass over 512 KB takes ~5 us; a pass of no-op chunks shared with a
// spinning worker, 0.2-0.6 us).
constexpr int64_t kParallelBytes = int64_t{512} << 10;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Waits until `ready()` or `micros` have passed, without sleeping; returns
// ready(). Waking a sleeping thread through the kernel costs tens of
// microseconds, as long as a pass over a bank of a few MB, so the threads
// of a pass wait for each other this long before they sleep. After the
// first microseconds the wait yields the core at every check, so a thread
// that has work there (OpenBLAS's, another pass's) runs instead.
template <typename Ready>
bool SpinFor(int micros, const Ready& ready) {
  const auto start = std::chrono::steady_clock::now();
  const auto polite = start + std::chrono::microseconds(std::min(micros, 5));
  const auto until = start + std::chrono::microseconds(micros);
  while (!ready()) {
    const auto now = std::chrono::steady_clock::now();
    if (now > until) return ready();
    if (now < polite) {
      for (int i = 0; i < 64 && !ready(); ++i) CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
  return true;
}

// How long a caller spins for the other threads' last chunks, and how long
// an idle worker spins for the next pass before it sleeps. A retrieval's
// passes follow each other within this time, so its workers stay awake.
constexpr int kCallerSpinMicros = 50;
constexpr int kWorkerSpinMicros = 200;

// Shared between the caller and the workers of one ParallelRows call.
struct Job {
  std::function<void(int, int64_t, int64_t)> fn;
  int64_t rows = 0;
  int chunks = 0;
  int caller_cpu = -1;  // the CPU the caller posted from
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  // The last chunk's notification, for a caller that stopped spinning.
  std::mutex mu;
  std::condition_variable cv;

  bool Claimed() const { return next.load(std::memory_order_relaxed) >= chunks; }
  bool Finished() const { return done.load(std::memory_order_acquire) == chunks; }

  // Claims and runs chunks until none are left.
  void Drain() {
    while (true) {
      const int c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      const int64_t begin = rows * c / chunks, end = rows * (c + 1) / chunks;
      fn(c, begin, end);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }

  // Drains, then waits until every chunk (some run by other threads) is done.
  void RunAndWait() {
    Drain();
    if (SpinFor(kCallerSpinMicros, [this] { return Finished(); })) return;
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return Finished(); });
  }
};

// The compute threads besides the callers': each takes the oldest posted
// job that still has chunks to claim. Callers drain their own jobs too, so
// a job never waits for a worker (concurrent callers share the workers).
class Team {
 public:
  explicit Team(int workers) {
    for (int i = 0; i < workers; ++i) std::thread([this] { Work(); }).detach();
  }

  void Post(const std::shared_ptr<Job>& job) {
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(job);
      posted_.fetch_add(1, std::memory_order_release);
      wake = sleeping_ > 0;
    }
    if (wake) cv_.notify_all();
  }

  // Drops `job` (fully claimed) from the queue if no worker has yet.
  void Retire(const Job* job) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
      if (it->get() == job) {
        jobs_.erase(it);
        return;
      }
    }
  }

 private:
  void Work() {
    while (true) {
      std::shared_ptr<Job> job;
      uint64_t seen;
      {
        std::lock_guard<std::mutex> lock(mu_);
        while (!jobs_.empty() && jobs_.front()->Claimed()) jobs_.pop_front();
        if (!jobs_.empty()) job = jobs_.front();
        seen = posted_.load(std::memory_order_relaxed);
      }
      if (job != nullptr) {
        LeaveCallersCpu(job->caller_cpu);
        job->Drain();
        continue;
      }
      auto posted = [&] { return posted_.load(std::memory_order_acquire) != seen; };
      if (SpinFor(kWorkerSpinMicros, posted)) continue;
      std::unique_lock<std::mutex> lock(mu_);
      ++sleeping_;
      cv_.wait(lock, posted);
      --sleeping_;
    }
  }

  // A worker on the caller's CPU only takes turns with it while another CPU
  // idles, and the scheduler can leave them so for 100 ms (a new process's
  // caller and its first worker often start so). Such a worker moves
  // itself: it may then run on any CPU the process may (the main thread's
  // set) but the caller's.
  static void LeaveCallersCpu(int caller_cpu) {
    if (caller_cpu < 0 || sched_getcpu() != caller_cpu) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(getpid(), sizeof(set), &set) != 0) return;
    CPU_CLR(caller_cpu, &set);
    if (CPU_COUNT(&set) > 0) sched_setaffinity(0, sizeof(set), &set);
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> jobs_;  // guarded by mu_
  std::atomic<uint64_t> posted_{0};        // written under mu_
  int sleeping_ = 0;                       // guarded by mu_
};

Team& Workers() {
  static Team* team = new Team(std::max(1, ComputeThreads() - 1));
  return *team;
}

}  // namespace

int ComputeThreads() {
  static const int threads = [] {
    if (const char* env = std::getenv("ENGRAM_THREADS")) {
      const int t = std::atoi(env);
      if (t >= 1) return std::min(t, 256);
    }
    // The CPUs this process may use (a container's cpuset), not the machine's.
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return threads;
}

void ParallelRows(int64_t rows, int64_t cost_per_row,
                  const std::function<void(int, int64_t, int64_t)>& fn, int* used_ranges) {
  const int threads = ComputeThreads();
  if (threads <= 1 || rows * cost_per_row < kParallelBytes || rows < 2 * threads) {
    *used_ranges = 1;
    fn(0, 0, rows);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = fn;
  job->rows = rows;
  job->chunks = static_cast<int>(std::min<int64_t>(4 * threads, rows));
  *used_ranges = job->chunks;
  job->caller_cpu = sched_getcpu();
  Workers().Post(job);
  job->RunAndWait();
  Workers().Retire(job.get());
}

}  // namespace engram::core::internal
